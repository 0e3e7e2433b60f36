"""What the parts of the model service share: the settings, the store's caches, the
metrics and the background tasks. ``service.py`` makes one :class:`Shared`; the
pool, the loader and the deployments take it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...config import ServeSettings, Settings
from .metrics import Metrics

if TYPE_CHECKING:
    from ...caches import Caches

log = logging.getLogger("cachemesh.serve")


class Background:
    """Tasks that run on their own (pulls, loads, unloads, rollouts, the copy scaler);
    whoever needs a result awaits the task. Stopping the server cancels them all."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Whoever awaited it got the error; this only marks it as seen.
            log.debug("background task failed: %s", task.exception())

    async def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass(frozen=True)
class Shared:
    settings: Settings
    caches: Caches
    metrics: Metrics
    background: Background

    @property
    def cfg(self) -> ServeSettings:
        return self.settings.serve
