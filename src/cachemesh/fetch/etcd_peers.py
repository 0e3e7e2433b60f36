"""Peers found through the cluster's blob index in etcd (cluster mode's :class:`Peers`).

The index and its keys are ``cluster/blob_index.py``; this module puts them behind the
fetcher's synchronous interface. One asyncio loop on a daemon thread holds the etcd
client; the fetcher's threads call into it and wait (at most ``CALL_TIMEOUT_S``).

Which process writes what, on which lease:

- The node's server (``cachemesh serve --cluster``) holds the node's lease (its
  membership, ``nodes/{node}``). Holder entries (``blobs/{sha256}/{node}``) hang on it:
  the server is what serves the blob to peers, so an entry lives as long as the server
  does. A pull process (``cachemesh pull`` beside the server, or the server's own pull
  child) reads that lease, and the node's advertise URL, from the node's record.
- The pull process takes a lease of its own (``lease_ttl_s``, kept alive here) for its
  claims (``fetching/{sha256}``): a pull that dies frees its claims within a TTL, while
  the server, which may live on, keeps what landed on offer.
- Without a node record (no server runs here) the process only reads the index: it
  takes pieces from peers and claims origin fetches, but offers nothing.

Faults: etcd unreachable makes every call here fail fast (for :data:`DOWN_S` after a
failure, without asking); the fetcher then behaves as without an index (no new
candidates; the origin once etcd has failed for :data:`DEGRADED_GRACE_S`), so a pull
never waits on etcd ("degrade, don't die"), and one lost call does not send every node
to the origin.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..cluster.blob_index import (
    HOLDER_INTERVAL_S,
    BlobIndex,
    HolderRecord,
    OriginRecord,
    PieceRecord,
)
from ..cluster.keys import Keys
from ..cluster.records import NodeRecord
from ..errors import ClusterError, ClusterUnavailableError, IntegrityError, LeaseLostError
from .peers import Peer, Peers, PeerState
from .pieces import PieceList

if TYPE_CHECKING:
    from ..cluster.kv import KV
    from ..config import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
_SHARED: dict[tuple[object, ...], EtcdPeers] = {}
_SHARED_LOCK = threading.Lock()

# Longest wait for one etcd call from a fetcher's thread.
CALL_TIMEOUT_S = 5.0
# How long an answer about a blob's holders, or someone else's claim, is reused.
CANDIDATES_TTL_S = 0.3
CLAIM_RETRY_S = 0.3
# Landed ranges written in a holder entry at most (the rest: the peer's watch stream).
MAX_RANGES = 64
# After a failed call, etcd is not asked again for this long.
DOWN_S = 2.0
# With etcd unreachable this long (every call failing), a node fetches what no peer has
# from the origin itself: one failed call must not send a whole fleet there.
DEGRADED_GRACE_S = 2.0


class EtcdPeers(Peers):
    """The blob index as the fetcher's :class:`Peers` (see the module docstring)."""

    def __init__(self, me: str, keys: Keys, make_kv: Any, *, lease_ttl_s: int = 10) -> None:
        """``make_kv()`` builds the :class:`KV` inside this object's loop (an httpx client
        belongs to the loop it was made in)."""
        self.me = me
        self.keys = keys
        self.ttl = lease_ttl_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="cachemesh-etcd-peers")
        self._thread.start()
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._failing_since: float | None = None  # etcd unreachable since (monotonic)
        self.kv: KV = self._call(_made(make_kv))
        self.index = BlobIndex(self.kv, keys)
        self._own_lease = 0
        self._keeper: asyncio.Task[None] | None = None
        self._claimed: set[str] = set()
        self._claimant: dict[str, tuple[float, str | None]] = {}
        self._candidates: dict[str, tuple[float, list[Peer]]] = {}
        self._last_landed: dict[str, float] = {}
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> EtcdPeers:
        """One per process and cluster (one lease, one loop), shared by every fetcher of
        the process and closed when it exits."""
        from ..cluster.etcd import EtcdKV

        cluster = settings.cluster
        key = (cluster.endpoints, cluster.prefix, cluster.name_or_host())
        with _SHARED_LOCK:
            found = _SHARED.get(key)
            if found is None or found._closed:
                found = _SHARED[key] = cls(
                    cluster.name_or_host(), Keys(cluster.prefix),
                    lambda: EtcdKV.from_settings(cluster, timeout=CALL_TIMEOUT_S - 1),
                    lease_ttl_s=cluster.lease_ttl_s)
                atexit.register(found.close)
            return found

    # -- the loop ---------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT_S) -> T:
        """Run ``coro`` on the loop and wait. After a failure, calls fail at once for
        :data:`DOWN_S`, so that an unreachable etcd costs a fetch one timeout, not one
        per question."""
        if time.monotonic() < self._down_until:
            coro.close()
            raise ClusterUnavailableError("etcd did not answer a moment ago")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            result = future.result(timeout)
        except TimeoutError as exc:
            future.cancel()
            self._unavailable()
            raise ClusterUnavailableError(f"etcd did not answer in {timeout} s") from exc
        except ClusterUnavailableError:
            self._unavailable()
            raise
        self._failing_since = None
        return result

    def _unavailable(self) -> None:
        now = time.monotonic()
        self._down_until = now + DOWN_S
        if self._failing_since is None:
            self._failing_since = now

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` on the loop without waiting (writes nobody must wait for)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        future.add_done_callback(_log_failure)

    def close(self) -> None:
        """Give back the claims and the process's lease, and stop the loop."""
        if self._closed:
            return
        self._closed = True
        self._down_until = 0.0  # one last try: give the lease back
        with contextlib.suppress(ClusterError, RuntimeError):
            self._call(self._close(), timeout=3.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
        if self._own_lease:  # its claims go with it
            with contextlib.suppress(ClusterError):
                await self.kv.revoke_lease(self._own_lease)
        await self.kv.close()

    # -- leases and this node's record ------------------------------------------------

    async def _lease(self) -> int:
        """This process's lease for claims, granted on first use and kept alive."""
        if not self._own_lease:
            self._own_lease = await self.kv.grant_lease(self.ttl)
            if self._keeper is None or self._keeper.done():
                self._keeper = asyncio.get_running_loop().create_task(self._keep_alive())
        return self._own_lease

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            lease = self._own_lease
            if not lease:
                return
            try:
                await self.kv.keep_alive(lease)
            except LeaseLostError:
                log.warning("lease %x of this pull expired: its origin claims are gone", lease)
                self._own_lease = 0
                self._claimed.clear()
                return
            except ClusterError as exc:
                log.warning("cannot renew lease %x: %s", lease, exc)

    async def _node(self) -> tuple[int, str] | None:
        """The node's lease and advertise URL, from the record its server keeps."""
        found = await self.kv.get(self.keys.node(self.me))
        if found is None or not found.lease:
            return None
        try:
            return found.lease, NodeRecord.from_bytes(found.value).advertise
        except ValueError:
            return None

    # -- Peers: who may have it, who goes to the origin --------------------------------

    def candidates(self, sha256: str) -> Sequence[Peer]:
        now = time.monotonic()
        with self._lock:
            cached = self._candidates.get(sha256)
        if cached is not None and now - cached[0] < CANDIDATES_TTL_S:
            return cached[1]
        try:
            holders = self._call(self.index.holders(sha256))
        except ClusterError as exc:
            log.debug("no holders of %s from etcd: %s", sha256, exc)
            holders = []
        peers = [Peer(h.node, h.url) for h in holders if h.node != self.me]
        with self._lock:
            self._candidates[sha256] = (now, peers)
        return peers

    def origin_turn(self, sha256: str, seen: Mapping[str, PeerState], waited_s: float) -> bool:
        if sha256 in self._claimed:
            return True
        now = time.monotonic()
        with self._lock:
            cached = self._claimant.get(sha256)
        if cached is not None and now - cached[0] < CLAIM_RETRY_S:
            return False
        try:
            who = self._call(self._claim(sha256))
        except ClusterUnavailableError as exc:
            # Degrade, don't die: without etcd for a while, fetch what no peer has.
            log.debug("cannot claim %s: %s", sha256, exc)
            since = self._failing_since
            return since is not None and time.monotonic() - since >= DEGRADED_GRACE_S
        except ClusterError as exc:  # etcd answered, but not as expected: ask again soon
            log.warning("cannot claim %s: %s", sha256, exc)
            with self._lock:
                self._claimant[sha256] = (now, None)
            return False
        with self._lock:
            self._claimant[sha256] = (now, who)
        return who == self.me

    async def _claim(self, sha256: str) -> str | None:
        try:
            who = await self.index.claim(sha256, self.me, await self._lease())
        except LeaseLostError:  # expired before the keeper noticed: a new one, once
            self._own_lease = 0
            self._claimed.clear()
            who = await self.index.claim(sha256, self.me, await self._lease())
        if who == self.me:
            self._claimed.add(sha256)
        return who

    def seed(self, sha256: str, fetching: Iterable[str]) -> str | None:
        with self._lock:
            cached = self._claimant.get(sha256)
        who = cached[1] if cached is not None else None
        return who if who and who != self.me else None

    # -- Peers: what this node tells the others ------------------------------------------

    def started(self, sha256: str, size: int) -> None:
        self._last_landed[sha256] = time.monotonic()
        self._spawn(self._announce(sha256, "fetching", size, []))

    def landed(self, sha256: str, size: int, ranges: Sequence[tuple[int, int]]) -> None:
        now = time.monotonic()
        if now - self._last_landed.get(sha256, 0.0) < HOLDER_INTERVAL_S:
            return
        self._last_landed[sha256] = now
        self._spawn(self._announce(sha256, "fetching", size, list(ranges)))

    def finished(self, sha256: str, size: int, *, ok: bool,
                 pieces: PieceList | None = None) -> None:
        self._last_landed.pop(sha256, None)
        try:
            self._call(self._finish(sha256, size, ok, pieces))
        except ClusterError as exc:
            log.warning("could not record the end of the fetch of %s in etcd: %s", sha256, exc)

    async def _announce(self, sha256: str, state: str, size: int,
                        ranges: list[tuple[int, int]]) -> None:
        node = await self._node()
        if node is None:
            return  # no server here to offer it
        lease, url = node
        ranges = ranges[:MAX_RANGES]  # a summary: the peer's watch stream has them all
        await self.index.announce(sha256, HolderRecord(
            node=self.me, url=url, state=state, size=size,
            landed=sum(e - s for s, e in ranges), ranges=ranges), lease)

    async def _finish(self, sha256: str, size: int, ok: bool, pieces: PieceList | None) -> None:
        if ok:
            await self._announce(sha256, "held", size, [(0, size)])
            if pieces is not None and sha256 in self._claimed:
                await self.index.record_pieces(sha256, PieceRecord(
                    size=pieces.size, piece_size=pieces.piece_size, digests=pieces.digests,
                    node=self.me))
        if sha256 in self._claimed:
            self._claimed.discard(sha256)
            await self.index.release(sha256, self.me)

    def claimed(self, sha256: str) -> bool:
        """Whether this process fetched (some of) the blob from its origin."""
        return sha256 in self._claimed

    # -- origins and pieces -------------------------------------------------------------

    def resolve(self, identity: str, size: int) -> OriginRecord | None:
        try:
            found = self._call(self.index.origin(identity))
        except ClusterError as exc:
            log.debug("no origin mapping from etcd: %s", exc)
            return None
        return found if found is not None and found.size == size else None

    def record_origin(self, identity: str, sha256: str, size: int,
                      checked: Sequence[str]) -> None:
        record = OriginRecord(sha256=sha256, size=size, checked=tuple(checked), node=self.me,
                              at=time.time())
        try:
            self._call(self.index.record_origin(identity, record))
        except ClusterError as exc:
            log.warning("could not record an origin mapping in etcd: %s", exc)

    def piece_list(self, sha256: str, size: int) -> PieceList | None:
        try:
            found = self._call(self.index.pieces(sha256))
        except ClusterError:
            return None
        if found is None or found.size != size:
            return None
        try:
            return PieceList(sha256, found.size, found.piece_size, found.digests)
        except (ValueError, IntegrityError):  # a malformed record
            return None


async def _made(make_kv: Any) -> KV:
    kv: KV = make_kv()
    return kv


def _log_failure(future: Any) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        log.warning("a write to the blob index failed: %s", exc)
