"""The data caches' side of cluster mode on a server: what this node offers its peers in
the blob index, and (``preheat.py`` beside it) the caches declared cluster-wide.

In the background from start, and again after each new lease (etcd lost it, or a
partition outlived it), the server announces every blob of its store as held
(``blobs/{sha256}/{node}``, on its node lease: the server is what serves them, so the
entries live and die with it). Pulls write their own entries as they go
(``fetch/etcd_peers.py``). Every :data:`RECONCILE_S` the server lists its store again
(a scan of ``blobs/``, no etcd read): a blob gone since (removed, collected by gc) is
withdrawn, so peers stop asking for it; one that appeared without its entry (a pull
whose write failed) is announced.

The node's membership (its lease-bound record, ``cluster/membership.py``) is the one the
server already holds when ``serve --cluster`` runs it (``ModelService.cluster``); where
the server has none, this module joins the cluster itself with the same settings, so that
a node started with ``CACHEMESH_CLUSTER`` alone takes part in the peer-to-peer half.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from ...cluster.blob_index import BlobIndex
from ...cluster.keys import Keys
from ...errors import ClusterError

if TYPE_CHECKING:
    from ...caches import Caches
    from ...cluster.kv import KV
    from ...cluster.membership import Membership, Rejoin
    from ...config import Settings
    from .datacache_service import DataCacheService

log = logging.getLogger(__name__)

# Seconds between two comparisons of the store's blobs with what this node announced.
RECONCILE_S = 5.0


class DataCacheCluster:
    """This server in the blob index (see the module docstring)."""

    def __init__(self, caches: Caches, settings: Settings, kv: KV, keys: Keys,
                 membership: Membership, *, owned: bool) -> None:
        self.caches = caches
        self.settings = settings
        self.kv = kv
        self.keys = keys
        self.membership = membership
        self.name = membership.name
        self.index = BlobIndex(kv, keys)
        self._owned = owned  # this module joined the cluster: it leaves it too
        self.preheat: Any = None
        self._announced: dict[str, int] = {}  # sha256 -> size, as of the last reconcile
        self._announced_lease = 0
        self._reconciler: asyncio.Task[None] | None = None

    @property
    def advertise(self) -> str:
        return self.membership.record.advertise

    async def start(self) -> None:
        self.membership.on_rejoin(self._rejoined)
        self._reconciler = asyncio.create_task(self._reconcile(), name="cachemesh-blob-index")
        from .preheat import Preheat

        self.preheat = Preheat(self)
        await self.preheat.start()

    async def stop(self) -> None:
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        if self.preheat is not None:
            await self.preheat.stop()
        if self._owned:
            await self.membership.stop()
            await self.kv.close()

    async def reconcile_once(self) -> tuple[int, int]:
        """Announce the blobs not announced on the current lease, withdraw those gone;
        returns (announced, withdrawn)."""
        lease = self.membership.lease
        if not lease:
            return 0, 0
        blobs = {sha: size for sha, size in
                 (await asyncio.to_thread(self.caches.store.blobs.files_on_disk)).items()
                 if _is_sha256(sha)}  # not a stray file under blobs/
        if lease != self._announced_lease:  # a new lease: the old one took every entry
            self._announced, self._announced_lease = {}, lease
        new = sorted((sha, size) for sha, size in blobs.items() if sha not in self._announced)
        gone = sorted(sha for sha in self._announced if sha not in blobs)
        announced = withdrawn = 0
        try:
            for sha, size in new:
                await self.index.announce_all(self.name, self.advertise, lease, [(sha, size)])
                self._announced[sha] = size
                announced += 1
            for sha in gone:
                await self.index.withdraw(sha, self.name)
                del self._announced[sha]
                withdrawn += 1
        except ClusterError as exc:
            log.info("the blob index: %s (again in %g s)", exc, RECONCILE_S)
        if announced or withdrawn:
            log.info("blob index: %d announced, %d withdrawn", announced, withdrawn)
        return announced, withdrawn

    async def _reconcile(self) -> None:
        while True:
            await self.reconcile_once()
            await asyncio.sleep(RECONCILE_S)

    async def _rejoined(self, event: Rejoin) -> None:
        await self.reconcile_once()
        if self.preheat is not None:
            try:
                await self.preheat.resync()
            except ClusterError as exc:
                log.info("preheat entries after a new lease: %s", exc)


def _is_sha256(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


async def start_cluster(service: Any, datacaches: DataCacheService) -> DataCacheCluster | None:
    """The data caches' cluster half of a server, or None when cluster mode is off; set
    as ``datacaches.cluster`` once started."""
    caches = datacaches.caches
    settings: Settings = service.settings
    if not settings.cluster.enabled:
        return None
    context = getattr(service, "cluster", None)
    if context is not None:  # serve --cluster joined already (serve/cluster/cluster_mode.py)
        node = DataCacheCluster(caches, settings, context.kv, context.keys,
                                context.membership, owned=False)
    else:
        from ...cluster.etcd import EtcdKV
        from ...cluster.membership import Membership

        kv = EtcdKV.from_settings(settings.cluster)
        membership = Membership.from_settings(kv, settings)
        try:
            await membership.start()
        except BaseException:
            await kv.close()
            raise
        node = DataCacheCluster(caches, settings, kv, Keys(settings.cluster.prefix),
                                membership, owned=True)
    try:
        await node.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await node.stop()
        raise
    node.preheat.service = datacaches
    datacaches.cluster = node
    return node
