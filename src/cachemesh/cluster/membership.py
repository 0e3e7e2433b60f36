"""A node's place in the cluster: its lease-bound record, kept alive, and taken back.

Joining (:meth:`Membership.start`):

1. Lock the store (``identity.StoreLock``): one process per store.
2. Grant a lease of ``lease_ttl_s``.
3. Claim ``nodes/{name}`` (keys.py) with compare-and-put:
   - absent: create it, bound to the new lease;
   - held by the same node id (this store, restarted): take it over at the revision read,
     then revoke the old lease, which deletes whatever the old process left bound to it;
   - held by another node id: a live node has this name; refuse (NodeNameTakenError).
4. Read (or create) ``epoch``, to tell later whether etcd lost its data.

Running (one background task): renew the lease every ``lease_ttl_s / 3``; write the record
when it changed, at most once per ``RECORD_MIN_INTERVAL_S``, compare-and-put on the revision
last written. Faults, one rule each:

- etcd unreachable (or without a leader): the node carries on and reports itself
  **degraded** (:attr:`Membership.degraded`); it retries with a backoff capped at 2 s.
  When etcd answers again it claims its record once more (bringing back what changed
  meanwhile) and is active again.
- lease lost (it expired during a partition longer than the TTL, or etcd came back
  empty): join again with a new lease; :attr:`Membership.data_losses` counts the times the
  epoch changed, i.e. etcd lost its data, and listeners hear of every rejoin
  (:meth:`Membership.on_rejoin`) to write back what hung on the old lease.
- the name taken meanwhile by another node: stop trying, state ``refused``; the server
  exits (:meth:`Membership.wait_refused`).

Leaving (:meth:`Membership.stop`): revoke the lease; the record and every key bound to it go
at once, rather than a TTL later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .. import __version__
from ..config import Settings
from ..errors import (
    ClusterError,
    LeaseLostError,
    NodeNameTakenError,
    RevisionConflictError,
)
from .identity import StoreLock, node_id
from .keys import RECORD_MIN_INTERVAL_S, Keys
from .kv import KV, Backoff
from .records import NodeRecord, parse_each

log = logging.getLogger(__name__)


class State(StrEnum):
    JOINING = "joining"
    ACTIVE = "active"
    DEGRADED = "degraded"
    REFUSED = "refused"
    STOPPED = "stopped"


@dataclass(frozen=True)
class MembershipStatus:
    """What ``/api/v1/nodes``, readiness and metrics show of this node's membership."""

    name: str
    state: State
    lease: int
    degraded_since: float | None
    last_error: str | None
    rejoins: int
    data_losses: int
    etcd: str

    @property
    def degraded(self) -> bool:
        return self.state is State.DEGRADED


@dataclass(frozen=True)
class Rejoin:
    """Told to listeners after the node joined again under a new lease."""

    lease: int
    data_lost: bool


Listener = Callable[[Rejoin], Awaitable[None]]


class Membership:
    """Keeps this node's record in the cluster; see the module docstring."""

    def __init__(self, kv: KV, *, home: Path, name: str, advertise: str, lease_ttl_s: int = 10,
                 keys: Keys | None = None, record_interval_s: float = RECORD_MIN_INTERVAL_S,
                 **record: Any) -> None:
        self.kv = kv
        self.keys = keys or Keys()
        self.name = name
        self.ttl = lease_ttl_s
        self.record_interval_s = record_interval_s
        self._lock = StoreLock(home)
        now = time.time()
        self._record = NodeRecord(name=name, node_id=node_id(home), advertise=advertise,
                                  version=__version__, started_at=now, updated_at=now, **record)
        self._lease = 0
        self._written_rev = 0
        self._dirty = False
        self._last_write = 0.0
        self._epoch: str | None = None
        self._state = State.JOINING
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._degraded_since: float | None = None
        self._last_error: str | None = None
        self._rejoins = 0
        self._data_losses = 0
        self._listeners: list[Listener] = []
        self.renewals = 0  # lease keep-alives that succeeded (for metrics)
        self.errors = 0  # calls to etcd that failed (for metrics)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, kv: KV, settings: Settings, **record: Any) -> Membership:
        """A membership as ``cachemesh serve --cluster`` configures it (checks the token)."""
        cluster = settings.cluster
        cluster.check()
        return cls(kv, home=settings.home, name=cluster.name_or_host(),
                   advertise=cluster.advertise_url(settings.serve),
                   lease_ttl_s=cluster.lease_ttl_s, keys=Keys(cluster.prefix),
                   labels=dict(cluster.labels), **record)

    # -- what others read -----------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self._record.node_id

    @property
    def lease(self) -> int:
        """The current lease (0 while the node holds none); keys bound to it die with it."""
        return self._lease

    @property
    def state(self) -> State:
        return self._state

    @property
    def degraded(self) -> bool:
        return self._state is State.DEGRADED

    @property
    def record(self) -> NodeRecord:
        return self._record

    def status(self) -> MembershipStatus:
        return MembershipStatus(
            name=self.name, state=self._state, lease=self._lease,
            degraded_since=self._degraded_since, last_error=self._last_error,
            rejoins=self._rejoins, data_losses=self._data_losses, etcd=self.kv.endpoints)

    async def nodes(self) -> list[NodeRecord]:
        """Every live node's record, this one included, by name."""
        snapshot = await self.kv.get_prefix(self.keys.nodes)
        return parse_each(snapshot.kvs, NodeRecord, "node record")

    async def wait_state(self, *states: State) -> State:
        """Wait until the state is one of ``states``; returns it."""
        while self._state not in states:
            changed = self._changed
            await changed.wait()
        return self._state

    async def wait_refused(self) -> NodeNameTakenError:
        await self.wait_state(State.REFUSED)
        return NodeNameTakenError(self._last_error or f"node name {self.name!r} taken")

    def on_rejoin(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # -- what this node changes -------------------------------------------------------

    def update(self, **changes: Any) -> None:
        """Change fields of the record (memory, copies, draining, ...); written soon, at
        most once per ``record_interval_s``."""
        self._record = self._record.model_copy(update=changes)
        self._dirty = True
        self._wake.set()

    async def start(self) -> None:
        """Join, or raise: NodeNameTakenError (a live node has this name, or this store),
        ClusterUnavailableError (etcd cannot be reached)."""
        self._lock.acquire()
        try:
            await self._join()
        except BaseException:
            self._lock.release()
            raise
        self._set_state(State.ACTIVE)
        self._task = asyncio.create_task(self._run(), name=f"cluster-membership-{self.name}")

    async def stop(self) -> None:
        """Leave: the record and every key on the lease go at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._lease:
            try:
                await self.kv.revoke_lease(self._lease)
            except ClusterError as exc:  # etcd down: the lease runs out by itself
                log.warning("could not revoke lease %x on leaving: %s", self._lease, exc)
            self._lease = 0
        self._lock.release()
        self._set_state(State.STOPPED)

    # -- internals --------------------------------------------------------------------

    def _set_state(self, state: State, error: BaseException | None = None) -> None:
        if error is not None:
            self._last_error = str(error)
        if state is State.DEGRADED and self._degraded_since is None:
            self._degraded_since = time.time()
        if state is State.ACTIVE:
            self._degraded_since = None
        if state is not self._state:
            log.log(logging.WARNING if state is State.DEGRADED else logging.INFO,
                    "cluster node %s: %s -> %s%s", self.name, self._state.value, state.value,
                    f" ({error})" if error else "")
            self._state = state
            self._changed.set()
            self._changed = asyncio.Event()

    async def _join(self) -> None:
        lease = await self.kv.grant_lease(self.ttl)
        try:
            await self._claim(lease)
            await self._check_epoch()
        except BaseException:
            with contextlib.suppress(ClusterError):
                await self.kv.revoke_lease(lease)
            raise
        self._lease = lease

    async def _claim(self, lease: int) -> None:
        key = self.keys.node(self.name)
        for _ in range(5):
            current = await self.kv.get(key)
            if current is not None:
                self._refuse_unless_mine(current.value)
            record = self._record.model_copy(update={"updated_at": time.time()})
            self._dirty = False  # before the write: an update() during it marks it again
            try:
                self._written_rev = await self.kv.put_if(
                    key, record.to_bytes(), lease=lease,
                    mod_revision=current.mod_revision if current else 0)
            except RevisionConflictError:
                self._dirty = True
                continue  # someone wrote between our read and write: read again
            except BaseException:
                self._dirty = True
                raise
            self._last_write = time.monotonic()
            if current is not None and current.lease and current.lease != lease:
                # Our previous process's lease: revoking it drops what it left behind.
                await self.kv.revoke_lease(current.lease)
            return
        raise ClusterError(f"could not claim {key}: it keeps changing under us")

    def _refuse_unless_mine(self, value: bytes) -> None:
        try:
            other = NodeRecord.from_bytes(value)
        except ValidationError:
            other = None
        if other is not None and other.node_id == self.node_id:
            return
        where = f" at {other.advertise}" if other else ""
        raise NodeNameTakenError(
            f"node name {self.name!r} is taken by a live node{where} with another store;"
            " choose another --node-name, or stop that node (its record goes when it"
            " leaves, or when its lease runs out after it died)")

    async def _check_epoch(self) -> None:
        key = self.keys.epoch
        found = await self.kv.get(key)
        if found is None:
            with contextlib.suppress(RevisionConflictError):  # another node created it first
                await self.kv.put_if(key, uuid.uuid4().hex.encode(), mod_revision=0)
            found = await self.kv.get(key)
        epoch = found.value.decode() if found else None
        if self._epoch is not None and epoch != self._epoch:
            self._data_losses += 1
            log.warning("etcd at %s lost its data (epoch %s, was %s): re-registering",
                        self.kv.endpoints, epoch, self._epoch)
        self._epoch = epoch

    async def _write_record(self) -> None:
        record = self._record.model_copy(update={"updated_at": time.time()})
        self._dirty = False
        try:
            self._written_rev = await self.kv.put_if(
                self.keys.node(self.name), record.to_bytes(), lease=self._lease,
                mod_revision=self._written_rev)
        except RevisionConflictError:
            self._dirty = True
            await self._claim(self._lease)  # refuses if another node took the name
        except BaseException:
            self._dirty = True
            raise
        self._last_write = time.monotonic()

    async def _rejoin(self) -> None:
        losses = self._data_losses
        await self._join()
        self._rejoins += 1
        event = Rejoin(lease=self._lease, data_lost=self._data_losses > losses)
        for listener in list(self._listeners):
            try:
                await listener(event)
            except Exception:  # one listener's failure must not stop the node's membership
                log.exception("a cluster rejoin listener failed")

    async def _run(self) -> None:
        backoff = Backoff(cap=2.0)
        interval = self.ttl / 3
        next_renewal = time.monotonic() + interval
        while True:
            try:
                if not self._lease:
                    await self._rejoin()
                    next_renewal = time.monotonic() + interval
                    self._set_state(State.ACTIVE)
                if time.monotonic() >= next_renewal:
                    await self.kv.keep_alive(self._lease)
                    self.renewals += 1
                    next_renewal = time.monotonic() + interval
                    if self._state is State.DEGRADED:
                        await self._claim(self._lease)  # bring back what changed meanwhile
                        await self._check_epoch()
                        self._set_state(State.ACTIVE)
                if self._dirty and time.monotonic() >= self._last_write + self.record_interval_s:
                    await self._write_record()
                backoff.reset()
            except NodeNameTakenError as exc:
                if self._lease:
                    with contextlib.suppress(ClusterError):
                        await self.kv.revoke_lease(self._lease)
                self._lease = 0
                self._set_state(State.REFUSED, exc)
                return
            except LeaseLostError as exc:
                self.errors += 1
                self._lease = 0
                self._set_state(State.DEGRADED, exc)
                await asyncio.sleep(backoff.next())
                continue
            except ClusterError as exc:
                self.errors += 1
                self._set_state(State.DEGRADED, exc)
                next_renewal = 0.0  # on return, renew first
                await asyncio.sleep(backoff.next())
                continue
            self._wake.clear()  # before reading _dirty, so that no update() is missed
            wake_at = next_renewal
            if self._dirty:
                wake_at = min(wake_at, self._last_write + self.record_interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, wake_at - time.monotonic()))
