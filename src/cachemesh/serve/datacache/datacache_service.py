"""The data caches a server declares and pulls on request: the protocol-free core of
``/api/v1/datacaches`` (``datacaches.py`` is its HTTP adapter), beside ModelService.

:class:`DataCacheService` declares a cache, checking everything before anything is
written, and queues its pull: at most :data:`MAX_PULLS` pulls run at once, each in
a child process (:class:`Puller`, ``pull_child.py``), stopped with the server.
It lists, describes and removes caches, for the caller of the current request:

Access (``access.py``): a protected bucket's caches are listed, described,
watched and removed only by a caller that presents that bucket's token; for anyone
else they do not exist (:class:`~cachemesh.errors.CacheNotFoundError`, 404), exactly
as a cache that does not exist. Creating a cache in a protected bucket needs its
token too (403), and a local source must lie in the server's deployable roots
(``CACHEMESH_SERVE_SOURCE_ROOTS``; without it, none is taken).
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...access import can_use
from ...caches import AVAILABLE, FAILED, PENDING, CacheInfo, Caches, CacheSpec, Event
from ...caches.spec import INTERRUPTED
from ...errors import CacheNotFoundError, ConflictError, ForbiddenError, InvalidInputError
from ...sources import parse_source
from ...sources.redact import redact_source
from .pull_child import PULL_FAILED

if TYPE_CHECKING:
    from .datacache_cluster import DataCacheCluster

log = logging.getLogger(__name__)

#: Pulls the server runs at once (each is itself parallel across files and ranges).
MAX_PULLS = 2


def visible_caches(caches: Caches, bucket: str | None = None) -> list[CacheInfo]:
    """The caches the current caller may see (those of protected buckets it holds
    the token of, and those of open buckets)."""
    return [c for c in caches.list(bucket) if can_use(caches.buckets, c.bucket)]


def get_visible_cache(caches: Caches, name: str) -> CacheInfo:
    """A cache the current caller may see; :class:`CacheNotFoundError` (404) for one
    in a protected bucket without its token, exactly as for a cache that does not exist."""
    info = caches.get(name)
    if not can_use(caches.buckets, info.bucket):
        raise CacheNotFoundError(name)
    return info


class DataCacheService:
    """Declared caches and their pulls in the background."""

    def __init__(self, caches: Caches, source_roots: Sequence[Path],
                 max_pulls: int = MAX_PULLS) -> None:
        self.caches = caches
        self.source_roots = tuple(source_roots)
        self._max_pulls = max_pulls
        self._puller: Puller | None = None  # made on the first pull: it holds threads
        self._lock = threading.Lock()
        # Cluster mode: this node in the blob index, and the caches declared cluster-wide
        # (datacache_cluster.py); set by the server once it joined, else None.
        self.cluster: DataCacheCluster | None = None

    def create(self, spec: CacheSpec) -> CacheInfo:
        """Declare a cache and start pulling it. The same declaration again is accepted
        (and pulls again if the cache Failed); another one under the same name is a 409."""
        self._check_create(spec)
        info = self.caches.create(spec)  # validates the source; writes nothing when it refuses
        if info.status != AVAILABLE:
            self.puller().submit(info.name)
        return self.seen(self.caches.get(info.name))

    def declare_cluster_wide(self, spec: CacheSpec, nodes: Any,
                             min_copies: int | None) -> dict[str, Any]:
        """Declare a cache for the nodes ``nodes`` names (preheat.py): checked here as a
        local declaration would be, then written in etcd, idempotently; every node it
        selects (this one too) pulls it. Returns the description as GET gives it."""
        from ...cluster.cache_decls import parse_nodes

        cluster = self.cluster
        if cluster is None or cluster.preheat is None:
            raise InvalidInputError("nodes and min_copies (ECI: Nodes, MinCopies) need cluster"
                                    " mode (serve --cluster); this node runs alone")
        chosen = parse_nodes("all" if nodes is None else nodes)
        self._check_create(spec)
        cluster.preheat.declare_sync(spec, chosen, min_copies)
        return self.describe_cluster_wide(spec.name, None)

    def describe_cluster_wide(self, name: str,
                              local: Callable[[CacheInfo], dict[str, Any]] | None
                              ) -> dict[str, Any]:
        """GET of one cache: the local description (``local``, when this node has the
        cache), with, in cluster mode, ``node`` (this one) and, for a cache declared
        cluster-wide, ``nodes`` ({node: {state, progress, ...}}) and the declaration."""
        from ..adapters.datacaches import describe

        cluster = self.cluster
        view = self.cluster_view(name)
        try:
            info = self.get(name)
        except CacheNotFoundError:
            if view is None:
                raise
            info = None
        if info is not None:
            out = local(info) if local is not None else describe(info)
        else:
            decl = view["declaration"]  # declared, not (yet) here
            out = {"name": name, "bucket": decl.spec.get("bucket"), "status": PENDING,
                   "source": redact_source(str(decl.spec.get("source", ""))),
                   "Name": name, "Status": PENDING}
        if cluster is not None:
            out["node"] = cluster.name
        if view is not None:
            decl = view["declaration"]
            out["nodes"] = view["nodes"]
            out["cluster"] = {"nodes": decl.nodes, "assigned": decl.assigned,
                              "min_copies": decl.min_copies, "declared_by": decl.declared_by,
                              "expected": view["expected"], "done": view["done"]}
        return out

    def cluster_view(self, name: str) -> dict[str, Any] | None:
        """A cache declared cluster-wide, as the current caller may see it: its
        declaration, each node's progress (``nodes``), the nodes expected to pull it and
        whether all of them are done; None when not declared (or not in cluster mode).
        A protected bucket's declaration is not found without that bucket's token."""
        cluster = self.cluster
        if cluster is None or cluster.preheat is None:
            return None
        view = cluster.preheat.cluster_view_sync(name)
        if view is not None and not can_use(self.caches.buckets,
                                            str(view["declaration"].spec.get("bucket"))):
            raise CacheNotFoundError(f"cache {name!r} not found")
        return view

    def list(self, bucket: str | None = None) -> list[CacheInfo]:
        return [self.seen(i) for i in visible_caches(self.caches, bucket)]

    def get(self, name: str) -> CacheInfo:
        return self.seen(get_visible_cache(self.caches, name))

    def current(self, name: str) -> CacheInfo:
        """``name`` as it is now, for a caller already allowed to see it."""
        return self.seen(self.caches.get(name))

    def events(self, name: str, after: int = 0) -> list[Event]:
        return self.caches.events(name, after=after)

    def delete(self, name: str, *, cluster: bool = False) -> None:
        """Remove a cache (409 while it is in use or pulled); with ``cluster``, its
        cluster-wide declaration too (404 if there is neither)."""
        if not cluster:
            self.caches.rm(get_visible_cache(self.caches, name).name)
            return
        node = self.cluster
        if node is None or node.preheat is None:
            raise InvalidInputError("cluster=true needs cluster mode (serve --cluster)")
        try:
            info = get_visible_cache(self.caches, name)
        except CacheNotFoundError:
            info = None
        view = self.cluster_view(name)
        if info is None and view is None:
            raise CacheNotFoundError(f"cache {name!r} not found")
        if info is not None:
            self.caches.rm(info.name)
        if view is not None:
            node.preheat.undeclare_sync(name)

    def usage(self, infos: Sequence[CacheInfo]
              ) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        """Each cache's files and logical bytes, the bytes no other cache shares (what
        removing it frees), and over ``infos``: logical against physical bytes, each
        distinct content counted once. Only the caches the caller sees are summed."""
        du = {c["name"]: c for c in self.caches.du()["caches"]}
        each = {i.name: {k: du[i.name][k] for k in ("files", "logical_bytes", "exclusive_bytes")}
                for i in infos if i.name in du}
        blobs: dict[str, int] = {}
        for name in each:
            blobs.update((r["sha256"], r["size"])
                         for r in self.caches.store.file_rows(name).values())
        logical, physical = sum(e["logical_bytes"] for e in each.values()), sum(blobs.values())
        return each, {"logical_bytes": logical, "physical_bytes": physical,
                      "saved_bytes": logical - physical}

    def seen(self, info: CacheInfo) -> CacheInfo:
        """``info`` as the API reports it: a Failed cache that this server has queued a
        pull of again is Pending (its child process has not started yet)."""
        with self._lock:
            puller = self._puller
        if info.status == FAILED and puller is not None and puller.queued(info.name):
            return dataclasses.replace(info, status=PENDING, error=None)
        return info

    def puller(self) -> Puller:
        with self._lock:
            if self._puller is None:
                self._puller = Puller(self.caches, self._max_pulls)
            return self._puller

    def resume_interrupted(self, skip: Collection[str] = ()) -> list[str]:
        """Pull again every cache whose pull a stopped process left (Failed,
        "interrupted": this server's last run, or a pull killed with it), from where it
        stopped; called when the server starts. ``skip``: caches pulled by another
        part of the server (the models' own, by their preparation). Returns the names."""
        names = [i.name for i in self.caches.list()
                 if i.status == FAILED and i.error == INTERRUPTED and i.name not in skip]
        for name in names:
            self.caches.catalog.add_event(
                name, "resumed", "the server started: resuming the interrupted pull")
            self.puller().submit(name)
        if names:
            log.info("resuming interrupted pulls: %s", ", ".join(names))
        return names

    def stop(self) -> None:
        """Stop the pulls (the server stops): the caches read as interrupted, resumable."""
        with self._lock:
            puller = self._puller
        if puller is not None:
            puller.stop()

    def _check_create(self, spec: CacheSpec) -> None:
        """Refuse, before anything is written, what this caller may not create: a
        protected bucket without its token (403, as deploying a model there); a name
        taken by a cache the caller cannot see (409 that says nothing of it); a local
        source outside the deployable roots, as for models deployed over the API."""
        caches = self.caches
        if not can_use(caches.buckets, spec.bucket):
            raise ForbiddenError(f"bucket {spec.bucket!r} is protected; the request does not"
                                 " carry its token")
        try:
            existing = caches.get(spec.name)
        except CacheNotFoundError:
            existing = None
        if existing is not None and not can_use(caches.buckets, existing.bucket):
            raise ConflictError(f"the name {spec.name!r} is taken")
        caches.check_source(parse_source(spec.source, spec.options, caches.settings),
                            spec.bucket, self.source_roots)


class Puller:
    """Runs pulls in child processes of the server, ``max_pulls`` at a time.

    A process, not a thread of the server: hashing and writing gigabytes would
    take the server's GIL from its requests, and a process can be stopped at once
    when the server stops (a thread cannot: the server would wait for every pull
    to finish before exiting). Stopping one is a crash that the store is built
    for: the pull lock goes with the process, the cache then reads as Failed
    ("the pull was interrupted; pull again to resume it"), and what was verified
    or partly downloaded stays for the next pull, which declaring the cache again
    starts, and so does the server's next start (:meth:`DataCacheService.resume_interrupted`).
    The child (``pull_child.py``) gets the server's settings, pickled on
    its stdin, and writes progress and events to the store.
    """

    def __init__(self, caches: Caches, max_pulls: int = MAX_PULLS) -> None:
        self.caches = caches
        self._pool = ThreadPoolExecutor(max_pulls, thread_name_prefix="cachemesh-datacache")
        self._waiting: set[str] = set()  # submitted, not started
        self._running: set[str] = set()
        # Declared again while its pull ran (a cache removed and declared anew at the
        # end of its last pull): looked at again when that pull ends.
        self._again: set[str] = set()
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._stopping = False
        self._lock = threading.Lock()

    def submit(self, name: str) -> None:
        with self._lock:
            if self._stopping or name in self._waiting:
                return  # the pull that waits will do
            if name in self._running:
                self._again.add(name)
                return
            self._waiting.add(name)
        self._pool.submit(self._run, name)

    def _run(self, name: str) -> None:
        try:
            with self._lock:
                self._waiting.discard(name)
                if self._stopping:
                    return
                self._running.add(name)
                child = subprocess.Popen(
                    [sys.executable, "-m", "cachemesh.serve.datacache.pull_child"],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
                self._children[name] = child
            child.communicate(pickle.dumps((self.caches.settings, name)))
            if child.returncode not in (0, PULL_FAILED) and not self._stopping:
                # A crash of the child (its traceback is on stderr); the store says
                # the pull was interrupted.
                log.warning("pull of %s: the pull process exited with %s", name,
                            child.returncode)
        except Exception:  # a bug: logged with its traceback, the pool's thread lives on
            log.exception("pull of %s failed", name)
        finally:
            with self._lock:
                self._children.pop(name, None)
                self._running.discard(name)
                again = name in self._again
                self._again.discard(name)
            if again:
                self._pull_if_pending(name)

    def _pull_if_pending(self, name: str) -> None:
        """A declaration that came while the last pull ran: pull again if the cache is
        a new one that nothing pulled yet (an old one's pull was this one)."""
        try:
            pending = self.caches.get(name).status == PENDING
        except CacheNotFoundError:
            return
        if pending:
            self.submit(name)

    def queued(self, name: str) -> bool:
        """Whether a pull of ``name`` is queued or running here."""
        with self._lock:
            return name in self._waiting or name in self._running

    def stop(self) -> None:
        """Stop every pull now (the caches read as interrupted) and start no other."""
        with self._lock:
            self._stopping = True
            children = list(self._children.values())
        for child in children:
            child.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)
