"""min_copies: eviction keeps a cluster-wide minimum of a cache's copies.

A cache declared cluster-wide with ``min_copies: K`` (``cluster/cache_decls.py``) is not
evicted from this node while at most K live nodes hold it Available, this one among
them: evicting it would leave fewer than K. "Holding" is read from the index in etcd,
``prewarm/{cache}/{node}`` entries in state Available, which hang on their nodes' leases
(a dead node's copy does not count). When this node evicts such a cache it removes its
own entry, so that the others count right.

Read once per eviction plan (one etcd read per candidate cache, from the process that
evicts: the pull child, ``cachemesh gc``). If etcd cannot be asked, every cache that
may be declared cluster-wide is kept: a full disk fails a pull with a clear error, a
lost last copy would fail every node's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ClusterError

if TYPE_CHECKING:
    from .facade import Caches

log = logging.getLogger(__name__)
T = TypeVar("T")


def kept_for_cluster(caches: Caches, names: Sequence[str]) -> dict[str, str]:
    """The caches among ``names`` that eviction must leave here, with why."""
    cluster = caches.settings.cluster
    if not cluster.enabled or not names:
        return {}
    try:
        return _run(_kept(caches, list(names)))
    except ClusterError as exc:
        log.warning("etcd cannot say which caches keep min_copies (%s): none is evicted", exc)
        return {n: f"etcd unreachable ({exc})" for n in names}


def forget_copy(caches: Caches, name: str, collected: Sequence[str] = ()) -> None:
    """This node no longer holds ``name``: its prewarm entry goes, and its holder entries
    of the blobs ``collected`` with it (best effort: the server's reconcile withdraws
    what it announced within a few seconds anyway, but not what a pull announced)."""
    cluster = caches.settings.cluster
    if not cluster.enabled:
        return
    try:
        _run(_forget(caches, name, list(collected)))
    except ClusterError as exc:
        log.info("could not remove this node's entries of %s from etcd: %s", name, exc)


async def _kept(caches: Caches, names: list[str]) -> dict[str, str]:
    from ..cluster.cache_decls import CacheDecl, PrewarmRecord

    kv, keys, me = _client(caches)
    out: dict[str, str] = {}
    try:
        for name in names:
            found = await kv.get(keys.cache(name))
            if found is None:
                continue
            decl = CacheDecl.from_bytes(found.value)
            if not decl.min_copies:
                continue
            snapshot = await kv.get_prefix(keys.prewarm(name, "x")[:-1])
            holders = set()
            for entry in snapshot.kvs:
                try:
                    record = PrewarmRecord.from_bytes(entry.value)
                except ValueError:
                    continue
                if record.state == "Available":
                    holders.add(record.node)
            if me in holders and len(holders) <= decl.min_copies:
                out[name] = (f"min_copies {decl.min_copies}: {len(holders)} node(s) hold it"
                             f" ({', '.join(sorted(holders))})")
    finally:
        await kv.close()
    return out


async def _forget(caches: Caches, name: str, collected: list[str]) -> None:
    kv, keys, me = _client(caches)
    try:
        await kv.delete(keys.prewarm(name, me))
        for sha in collected:
            await kv.delete(keys.blob_holder(sha, me))
    finally:
        await kv.close()


def _client(caches: Caches) -> tuple[Any, Any, str]:
    from ..cluster.etcd import EtcdKV
    from ..cluster.keys import Keys

    cluster = caches.settings.cluster
    return (EtcdKV.from_settings(cluster, timeout=3.0), Keys(cluster.prefix),
            cluster.name_or_host())


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end from synchronous code, on a thread of its own when this
    thread already runs an event loop (a server's)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    thread = threading.Thread(target=target, name="cachemesh-cluster-copies")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
