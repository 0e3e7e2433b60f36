"""Preparing a version: its files pulled through the cache, its runtime decided.

Each version's source is pulled once (``Caches.ensure``: a cache per version, in
the model's bucket), in the background from the moment it is declared on a lone
node, and in cluster mode only when this node is to load it (``deployments.py``;
:meth:`Preparer.prepare_if_present` adopts files an earlier pull left); a load waits
for it (``loading.py``). A cache of the version's name that already exists
is reused when it holds the same source, in the model's bucket or in another one
that is not protected (:func:`check_cache`). An adapter's base model is pulled into a cache of the
model's own bucket too, and the worker gets its view as a local path.

Meanwhile a slow runtime's framework is imported in every worker ahead of the first
request (a :class:`~.messages.Preload`; ``Runtime.preload_at_start``), and, when
every declared version fits in the budget, one worker reads the version's weights
ahead; its first load goes there.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import CachemeshError, ConflictError
from ...runtimes import Resolved, describe, resolve
from ..workers.messages import Preload
from .documents import DEFAULT_VERSION
from .pool import WorkerPool
from .shared import Shared
from .state import FAILED, NOT_HERE, PULLING, UNLOADED, Deployment, Version, versions_of

if TYPE_CHECKING:
    from ...caches import CacheInfo
    from ...sources.base import Source

log = logging.getLogger("cachemesh.serve")


class Preparer:
    """Pulls each version's files and decides its runtime."""

    def __init__(self, shared: Shared, pool: WorkerPool,
                 models: Mapping[str, Deployment]) -> None:
        self.shared = shared
        self.pool = pool
        self.models = models
        self._warmed: set[tuple[int, str]] = set()  # (slot id, runtime) preloaded

    async def prepare(self, v: Version) -> None:
        """Pull the version's source through the cache and decide its runtime."""
        v.phase, v.reason = PULLING, None
        try:
            view, resolved, disk = await asyncio.to_thread(self._prepare_sync, v)
        except CachemeshError as exc:
            v.phase, v.reason = FAILED, f"pull failed: {exc}"
            v.failed_until = time.monotonic() + self.shared.cfg.failed_ttl_s
            v.error(v.reason)
            raise
        v.view, v.resolved, v.disk_bytes = view, resolved, disk
        v.predicted = max(int(disk * self.shared.cfg.memory_factor), 1)
        if v.phase == PULLING:
            v.phase = UNLOADED
        self.shared.background.start(self._warm_workers(v))

    async def prepare_if_present(self, v: Version) -> None:
        """Cluster mode, at declaration: prepare ``v`` only if its cache is already
        Available in this node's store (an earlier pull: no download, a view check), so
        that the node record says it has the files. Otherwise nothing: the version's
        files are pulled when it is to load here (``Loader._load``)."""
        from ...caches import AVAILABLE

        def present() -> bool:
            try:
                return self.shared.caches.get(v.cache).status == AVAILABLE
            except CachemeshError:  # none (CacheNotFoundError), or the database is busy
                return False

        if not await asyncio.to_thread(present):
            return
        try:
            await self.prepare(v)
        except CachemeshError as exc:  # a load pulls (and says why) when it comes
            log.info("%s: files in the store not usable as they are: %s", v.display, exc)
            v.phase, v.reason, v.failed_until = UNLOADED, NOT_HERE, 0.0

    async def _warm_workers(self, v: Version) -> None:
        """Import a slow runtime's framework in every worker ahead of the first request
        (``Runtime.preload_at_start``). When every declared version fits in the budget,
        one worker also reads this version's files into the page cache meanwhile."""
        from ...runtimes import runtime_class

        assert v.resolved is not None
        runtime = v.resolved.runtime
        try:
            if not runtime_class(runtime).preload_at_start:
                return
        except CachemeshError:
            return
        declared = versions_of(self.models)
        fits = sum(x.disk_bytes or x.predicted for x in declared) <= self.pool.budget
        paths = [str(v.view)] if fits else []
        calls = []
        for worker in self.pool.workers:
            if not worker.alive or (not paths and (worker.id, runtime) in self._warmed):
                continue
            self._warmed.add((worker.id, runtime))
            calls.append(worker.call(Preload(runtime, paths)))
            if paths:
                v.prefetched_on = worker.id
            paths = []  # one worker reads ahead (into its own memory: see worker.py)
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, Exception):
                log.warning("preloading runtime %s: %s", runtime, result)

    def _prepare_sync(self, v: Version) -> tuple[Path, Resolved, int]:
        from ...caches import make_spec
        from ...sources import parse_source

        spec = v.spec
        cache_spec = make_spec(name=v.cache, source=spec.source, bucket=v.bucket)
        try:
            view: Path | None = self.shared.caches.ensure(cache_spec).view
        except ConflictError:
            view = None  # a cache of that name exists: reused if it holds the same source
        if view is None:
            check_cache(self.shared.caches.get(v.cache), v.bucket,
                        parse_source(spec.source, {}, self.shared.settings),
                        f"model {v.display!r}", "name the model differently",
                        self.shared.caches.buckets.is_protected)
            view = self.shared.caches.pull(v.cache).view
        label = None if v.label == DEFAULT_VERSION else v.label
        resolved = resolve(view, spec.runtime, spec.parameters, label)
        self._pull_base(v, view, resolved)
        # V2 metadata before any load, where the files tell (an ONNX graph, a config).
        resolved.metadata = describe(resolved, v.model, view)
        disk = sum(p.stat().st_size for p in view.rglob("*") if p.is_file())
        return view, resolved, disk

    def _pull_base(self, v: Version, view: Path, resolved: Resolved) -> None:
        """An adapter's base model goes through a cache of the model's own bucket, with
        that bucket's protection (never the default bucket, never hub/ for a protected
        one), pulled here; the worker gets its view as a local path. Adapters over one
        base in a bucket share its cache (named by bucket and source)."""
        from ...caches import make_spec
        from ...runtimes import adapters
        from ...sources import parse_source
        from ...sources.base import safe_name

        if resolved.runtime != "transformers" or not adapters.is_adapter(view):
            return
        base = adapters.base_source(view, resolved.parameters)
        source = parse_source(base, {}, self.shared.settings)
        dep = self.models.get(v.model)
        # A base named by the adapter's own files, for a model deployed over the API,
        # is held to the deploy roots as parameters.base was when it came.
        api = dep is not None and dep.origin == "api"
        roots = tuple(self.shared.cfg.source_roots) if api else None
        self.shared.caches.check_source(source, v.bucket, roots)
        key = hashlib.sha256(f"{v.bucket}\n{source.uri}".encode()).hexdigest()[:12]
        name = f"{safe_name(source.default_name())[:64]}.base-{key}"
        spec = make_spec(name=name, source=base, bucket=v.bucket)
        resolved.parameters["base"] = str(self.shared.caches.ensure(spec).view)


def check_cache(info: CacheInfo, bucket: str, source: Source, what: str, instead: str,
                is_protected: Callable[[str], bool]) -> None:
    """Refuse a cache of a version's name that holds what the version does not: another
    source's (409), or a protected bucket other than the model's (never served from).

    The same source in another open bucket is the cache to use: ``cachemesh pull
    ./model --name smol`` (bucket ``default``), then ``cachemesh serve --model
    smol=./model``, serves what the pull fetched; the user never has to know that the
    server's own caches go to bucket ``models``."""
    if info.spec.get("source") != source.uri:  # (info.source is the shown form)
        raise ConflictError(f"{what}: cache {info.name!r} already holds {info.source}, not"
                            f" {source.display_uri}; remove that cache or {instead}")
    if info.bucket != bucket and is_protected(info.bucket):
        # (the bucket is not named: the caller may not hold its token)
        raise ConflictError(f"{what}: cache {info.name!r} is in another bucket, a protected"
                            f" one; remove it or {instead}")
