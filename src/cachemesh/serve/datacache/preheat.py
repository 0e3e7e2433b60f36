"""Preheat: data caches declared cluster-wide, pulled onto the nodes they name.

The declaration and each node's progress live in etcd (``cluster/cache_decls.py`` draws
the keys). On a server in cluster mode, :class:`Preheat`:

- takes declarations (:meth:`declare`, from ``POST /api/v1/datacaches`` or ECI's
  CreateDataCache with ``nodes``/``Nodes``): the whole declaration is checked here first
  (the local checks of DataCacheService: names, source, protected buckets), then written
  create-if-absent; the same declaration again, on any node, is accepted (2xx), another
  one under the name is a conflict (409);
- follows ``caches/`` (read at start, then watched from the revision read: a node that
  joins later sees every declaration), and pulls each one that selects this node through
  the server's own pull queue (DataCacheService.create: the pull child finds peers
  through the blob index, so N nodes cost the origin about one copy);
- writes its progress to ``prewarm/{cache}/{node}`` on its node lease (state changes at
  once, progress at most every PREWARM_INTERVAL_S), and reads everyone's for the API.

A removed declaration stops nothing already pulled here: the cache stays until it is
removed or evicted like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from typing import TYPE_CHECKING, Any

from ...caches import AVAILABLE, FAILED, CacheSpec
from ...cluster.cache_decls import (
    PREWARM_INTERVAL_S,
    PREWARM_LOOK_S,
    CacheDecl,
    NodesSpec,
    PrewarmRecord,
    pick_nodes,
)
from ...errors import (
    CachemeshError,
    CacheNotFoundError,
    ClusterError,
    ConflictError,
    HistoryLostError,
    RevisionConflictError,
)

if TYPE_CHECKING:
    from .datacache_cluster import DataCacheCluster
    from .datacache_service import DataCacheService

log = logging.getLogger(__name__)


class Preheat:
    """Cluster-wide caches on this node (see the module docstring)."""

    def __init__(self, node: DataCacheCluster) -> None:
        self.node = node
        self.kv = node.kv
        self.keys = node.keys
        self.me = node.name
        self.service: DataCacheService | None = None  # the server's, set by the app
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._follow: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.node.membership.update(disk_free_bytes=self._free_disk())
        self._follow = asyncio.create_task(self._follow_decls(), name="cachemesh-preheat")

    async def stop(self) -> None:
        tasks = [t for t in (self._follow, *self._tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    def _free_disk(self) -> int:
        try:
            return shutil.disk_usage(self.node.caches.store.home).free
        except OSError:
            return 0

    # -- declaring ------------------------------------------------------------------------

    async def declare(self, spec: CacheSpec, nodes: NodesSpec,
                      min_copies: int | None) -> CacheDecl:
        """Write the declaration (idempotent); returns the one in force."""
        key = self.keys.cache(spec.name)
        assigned = None
        if isinstance(nodes, int):
            live = await self.node.membership.nodes()
            free = {r.name: r.disk_free_bytes or 0 for r in live}
            assigned = pick_nodes(live, nodes, free)
        decl = CacheDecl(name=spec.name, spec=spec.model_dump(), nodes=nodes,
                         assigned=assigned, min_copies=min_copies, declared_by=self.me,
                         declared_at=time.time())
        try:
            await self.kv.put_if(key, decl.to_bytes(), mod_revision=0)
            return decl
        except RevisionConflictError:
            pass
        found = await self.kv.get(key)
        if found is None:  # removed meanwhile: take it again
            return await self.declare(spec, nodes, min_copies)
        current = CacheDecl.from_bytes(found.value)
        if not current.same_as(decl):
            raise ConflictError(
                f"cache {spec.name!r} is declared cluster-wide with another spec (by"
                f" {current.declared_by}); remove it first, or declare it as it is")
        return current

    def declare_sync(self, spec: CacheSpec, nodes: NodesSpec,
                     min_copies: int | None) -> CacheDecl:
        """:meth:`declare` from a thread of the server (the API's handlers)."""
        return self._sync(self.declare(spec, nodes, min_copies))

    def undeclare_sync(self, name: str) -> bool:
        """Remove the cluster-wide declaration (nodes keep what they pulled)."""
        return bool(self._sync(self.kv.delete(self.keys.cache(name))))

    async def resync(self) -> None:
        """After a new lease (the entries on the old one are gone): report every
        declaration that selects this node again."""
        snapshot = await self.kv.get_prefix(f"{self.keys.prefix}caches/")
        for kv in snapshot.kvs:
            self._consider(kv.value)

    async def declaration(self, name: str) -> CacheDecl | None:
        found = await self.kv.get(self.keys.cache(name))
        return CacheDecl.from_bytes(found.value) if found else None

    async def progress(self, name: str) -> dict[str, dict[str, Any]]:
        """Every node's entry for the cache: ``{node: {state, progress, ...}}``."""
        under = self.keys.prewarm(name, "x")[:-1]
        snapshot = await self.kv.get_prefix(under)
        out = {}
        for kv in snapshot.kvs:
            try:
                record = PrewarmRecord.from_bytes(kv.value)
            except ValueError:
                continue
            out[record.node] = record.model_dump(exclude={"node"})
        return out

    async def expected(self, decl: CacheDecl) -> list[str]:
        """The nodes that should pull ``decl`` now: those it names or was assigned, or,
        for ``all``, every live node."""
        if decl.nodes == "all":
            return sorted(r.name for r in await self.node.membership.nodes())
        if isinstance(decl.nodes, list):
            return sorted(decl.nodes)
        return sorted(decl.assigned or [])

    def cluster_view_sync(self, name: str) -> dict[str, Any] | None:
        """For GET and the event stream: the declaration, each node's progress, the nodes
        expected and whether every one of them is done (Available or Failed); None if
        not declared."""
        async def view() -> dict[str, Any] | None:
            decl = await self.declaration(name)
            if decl is None:
                return None
            nodes, expected = await self.progress(name), await self.expected(decl)
            done = all(nodes.get(n, {}).get("state") in (AVAILABLE, FAILED) for n in expected)
            return {"declaration": decl, "nodes": nodes, "expected": expected, "done": done}
        return self._sync(view())

    def _sync(self, coro: Any) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    # -- following ------------------------------------------------------------------------

    async def _follow_decls(self) -> None:
        prefix = f"{self.keys.prefix}caches/"
        while True:
            try:
                snapshot = await self.kv.get_prefix(prefix)
                for kv in snapshot.kvs:
                    self._consider(kv.value)
                watch = self.kv.watch(prefix, prefix=True, start_revision=snapshot.revision + 1)
                async with contextlib.aclosing(watch) as events:
                    async for event in events:
                        if event.kind == "put":
                            self._consider(event.kv.value)
            except HistoryLostError:
                continue  # read the prefix again
            except ClusterError as exc:
                log.info("following cluster-wide caches: %s", exc)
                await asyncio.sleep(1.0)

    def _consider(self, value: bytes) -> None:
        try:
            decl = CacheDecl.from_bytes(value)
        except ValueError:
            log.warning("ignoring a malformed cluster-wide cache declaration")
            return
        if not decl.selects(self.me):
            return
        running = self._tasks.get(decl.name)
        if running is not None and not running.done():
            return
        self._tasks[decl.name] = asyncio.create_task(self._pull(decl),
                                                     name=f"cachemesh-preheat-{decl.name}")

    async def _pull(self, decl: CacheDecl) -> None:
        """Declare the cache here (the server pulls it) and report until it is final."""
        while self.service is None:  # the app sets it right after the start
            await asyncio.sleep(0.05)
        service = self.service
        try:
            spec = CacheSpec(**decl.spec)
            await asyncio.to_thread(service.create, spec)
        except CachemeshError as exc:
            await self._report(decl.name, PrewarmRecord(node=self.me, state="Failed",
                                                        error=str(exc)))
            return
        last: PrewarmRecord | None = None
        written = 0.0
        while True:
            try:
                info = await asyncio.to_thread(service.current, decl.name)
            except CacheNotFoundError:
                return  # removed here meanwhile
            p = info.progress
            total = p.bytes_total
            record = PrewarmRecord(
                node=self.me, state=info.status if info.status in (
                    "Pending", "Loading", AVAILABLE, FAILED) else "Pending",
                progress=1.0 if info.status == AVAILABLE else (
                    min(1.0, p.bytes_done / total) if total else 0.0),
                bytes_done=p.bytes_done, bytes_total=total, error=info.error)
            now = time.monotonic()
            if last is None or record.state != last.state or (
                    record.bytes_done != last.bytes_done and now - written >= PREWARM_INTERVAL_S):
                await self._report(decl.name, record)
                last, written = record, now
            if info.status in (AVAILABLE, FAILED):
                self.node.membership.update(disk_free_bytes=self._free_disk())
                return
            await asyncio.sleep(PREWARM_LOOK_S)

    async def _report(self, cache: str, record: PrewarmRecord) -> None:
        lease = self.node.membership.lease
        if not lease:
            return
        record = record.model_copy(update={"updated_at": time.time()})
        try:
            await self.kv.put(self.keys.prewarm(cache, self.me), record.to_bytes(), lease=lease)
        except ClusterError as exc:
            log.info("writing the preheat progress of %s: %s", cache, exc)
