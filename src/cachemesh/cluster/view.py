"""An in-memory copy of every key under one prefix, kept current by a watch.

A node reads ``nodes/``, ``copies/`` and ``models/`` (keys.py) on every request that
needs them: from memory, never from etcd. :class:`PrefixView` reads the prefix once,
then follows it with a watch that resumes where it stopped (``KV.watch``). When the
watch cannot resume (history compacted, or another etcd answers: its data was lost) the
view reads the prefix again and tells its listener what changed (``on_reset`` decides
what to make of a prefix that came back empty; the model registry restores it).

While etcd cannot be reached the view keeps what it last saw: a node serves from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..errors import ClusterError, HistoryLostError
from .kv import KV, Backoff, KeyValue, Snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """A key written (``kv.value`` set) or deleted (``deleted``) as the view saw it."""

    key: str
    kv: KeyValue
    deleted: bool


Listener = Callable[[Event], None]
ResetHook = Callable[[Snapshot], Awaitable[Snapshot]]


class PrefixView:
    """Every key under ``prefix``, as etcd had it at :attr:`revision`."""

    def __init__(self, kv: KV, prefix: str, *, on_event: Listener | None = None,
                 on_reset: ResetHook | None = None) -> None:
        self.kv = kv
        self.prefix = prefix
        self.items: dict[str, KeyValue] = {}
        self.revision = 0
        self.errors = 0  # times etcd could not be read (for metrics)
        self.resets = 0  # times the watch could not resume and the prefix was read again
        self._on_event = on_event
        self._on_reset = on_reset
        self._task: asyncio.Task[None] | None = None
        self.loaded = asyncio.Event()

    async def load(self) -> None:
        """Read the prefix (raises ClusterUnavailableError when etcd cannot be reached)."""
        snapshot = await self.kv.get_prefix(self.prefix)
        self._replace(snapshot)
        self.loaded.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name=f"watch {self.prefix}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _tell(self, event: Event) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a listener's fault must not stop the watch
                log.exception("a listener of %s failed", self.prefix)

    def _replace(self, snapshot: Snapshot) -> None:
        """Take ``snapshot`` as the new state; tell what changed against the old one."""
        new = {kv.key: kv for kv in snapshot.kvs}
        old, self.items, self.revision = self.items, new, snapshot.revision
        for key, kv in old.items():
            if key not in new:
                self._tell(Event(key, kv, deleted=True))
        for key, kv in new.items():
            was = old.get(key)
            if was is None or was.value != kv.value or was.mod_revision != kv.mod_revision:
                self._tell(Event(key, kv, deleted=False))

    def apply(self, kv: KeyValue, *, deleted: bool = False) -> None:
        """What this node wrote itself, seen before its watch reports it."""
        if deleted:
            if self.items.pop(kv.key, None) is not None:
                self._tell(Event(kv.key, kv, deleted=True))
            return
        was = self.items.get(kv.key)
        if was is not None and was.mod_revision >= kv.mod_revision:
            return
        self.items[kv.key] = kv
        self._tell(Event(kv.key, kv, deleted=False))

    async def _run(self) -> None:
        backoff = Backoff(cap=1.0)
        reset = False
        while True:
            try:
                if reset:
                    snapshot = await self.kv.get_prefix(self.prefix)
                    if self._on_reset is not None:
                        snapshot = await self._on_reset(snapshot)
                    self._replace(snapshot)
                    reset = False
                elif not self.loaded.is_set():
                    await self.load()
                async with contextlib.aclosing(self.kv.watch(
                        self.prefix, prefix=True, start_revision=self.revision + 1)) as events:
                    async for event in events:
                        backoff.reset()
                        self._follow(event.kind == "delete", event.kv)
                        self.revision = max(self.revision, event.revision)
            except HistoryLostError as exc:
                log.warning("watch on %s cannot resume (%s): reading it again", self.prefix, exc)
                self.resets += 1
                reset = True
            except ClusterError as exc:
                self.errors += 1
                log.info("watch on %s: %s", self.prefix, exc)
                await asyncio.sleep(backoff.next())

    def _follow(self, deleted: bool, kv: KeyValue) -> None:
        if deleted:
            gone = self.items.pop(kv.key, None)
            if gone is not None:
                self._tell(Event(kv.key, gone, deleted=True))
            return
        was = self.items.get(kv.key)
        if was is not None and was.mod_revision >= kv.mod_revision:
            return  # written here, already applied
        self.items[kv.key] = kv
        self._tell(Event(kv.key, kv, deleted=False))
