"""An in-memory :class:`~.kv.KV` with etcd's semantics, for unit tests of logic only.

A server never uses it: cluster mode runs on a real etcd. It keeps etcd's rules where the
logic above depends on them (one revision counter; create and mod revisions; keys bound
to leases vanish when the lease expires or is revoked; watches resume from a revision),
and adds two switches etcd cannot offer a unit test: :attr:`MemoryKV.down` (every call
fails as if etcd were unreachable) and :meth:`MemoryKV.wipe` (etcd came back empty).
The same contract tests run against it and against a real etcd (tests/cluster/test_kv.py).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..errors import (
    ClusterUnavailableError,
    HistoryLostError,
    LeaseLostError,
    RevisionConflictError,
)
from .kv import KV, KeyValue, Snapshot, WatchEvent


@dataclass
class _Lease:
    ttl: int
    deadline: float
    keys: set[str] = field(default_factory=set)


class MemoryKV(KV):
    """etcd's data model in a dict. Create it inside the event loop that uses it."""

    def __init__(self) -> None:
        self._down = False
        self._revision = 1  # etcd's revision of an empty store
        self._data: dict[str, KeyValue] = {}
        self._history: list[WatchEvent] = []
        self._leases: dict[int, _Lease] = {}
        self._ids = itertools.count(0x1000)
        self._changed = asyncio.Event()
        self._generation = 0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def endpoints(self) -> str:
        return "memory"

    # -- switches for tests ---------------------------------------------------------

    @property
    def down(self) -> bool:
        """True: every call raises ClusterUnavailableError and watches wait, as when etcd is
        unreachable. Leases do not run out meanwhile (etcd extends them after an outage)."""
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        self._down = value
        if not value:
            now = time.monotonic()
            for lease in self._leases.values():
                lease.deadline = max(lease.deadline, now + lease.ttl)
            self._schedule()
        self._notify()

    def wipe(self) -> None:
        """Lose every key, lease and event, as an etcd replaced by an empty one."""
        self._revision = 1
        self._data.clear()
        self._history.clear()
        self._leases.clear()
        self._generation += 1
        self._notify()

    # -- internals ------------------------------------------------------------------

    def _check(self) -> None:
        if self._down:
            raise ClusterUnavailableError("etcd (memory) is down")
        self._expire()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _expire(self) -> None:
        if self._down:
            return
        now = time.monotonic()
        for lease_id in [i for i, lease in self._leases.items() if lease.deadline <= now]:
            self._drop_lease(lease_id)
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._leases:
            first = min(lease.deadline for lease in self._leases.values())
            delay = max(0.0, first - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _drop_lease(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id)
        if lease.keys:
            self._revision += 1
            for key in sorted(lease.keys):
                self._remove(key)
            self._notify()

    def _remove(self, key: str) -> None:
        old = self._data.pop(key)
        if old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        self._history.append(WatchEvent("delete", KeyValue(
            key=key, value=b"", create_revision=0, mod_revision=self._revision, version=0)))

    def _write(self, key: str, value: bytes, lease: int) -> int:
        if lease and lease not in self._leases:
            raise LeaseLostError(f"lease {lease:x} not found")
        self._revision += 1
        old = self._data.get(key)
        if old is not None and old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        kv = KeyValue(
            key=key, value=value,
            create_revision=old.create_revision if old else self._revision,
            mod_revision=self._revision,
            version=(old.version + 1) if old else 1,
            lease=lease,
        )
        self._data[key] = kv
        if lease:
            self._leases[lease].keys.add(key)
        self._history.append(WatchEvent("put", kv))
        self._notify()
        return self._revision

    # -- keys -----------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        self._check()
        return self._data.get(key)

    async def get_prefix(self, prefix: str) -> Snapshot:
        self._check()
        kvs = [self._data[k] for k in sorted(self._data) if k.startswith(prefix)]
        return Snapshot(kvs=kvs, revision=self._revision)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        self._check()
        return self._write(key, value, lease)

    async def put_if(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> int:
        self._check()
        current = self._data.get(key)
        actual = current.mod_revision if current else 0
        if actual != mod_revision:
            raise RevisionConflictError(key, mod_revision, actual)
        return self._write(key, value, lease)

    async def delete(self, key: str, *, mod_revision: int | None = None) -> bool:
        self._check()
        current = self._data.get(key)
        if current is None:
            return False
        if mod_revision is not None and current.mod_revision != mod_revision:
            raise RevisionConflictError(key, mod_revision, current.mod_revision)
        self._revision += 1
        self._remove(key)
        self._notify()
        return True

    async def watch(self, key: str, *, prefix: bool = False,
                    start_revision: int) -> AsyncIterator[WatchEvent]:
        generation = self._generation
        # History only grows until a wipe (which ends the watch), so an index is a cursor;
        # a revision is not: one revoke deletes several keys at one revision.
        cursor = bisect.bisect_left([e.revision for e in self._history], start_revision)
        while True:
            if generation != self._generation:
                raise HistoryLostError(f"watch on {key}: etcd (memory) lost its data",
                                       self._revision)
            changed = self._changed
            while not self.down and cursor < len(self._history):
                event = self._history[cursor]
                cursor += 1
                if event.kv.key == key or (prefix and event.kv.key.startswith(key)):
                    yield event
                if generation != self._generation:
                    break
            else:
                await changed.wait()

    # -- leases ---------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        self._check()
        lease_id = next(self._ids)
        self._leases[lease_id] = _Lease(ttl=ttl, deadline=time.monotonic() + ttl)
        self._schedule()
        return lease_id

    async def keep_alive(self, lease: int) -> int:
        self._check()
        if lease not in self._leases:
            raise LeaseLostError(f"lease {lease:x} is gone")
        entry = self._leases[lease]
        entry.deadline = time.monotonic() + entry.ttl
        self._schedule()
        return entry.ttl

    async def revoke_lease(self, lease: int) -> bool:
        self._check()
        if lease not in self._leases:
            return False
        self._drop_lease(lease)
        self._schedule()
        return True

    async def lease_ttl(self, lease: int) -> int | None:
        self._check()
        entry = self._leases.get(lease)
        return None if entry is None else max(0, round(entry.deadline - time.monotonic()))

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
