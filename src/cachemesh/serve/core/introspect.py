"""What a model says about itself: V2 metadata, Triton-style statistics, the runtime's
own counters. Read-only views over the service's state (``state.py``); metadata may
start a load, as a request would (``Loader.ensure_loaded``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from ...config import ServeSettings
from ...errors import CachemeshError, RequestTimeoutError
from ..workers.messages import Stats
from .deployments import Deployments
from .documents import DEFAULT_VERSION
from .loading import Loader
from .loadqueue import REQUEST
from .state import Copy


class Introspection:
    """Metadata, statistics and runtime counters of the declared models."""

    def __init__(self, cfg: ServeSettings, deployments: Deployments, loader: Loader) -> None:
        self.cfg = cfg
        self.deployments = deployments
        self.loader = loader

    async def metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """V2 model metadata, the same before and after the first load: read from the
        files where their format tells (``Runtime.describe``), else from a load, which
        this starts (and waits for) as a request would."""
        dep = self.deployments.get(name, version)
        v = dep.versions[dep.router.choose(version).version if version else dep.doc.primary()]
        if v.resolved is None and v.prepare_task is not None:
            with contextlib.suppress(CachemeshError, asyncio.CancelledError):
                await asyncio.shield(v.prepare_task)
        meta = dep.metadata(v)
        if meta is None:
            deadline = time.monotonic() + self.cfg.request_timeout_s
            try:
                async with asyncio.timeout(self.cfg.request_timeout_s):
                    await self.loader.ensure_loaded(v, REQUEST, deadline)
            except TimeoutError:
                raise RequestTimeoutError(
                    f"model {name!r} did not load within {self.cfg.request_timeout_s:g}s"
                ) from None
            meta = dep.metadata(v)
        return meta or {"name": name, "versions": list(dep.doc.versions),
                        "platform": v.resolved.runtime if v.resolved else "",
                        "inputs": [], "outputs": []}

    def statistics(self, name: str = "", version: str | None = None) -> list[dict[str, Any]]:
        """Each version's tally (every model's when ``name`` is empty), in the terms of
        Triton's statistics extension."""
        if name:
            dep = self.deployments.get(name, version)
            deps = [dep]
            if version is not None:
                dep.router.choose(version)  # an unknown version is not found
        else:
            deps = [d for _, d in sorted(self.deployments.by_name.items())
                    if not d.removed and self.deployments.visible(d)]
        out = []
        for dep in deps:
            for v in dep.versions.values():
                if version is not None and v.label != dep.router.choose(version).version:
                    continue
                t = v.tally
                label = "" if v.label == DEFAULT_VERSION else v.label
                out.append({"name": dep.name, "version": label,
                            "last_inference": t.last_ms,
                            "inference_count": t.success, "execution_count": t.success,
                            "success": (t.success, t.success_ns), "fail": (t.fail, t.fail_ns),
                            "queue": (t.queued, t.queue_ns)})
        return out

    async def runtime_stats(self, name: str) -> dict[str, Any]:
        """The runtime's own counters (``Runtime.stats``: tokens generated, load phases)
        of each loaded copy of the model; ``stats`` is the first one's. Loads nothing."""
        dep = self.deployments.get(name)
        copies = [c for v in dep.versions.values() for c in v.copies if c.ready]

        async def ask(c: Copy) -> dict[str, Any]:
            reply = await asyncio.wait_for(c.slot.call(Stats()), self.cfg.request_timeout_s)
            return {"version": c.version.label, "worker": c.slot.id,
                    "stats": reply.stats.get(c.key, {})}

        found = list(await asyncio.gather(*(ask(c) for c in copies)))
        return {"loaded": bool(found), "stats": found[0]["stats"] if found else {},
                "copies": found}
