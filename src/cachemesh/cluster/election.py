"""A leader among the nodes, for cluster-wide housekeeping (reaping, scaling copies).

Built on etcd's own primitives, as etcd's ``concurrency`` package does it, never on a
protocol of ours: each node stands by putting ``leader/{lease}`` (keys.py) bound to its
lease, create-if-absent. Candidates are ordered by the key's create revision, which etcd
assigns once and never reuses; the first one leads. Every other candidate watches the
deletion of the candidate just before it (not of the leader: a hundred nodes do not all
wake when one goes), then reads again. A leader whose node dies loses its key when the
lease runs out (``lease_ttl_s``), and the next candidate leads.

A node that is not active in the cluster (degraded: etcd unreachable) does not act as
leader: it cannot know whether its lease still holds, and the housekeeping needs etcd
anyway. Its key stays, so it leads again without losing its place if etcd returns before
its lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..errors import ClusterError, RevisionConflictError
from .kv import Backoff
from .membership import Membership, State
from .records import Candidate

log = logging.getLogger(__name__)


class Election:
    """Stands this node for leader while its membership is active."""

    def __init__(self, membership: Membership) -> None:
        self.membership = membership
        self.kv = membership.kv
        self.keys = membership.keys
        self._leader = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        return self._leader

    async def leader(self) -> Candidate | None:
        """The candidate that leads now, as etcd sees it (None: no candidate)."""
        snapshot = await self.kv.get_prefix(self.keys.leader)
        if not snapshot.kvs:
            return None
        first = min(snapshot.kvs, key=lambda kv: kv.create_revision)
        return Candidate.from_bytes(first.value)

    async def wait_leader(self, value: bool = True) -> None:
        """Wait until this node leads (``value`` True) or does not."""
        while self._leader is not value:
            changed = self._changed
            await changed.wait()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster-election")

    async def stop(self) -> None:
        """Stop standing, and resign at once if leading (the next candidate takes over)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        lease = self.membership.lease
        if lease:
            with contextlib.suppress(ClusterError):
                await self.kv.delete(self.keys.candidate(lease))
        self._set(False)

    def _set(self, leader: bool) -> None:
        if leader is not self._leader:
            log.info("cluster node %s %s", self.membership.name,
                     "leads now" if leader else "no longer leads")
            self._leader = leader
            self._changed.set()
            self._changed = asyncio.Event()

    async def _run(self) -> None:
        backoff = Backoff(cap=2.0)
        while True:
            await self.membership.wait_state(State.ACTIVE)
            try:
                await self._campaign(self.membership.lease)
                backoff.reset()
            except ClusterError as exc:
                log.info("leader election: %s", exc)
                self._set(False)
                await asyncio.sleep(backoff.next())
                continue
            self._set(False)
            # Not active any more (or our key is gone): wait for the membership to move.
            if self.membership.state is State.ACTIVE:
                await asyncio.sleep(backoff.next())

    async def _campaign(self, lease: int) -> None:
        """Stand under ``lease``; return when the node is not active or the key is gone."""
        if not lease:
            return
        key = self.keys.candidate(lease)
        value = Candidate(name=self.membership.name, node_id=self.membership.node_id)
        with contextlib.suppress(RevisionConflictError):  # already standing under this lease
            await self.kv.put_if(key, value.to_bytes(), mod_revision=0, lease=lease)
        while self.membership.state is State.ACTIVE and self.membership.lease == lease:
            snapshot = await self.kv.get_prefix(self.keys.leader)
            mine = next((kv for kv in snapshot.kvs if kv.key == key), None)
            if mine is None:
                return  # the lease went, and the key with it
            ahead = [kv for kv in snapshot.kvs if kv.create_revision < mine.create_revision]
            self._set(not ahead)
            watched = max(ahead, key=lambda kv: kv.create_revision).key if ahead else key
            await self._until_deleted(watched, snapshot.revision + 1)

    async def _until_deleted(self, key: str, revision: int) -> None:
        """Until ``key`` is deleted or the membership stops being active."""

        async def deleted() -> None:
            async with contextlib.aclosing(self.kv.watch(key, start_revision=revision)) as events:
                async for event in events:
                    if event.kind == "delete":
                        return

        watch = asyncio.create_task(deleted())
        inactive = asyncio.create_task(self.membership.wait_state(
            State.DEGRADED, State.REFUSED, State.STOPPED, State.JOINING))
        try:
            await asyncio.wait({watch, inactive}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            inactive.cancel()
            await asyncio.gather(watch, inactive, return_exceptions=True)
        error = None if watch.cancelled() else watch.exception()
        if error is not None:
            raise error
