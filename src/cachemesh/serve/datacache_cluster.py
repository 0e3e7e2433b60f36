"""The data caches' side of cluster mode on a server: what this node offers its peers in
the blob index, and (``preheat.py`` beside it) the caches declared cluster-wide.

On start, and again after each new lease (etcd lost it, or a partition outlived it), the
server announces every blob of its store as held (``blobs/{sha256}/{node}``, on its node
lease: the server is what serves them, so the entries live and die with it). Pulls write
their own entries as they go (``fetch/etcd_peers.py``).

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

from ..cluster.blob_index import BlobIndex
from ..cluster.keys import Keys
from ..errors import ClusterError

if TYPE_CHECKING:
    from ..caches import Caches
    from ..cluster.kv import KV
    from ..cluster.membership import Membership, Rejoin
    from ..config import Settings
    from .datacache_service import DataCacheService

log = logging.getLogger(__name__)


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

    @property
    def advertise(self) -> str:
        return self.membership.record.advertise

    async def start(self) -> None:
        self.membership.on_rejoin(self._rejoined)
        await self.announce_store()
        from .preheat import Preheat

        self.preheat = Preheat(self)
        await self.preheat.start()

    async def stop(self) -> None:
        if self.preheat is not None:
            await self.preheat.stop()
        if self._owned:
            await self.membership.stop()
            await self.kv.close()

    async def announce_store(self) -> int:
        """Every blob of the store, as held by this node, on its current lease."""
        lease = self.membership.lease
        if not lease:
            return 0
        blobs = await asyncio.to_thread(self.caches.store.blobs.files_on_disk)
        try:
            n = await self.index.announce_all(self.name, self.advertise, lease,
                                              sorted(blobs.items()))
        except ClusterError as exc:
            log.warning("could not announce this node's %d blobs: %s", len(blobs), exc)
            return 0
        log.info("announced %d blobs to the cluster's blob index", n)
        return n

    async def _rejoined(self, event: Rejoin) -> None:
        await self.announce_store()


async def start_cluster(service: Any, datacaches: DataCacheService) -> DataCacheCluster | None:
    """The data caches' cluster half of a server, or None when cluster mode is off; set
    as ``datacaches.cluster`` once started."""
    caches = datacaches.caches
    settings: Settings = service.settings
    if not settings.cluster.enabled:
        return None
    context = getattr(service, "cluster", None)
    if context is not None:  # serve --cluster joined already (serve/cluster_mode.py)
        node = DataCacheCluster(caches, settings, context.kv, context.keys,
                                context.membership, owned=False)
    else:
        from ..cluster.etcd import EtcdKV
        from ..cluster.membership import Membership

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
