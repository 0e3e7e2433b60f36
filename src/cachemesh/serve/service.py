"""The model service: the protocol-free core every adapter calls.

It knows models, workers and memory; it knows nothing of HTTP or gRPC (the V2
REST adapter, the control API, and later V2 gRPC and OpenAI translate their
wire formats into calls here, and errors from :mod:`cachemesh.errors` back).

A model is a document (``documents.py``): versions, traffic shares, routes.
What the service holds for it is drawn in ``state.py``. In short:

- Deploy: each version's source is pulled through the cache (``Caches.ensure``)
  once, in the background; its files then live in a cache view.
- Route: :meth:`ModelService.route` is the one place that picks the version a
  request goes to (path, then routes, then traffic; ``routing.py``). ``infer``,
  ``generate`` and ``stream`` call it; an adapter that must know the version
  before it answers (to set a header) calls it first and passes the label it got
  as ``version``.
- Load: one on-demand load per version at a time (a single shared task that
  every request waiting on it awaits), through the load queue (bounded,
  ``load_concurrency`` at once, request-driven loads first). The placement
  function (``placement.py``) picks a worker and the idle copies to evict;
  a load whose worker raised, crashed or ran out of memory is tried again on
  another worker. While any copy is loaded the version's cache is held open
  (``Caches.open``) so the store's gc and eviction leave its files alone.
- Copies: a version whose request rate passes ``copy_rate`` gets another copy
  on another worker, in free memory only (``copies.py``); requests go to the
  copy with fewest in flight. A worker that dies takes its copies with it; the
  other copies keep serving and the worker is replaced.
- Roll out: :meth:`ModelService.apply` takes a new document, loads the
  versions it sends traffic to, switches (one assignment: no request sees half
  a document), then drains and unloads the versions it dropped. A version that
  fails to load never takes traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..access import can_use
from ..config import Settings, format_size
from ..errors import (
    CachemeshError,
    CacheNotFoundError,
    ConflictError,
    DrainingError,
    ForbiddenError,
    InferenceInputError,
    InvalidInputError,
    ModelFailedError,
    ModelLoadError,
    ModelNotFoundError,
    ModelTooLargeError,
    OverloadedError,
    RequestTimeoutError,
    UnavailableError,
    WorkerCrashedError,
)
from ..runtimes import InferenceRequest, InferenceResponse, Resolved, resolve
from .copies import CopyPolicy, decide, pick
from .documents import (
    DEFAULT_VERSION,
    ModelDoc,
    VersionSpec,
    cache_name,
    doc_from_spec,
    unredact,
)
from .loadqueue import BACKGROUND, REQUEST, LoadQueue
from .messages import Generate, Infer, IntegrityCheck, Load, Loaded, Preload, Stats, Stream, Unload
from .memory import default_budget
from .metrics import Metrics
from .placement import Placement, Resident, Slot, held, place
from .registry import ModelRegistry, ModelSpec
from .routing import Decision, Router
from .state import (
    FAILED,
    LOADING,
    PULLING,
    READY,
    UNLOADED,
    UNLOADING,
    Copy,
    CopyStatus,
    Deployment,
    ModelStatus,
    Series,
    Version,
    VersionStatus,
    wall,
)
from .workers import Launched, WorkerHandle, worker_environ

log = logging.getLogger("cachemesh.serve")

# Re-exported: adapters compare states with these.
__all__ = [
    "FAILED",
    "LOADING",
    "PULLING",
    "READY",
    "UNLOADED",
    "UNLOADING",
    "ModelService",
    "ModelStatus",
]

CAPACITY_POLL_S = 0.05
# A worker that holds no model but this much more than its own memory, when a load
# waits for room that recycling it would make, is restarted (see _bloated).
RECYCLE_MIN_BYTES = 8 * 1024 * 1024
USES_HALF_LIFE_S = 30.0
SCALE_INTERVAL_S = 0.5


class _LoadFailed(Exception):
    def __init__(self, worker: int, error: CachemeshError) -> None:
        super().__init__(str(error))
        self.worker, self.error = worker, error


class ModelService:
    """Many models on a few worker processes, under one memory budget."""

    def __init__(self, settings: Settings, *, registry: ModelRegistry | None = None,
                 caches: Any = None, launched: Sequence[Launched] = ()) -> None:
        """``launched``: worker processes started ahead (``workers.launch_workers``),
        adopted by :meth:`start` before it starts any of its own."""
        from ..caches import Caches

        self.settings = settings
        self.cfg = settings.serve
        self.caches = caches or Caches(settings)
        if registry is None:
            from .registry import SqliteModelRegistry

            registry = SqliteModelRegistry(self.caches.db)
        self.registry = registry
        self.metrics = Metrics()
        self.budget = self.cfg.memory or default_budget()
        self.metrics.budget.set(self.budget)
        self.deployments: dict[str, Deployment] = {}
        # One declaration (deploy, apply, remove) per name at a time: their checks and
        # registry writes run in threads, off the event loop, so they can interleave.
        self._declaring: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary())
        self.workers: list[WorkerHandle] = []
        self.queue = LoadQueue(self.cfg.load_concurrency, self.cfg.load_queue)
        self.inflight = 0
        self.started = False
        self.warm = False
        self.draining = False
        self.stopping = False
        self._next_worker_id = 0
        self._keys = itertools.count(1)
        self._tick = 0
        self._capacity = asyncio.Event()
        self._capacity_waiters = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task] = set()
        self._warmed: set[tuple[int, str]] = set()  # (worker id, runtime) preloaded
        self._launched = list(launched)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, specs: list[ModelSpec | ModelDoc] = ()) -> None:  # type: ignore[assignment]
        """Start the workers, declare the models, and warm up in the background:
        readiness turns true once every eager model has loaded (or failed).

        First, the store is repaired after a crash of an earlier server (or a pull):
        removals finished, interrupted pulls marked Failed, blob files whose row
        was never written adopted (``Caches.recover``, as its docstring promised)."""
        try:
            await asyncio.to_thread(self.caches.recover)
        except CachemeshError as exc:  # a locked database: serve anyway, gc repairs later
            log.warning("store recovery at start failed: %s", exc)
        n = self.cfg.worker_count()
        self.workers = list(await asyncio.gather(*(self._spawn() for _ in range(n))))
        self.started = True
        saved = {doc.name: doc for doc in self.registry.list()}
        for item in specs:
            doc = item if isinstance(item, ModelDoc) else doc_from_spec(item)
            if doc.name in saved:
                if saved[doc.name] != doc:
                    log.warning("model %s: serving the document deployed at run time, not the"
                                " one given at start (DELETE it to go back)", doc.name)
                continue
            self._add(doc, origin="config")
        for doc in saved.values():
            self._add(doc, origin="api")
        eager = [v for d in self.deployments.values() if d.doc.eager
                 for label, v in d.versions.items() if label in d.doc.serving()]
        self._background(self._warm_up(eager))
        self._background(self._scale_loop())

    async def _warm_up(self, eager: list[Version]) -> None:
        await asyncio.gather(*(self._load_quietly(v) for v in eager))
        self.warm = True

    async def _load_quietly(self, v: Version) -> None:
        try:
            await self._ensure_loaded(v, BACKGROUND, deadline=None)
        except CachemeshError as exc:
            log.warning("eager load of %s failed: %s", v.display, exc)

    async def stop(self) -> None:
        self.stopping = True
        self.draining = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        for left in self._launched:  # never adopted: the worker exits on EOF
            left.sock.close()
        self._launched = []
        for v in self._all_versions():
            self._release_hold(v)

    def _background(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Whoever awaited it got the error; this only marks it as seen.
            log.debug("background task failed: %s", task.exception())

    @property
    def live(self) -> bool:
        return self.started and not self.stopping

    @property
    def ready(self) -> bool:
        return (self.started and self.warm and not self.draining
                and any(w.alive for w in self.workers))

    def begin_drain(self) -> None:
        """Take no new requests (503); those in flight go on."""
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if the timeout came first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    # -- workers -------------------------------------------------------------------

    async def _spawn(self) -> WorkerHandle:
        self._next_worker_id += 1
        worker = WorkerHandle(self._next_worker_id, self._on_worker_death)
        await worker.start(memory_limit=self.cfg.worker_memory_limit,
                           threads=self.cfg.worker_threads,
                           environ=worker_environ(self.settings),
                           launched=self._launched.pop(0) if self._launched else None)
        return worker

    def _on_worker_death(self, worker: WorkerHandle) -> None:
        log.warning("%s", worker.exit_reason)
        for v in self._all_versions():
            for c in [c for c in v.copies if c.worker is worker and c.state != LOADING]:
                # A copy being loaded there is its loader's to retry elsewhere.
                left = [o for o in v.copies if o is not c and o.state != UNLOADING]
                self._forget_copy(c, None if left else
                                  f"{worker.exit_reason}; loads again on demand")
                if left:
                    log.warning("%s: lost its copy on worker %d; %d left", v.display,
                                worker.id, len(left))
        if not self.stopping:
            self.metrics.restarts.inc()
            self._background(self._replace(worker))
        self._notify_capacity()

    def _bloated(self, short: int) -> WorkerHandle | None:
        """A worker that holds no model and is idle, yet holds at least ``short`` bytes
        more than its own memory: what a runtime leaked, or what the allocator did not
        give back after unloads. Nothing can evict that; restarting the worker frees it."""
        taken = {c.worker.id for v in self._all_versions() for c in v.copies}
        ahead = {v.prefetched_on for v in self._all_versions() if not v.loads}
        for w in self.workers:
            idle = w.alive and not w.busy and w.id not in taken and w.id not in ahead
            if idle and w.rss() - w.base_rss >= max(short, RECYCLE_MIN_BYTES):
                return w
        return None

    async def _recycle(self, worker: WorkerHandle, short: int) -> None:
        extra = worker.rss() - worker.base_rss
        log.warning("restarting worker %d: it holds no model but %s more than its own"
                    " memory, and a load needs %s more room", worker.id,
                    format_size(extra), format_size(max(short, 0)))
        self.metrics.recycles.inc()
        await worker.stop()  # not a death: no copies to forget, and we replace it here
        await self._replace(worker)

    async def _replace(self, dead: WorkerHandle) -> None:
        for attempt in range(5):
            try:
                fresh = await self._spawn()
            except CachemeshError as exc:
                log.error("could not replace %s: %s", dead, exc)
                await asyncio.sleep(min(2**attempt, 10))
                continue
            self.workers = [fresh if w is dead else w for w in self.workers]
            self._notify_capacity()
            return

    # -- models: declare, roll out, remove -----------------------------------------

    def _all_versions(self) -> list[Version]:
        return [v for d in self.deployments.values() for v in d.versions.values()]

    def _add(self, doc: ModelDoc, origin: str) -> Deployment:
        dep = Deployment(doc=doc, origin=origin, router=Router(doc),
                         policy=CopyPolicy.of(self.cfg, doc.scaling))
        for label, spec in doc.versions.items():
            dep.versions[label] = self._new_version(doc, label, spec)
        self.deployments[doc.name] = dep
        return dep

    def _new_version(self, doc: ModelDoc, label: str, spec: VersionSpec) -> Version:
        v = Version(model=doc.name, label=label, spec=spec, cache=cache_name(doc.name, label),
                    bucket=doc.bucket)
        v.prepare_task = self._background(self._prepare(v))
        return v

    def _check_sources(self, doc: ModelDoc, known: Mapping[str, Version], *,
                       persist: bool = True) -> None:
        """Refuse, before anything changes, what would fail later: a source nobody
        understands (400), a changed version (409), a cache holding something else (409)."""
        from ..sources import parse_source

        # Over the API: local paths only from the roots (none by default); from the
        # command line (persist=False) the operator typed it.
        roots = tuple(self.cfg.source_roots) if persist else None
        for label, spec in doc.versions.items():
            old = known.get(label)
            if old is not None:
                if old.spec != spec:
                    raise ConflictError(
                        f"model {doc.name!r} version {label!r} exists with another source,"
                        " runtime or parameters; versions do not change: publish the change"
                        " under a new version label")
                continue  # checked when it came (a --model one is outside the roots)
            # An unknown scheme, a path into the store, or one outside the deployable
            # roots fails here, as 400, before anything is kept.
            source = parse_source(spec.source, {}, self.settings)
            self.caches.check_source(source, doc.bucket, roots)
            base = (spec.parameters or {}).get("base")
            if isinstance(base, str) and base.strip():
                # An adapter's base model (runtimes/adapters.py) is pulled by the worker:
                # a source like any other, under the same rules.
                self.caches.check_source(parse_source(base, {}, self.settings), doc.bucket,
                                         roots)
            try:
                info = self.caches.get(cache_name(doc.name, label))
            except CacheNotFoundError:
                continue
            if info.bucket != doc.bucket:  # never serve another bucket's files
                raise ConflictError(
                    f"model {doc.name!r} version {label!r}: cache {info.name!r} is in another"
                    " bucket; remove it or name the model differently")
            if info.spec.get("source") != source.uri:  # (info.source is the shown form)
                raise ConflictError(
                    f"model {doc.name!r} version {label!r}: cache {info.name!r} already holds"
                    f" {info.source}, not {source.display_uri}; remove that cache or use"
                    " another label")

    def _check_access(self, doc: ModelDoc, existing: Deployment | None) -> None:
        """The caller must hold the token of the document's bucket (403), and may not
        touch a model it cannot see (409: the name is taken, nothing more is said)."""
        if not can_use(self.caches.buckets, doc.bucket):
            raise ForbiddenError(f"bucket {doc.bucket!r} is protected; the request does not"
                                 " carry its token")
        if existing is not None and not existing.removed and not self._visible(existing):
            raise ConflictError(f"the name {doc.name!r} is taken")

    def _name_lock(self, name: str) -> asyncio.Lock:
        lock = self._declaring.get(name)
        if lock is None:
            lock = self._declaring[name] = asyncio.Lock()
        return lock

    async def deploy(self, spec: ModelSpec, *, persist: bool = True) -> ModelStatus:
        """Add a model in its simple form (``POST /api/v1/models``), kept in the
        registry so it survives a restart. Its pull runs in the background.

        The checks and the registry write touch meta.db, so they run in a thread: a
        database locked by another process delays this declaration, not every request."""
        doc = doc_from_spec(spec)
        async with self._name_lock(spec.name):
            existing = self.deployments.get(spec.name)
            await asyncio.to_thread(self._check_access, doc, existing)
            if existing is not None and not existing.removed:
                if unredact(doc, existing.doc) == existing.doc:
                    return self.status(spec.name)
                raise ConflictError(f"model {spec.name!r} exists with another spec; remove it"
                                    " first, or PUT /api/v1/models/{name} to roll out a new"
                                    " version")
            await asyncio.to_thread(self._check_sources, doc, {}, persist=persist)
            if persist:
                await asyncio.to_thread(self.registry.put, doc)
            dep = self._add(doc, origin="api" if persist else "config")
        self._eager(dep)
        return self.status(spec.name)

    def _eager(self, dep: Deployment) -> None:
        if dep.doc.eager:
            for label in dep.doc.serving():
                self._background(self._load_quietly(dep.versions[label]))

    async def apply(self, doc: ModelDoc) -> tuple[ModelStatus, bool]:
        """Make ``doc`` the model's document (``PUT /api/v1/models/{name}``); True if new.

        A new model is declared as :meth:`deploy` does. For an existing one this is a
        rollout: the versions the document sends traffic to are loaded first; only
        when all are ready does the document take effect (at once, for every request
        that starts after); then versions it no longer lists finish the requests they
        have and are unloaded. If a version fails to load, the old document stays and
        the error is raised. One rollout per model at a time (409 otherwise).
        """
        async with self._name_lock(doc.name):
            dep = self.deployments.get(doc.name)
            await asyncio.to_thread(self._check_access, doc, dep)
            if dep is None or dep.removed:
                await asyncio.to_thread(self._check_sources, doc, {})
                await asyncio.to_thread(self.registry.put, doc)
                self._eager(self._add(doc, origin="api"))
                return self.status(doc.name), True
            doc = unredact(doc, dep.doc)  # a source as GET showed it means the real one
            if dep.rollout is not None:
                raise ConflictError(f"model {doc.name!r} is being rolled out already; try"
                                    " again when that finishes")
            if doc.bucket != dep.doc.bucket:
                raise ConflictError(
                    f"model {doc.name!r} is in bucket {dep.doc.bucket!r}; a model's bucket"
                    " does not change: remove the model and deploy it again")
            await asyncio.to_thread(self._check_sources, doc, dep.versions)
            if dep.doc == doc:
                return self.status(doc.name), False
            dep.rollout = task = self._background(self._rollout(dep, doc))
        await asyncio.shield(task)  # the rollout goes on if the client gives up
        return self.status(doc.name), False

    async def _rollout(self, dep: Deployment, doc: ModelDoc) -> None:
        try:
            await self._roll(dep, doc)
        except asyncio.CancelledError:
            if dep.removed:  # DELETE cancelled it
                raise ModelNotFoundError(doc.name) from None
            raise
        finally:
            dep.rollout = None

    async def _roll(self, dep: Deployment, doc: ModelDoc) -> None:
        old = dep.doc
        added = {label: self._new_version(doc, label, spec)
                 for label, spec in doc.versions.items() if label not in dep.versions}
        dep.versions.update(added)  # visible in status; requests reach them only after the switch
        what = ", ".join(f"{v} {p}%" for v, p in doc.traffic.items() if p) or "routes only"
        dep.rollout_note = f"rolling out: loading {', '.join(doc.serving())} ({what})"
        log.info("model %s: %s", doc.name, dep.rollout_note)
        try:
            wanted = [dep.versions[label] for label in doc.serving()]
            # The deadline bounds waiting for room, not the loads themselves.
            deadline = time.monotonic() + self.cfg.request_timeout_s
            results = await asyncio.gather(
                *(self._ensure_loaded(v, BACKGROUND, deadline) for v in wanted),
                return_exceptions=True)
            failed = [(v, r) for v, r in zip(wanted, results, strict=True)
                      if isinstance(r, BaseException)]
            if failed:
                v, exc = failed[0]
                raise exc if not isinstance(exc, ModelLoadError) else ModelLoadError(
                    f"rollout of model {doc.name!r} failed, traffic stays as it was"
                    f" ({_shares(old)}): {exc}")
            async with self._name_lock(doc.name):  # a DELETE writes the registry too
                if dep.removed:
                    raise ModelNotFoundError(doc.name)
                await asyncio.to_thread(self.registry.put, doc)
        except BaseException as exc:
            text = str(exc)
            dep.rollout_note = (text if text.startswith("rollout") else
                                f"rollout failed: {text or type(exc).__name__}")[:2000]
            for label, v in added.items():
                dep.versions.pop(label, None)
                self._background(self._retire(v, "its rollout failed"))
            raise
        # The switch: one assignment each, no await in between.
        dep.doc, dep.router, dep.origin = doc, Router(doc), "api"
        dep.policy = CopyPolicy.of(self.cfg, doc.scaling)
        dropped = [dep.versions.pop(label) for label in list(dep.versions)
                   if label not in doc.versions]
        note = f"rolled out {time.strftime('%Y-%m-%dT%H:%M:%S')}: {_shares(doc)}"
        gone = ", ".join(v.label for v in dropped)
        dep.rollout_note = note + (f"; unloading {gone}" if dropped else "")
        log.info("model %s: %s", doc.name, dep.rollout_note)
        await asyncio.gather(*(self._retire(v, "dropped by a rollout") for v in dropped))
        if dropped:
            dep.rollout_note = f"{note}; unloaded {gone}"

    async def _retire(self, v: Version, reason: str) -> None:
        """Forget a version that no new request can reach: the requests routed to it
        before finish on it (loading it if they must), then its copies are unloaded."""
        v.removed = True
        while v.inflight:
            await self._capacity_changed()
        for task in (v.load_task, v.copy_task):
            if task is not None:
                with contextlib.suppress(CachemeshError, asyncio.CancelledError):
                    await asyncio.shield(task)
        await asyncio.gather(*(asyncio.shield(self._start_unload(c, reason))
                               for c in list(v.copies)))
        if v.prepare_task is not None:
            v.prepare_task.cancel()
        self._release_hold(v)
        with contextlib.suppress(KeyError):
            self.metrics.copies.remove(v.model, v.label)

    async def remove(self, name: str) -> None:
        async with self._name_lock(name):
            dep = self._deployment(name)
            await asyncio.to_thread(self.registry.remove, name)
            dep.removed = True
        if dep.rollout is not None:
            rollout = dep.rollout
            rollout.cancel()
            with contextlib.suppress(CachemeshError, asyncio.CancelledError):
                await rollout
        await asyncio.gather(*(self._retire(v, "removed") for v in list(dep.versions.values())))
        if self.deployments.get(name) is dep:
            del self.deployments[name]
        with contextlib.suppress(KeyError):
            self.metrics.model_bytes.remove(name)

    def _visible(self, dep: Deployment) -> bool:
        """Whether the caller of the current request may see the model (access.py)."""
        return can_use(self.caches.buckets, dep.doc.bucket)

    def _deployment(self, name: str, version: str | None = None) -> Deployment:
        dep = self.deployments.get(name)
        if dep is None or dep.removed or not self._visible(dep):
            raise ModelNotFoundError(name, version)
        return dep

    def route(self, name: str, version: str | None = None, *,
              headers: Mapping[str, str] | None = None,
              parameters: Mapping[str, Any] | None = None) -> Decision:
        """The version of model ``name`` a request goes to, and why: the routing entry
        point of every protocol (``routing.py`` decides).

        ``version``: a label or alias the request names itself (the V2 path, gRPC's
        ``model_version``); an unknown one raises :class:`ModelNotFoundError`.
        ``headers``: HTTP headers or gRPC metadata, names in lower case. ``parameters``:
        the V2 request's ``parameters`` (or whatever the protocol has like them).
        A model the caller may not see (a protected bucket) is not found.

        ``infer``, ``generate`` and ``stream`` route through this themselves. An
        adapter that must name the version in its answer before it has one (the
        OpenAI adapter's ``x-model-version`` header on a stream) calls it, then
        passes ``decision.version`` as their ``version`` with no ``await`` between.
        """
        return self._route(name, version, headers, parameters)[0]

    def _route(self, name: str, version: str | None, headers: Mapping[str, str] | None,
               parameters: Mapping[str, Any] | None) -> tuple[Decision, Deployment, Version]:
        dep = self._deployment(name, version)
        decision = dep.router.choose(version, headers, parameters)
        return decision, dep, dep.versions[decision.version]

    # -- status ----------------------------------------------------------------------

    def status(self, name: str) -> ModelStatus:
        return self._status(self._deployment(name))

    def list_models(self) -> list[ModelStatus]:
        return [self._status(d) for _, d in sorted(self.deployments.items())
                if not d.removed and self._visible(d)]

    def _status(self, dep: Deployment) -> ModelStatus:
        now = time.monotonic()
        # The document's order first; then versions a rollout is loading.
        order = [*dep.doc.versions, *(x for x in dep.versions if x not in dep.doc.versions)]
        versions = {label: self._version_status(dep.versions[label], now) for label in order
                    if label in dep.versions}
        label = dep.doc.primary()
        p, pv = dep.versions[label], versions[label]
        workers = sorted({c.worker for v in versions.values() for c in v.copies})
        return ModelStatus(
            name=dep.name, version=label, source=p.spec.source, runtime=pv.runtime,
            state=pv.state, reason=pv.reason, eager=dep.doc.eager, origin=dep.origin,
            bucket=dep.doc.bucket,
            worker=pv.copies[0].worker if pv.copies else None, workers=workers,
            size_bytes=pv.size_bytes, predicted_bytes=pv.predicted_bytes,
            inflight=sum(v.inflight for v in versions.values()),
            loads=sum(v.loads for v in versions.values()),
            evictions=sum(v.evictions for v in versions.values()),
            last_used=max((v.last_used for v in versions.values() if v.last_used), default=None),
            view=pv.view, document=dep.doc, versions=versions, rollout=dep.rollout_note)

    def _version_status(self, v: Version, now: float) -> VersionStatus:
        state = v.state(now)
        copies = [CopyStatus(worker=c.worker.id, state=c.state, inflight=c.inflight,
                             size_bytes=c.size or None, last_used=wall(c.last_used, now),
                             extra=c.extra, placed=c.placed)
                  for c in v.copies if c.state in (READY, UNLOADING) and c.worker.alive]
        return VersionStatus(
            state=state, reason=v.reason, runtime=v.resolved.runtime if v.resolved else
            v.spec.runtime, copies=copies, size_bytes=v.size() or None,
            predicted_bytes=v.predicted or None, inflight=v.inflight, loads=v.loads,
            evictions=v.evictions, last_used=v.last_used_wall, rate=round(v.rate, 2),
            view=str(v.view) if v.view else None, scaling=v.scaling, errors=list(v.errors))

    def is_ready(self, name: str, version: str | None = None) -> bool:
        dep = self._deployment(name, version)
        if version is not None:
            labels = [dep.router.choose(version).version]
        else:
            labels = dep.doc.serving()
        return all(dep.versions[label].ready_copies() for label in labels)

    async def metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """V2 model metadata. A model that is not loaded answers from what it declares."""
        dep = self._deployment(name, version)
        label = dep.router.choose(version).version if version else dep.doc.primary()
        v = dep.versions[label]
        if v.resolved is None and v.prepare_task is not None:
            with contextlib.suppress(CachemeshError, asyncio.CancelledError):
                await asyncio.shield(v.prepare_task)
        meta = dict(v.metadata) if v.metadata else {}
        if not meta and v.resolved is not None:
            meta = {"inputs": v.resolved.inputs, "outputs": v.resolved.outputs}
        return {
            "name": name,
            "versions": [label for label in dep.doc.versions if label != DEFAULT_VERSION],
            "platform": meta.get("platform") or (v.resolved.runtime if v.resolved else ""),
            "inputs": meta.get("inputs") or [],
            "outputs": meta.get("outputs") or [],
        }

    # -- memory ----------------------------------------------------------------------

    def memory(self) -> dict[str, Any]:
        held_by = {s.id: s for s in self._slots()}
        workers = []
        for w in self.workers:
            s = held_by[w.id]
            names = [c.version.display for v in self._all_versions() for c in v.copies
                     if c.worker is w and c.state != UNLOADED]
            workers.append({"id": w.id, "pid": w.pid, "alive": w.alive, "rss_bytes": w.rss(),
                            "base_bytes": w.base_rss, "held_bytes": s.used, "inflight": s.load,
                            "models": sorted(names)})
        total = sum(x["held_bytes"] for x in workers if x["alive"])
        return {"budget_bytes": self.budget, "held_bytes": total, "workers": workers}

    def refresh_gauges(self) -> None:
        mem = self.memory()
        self.metrics.held.set(mem["held_bytes"])
        for w in mem["workers"]:
            self.metrics.worker_rss.labels(str(w["id"])).set(w["rss_bytes"])
        self.metrics.loaded.set(sum(1 for v in self._all_versions() if v.ready_copies()))
        for v in self._all_versions():
            self.metrics.copies.labels(v.model, v.label).set(len(v.ready_copies()))

    def _slots(self) -> list[Slot]:
        """The workers as the placement policy sees them."""
        now = time.monotonic()
        alive_bases = sum(w.base_rss for w in self.workers if w.alive)
        on: dict[int, list[Copy]] = {w.id: [] for w in self.workers}
        for v in self._all_versions():
            for c in v.copies:
                if c.worker.id in on and c.worker.alive:
                    on[c.worker.id].append(c)
        slots = []
        for w in self.workers:
            residents, sizes, reserved = [], 0, 0
            for c in on[w.id]:
                v = c.version
                loading = c.state != READY
                size = c.size or v.predicted
                if c.state == LOADING:
                    reserved += v.predicted
                else:
                    sizes += size
                claimed = c.inflight + (v.waiting if c.state == READY else 0)
                residents.append(Resident(
                    c.key, v.id, size, claimed, c.last_used, c.loaded_at, loading,
                    v.uses * 0.5 ** ((now - v.last_used) / USES_HALF_LIFE_S)))
            rss = w.rss()
            slots.append(Slot(
                w.id, w.alive, capacity=self.budget - (alive_bases - w.base_rss),
                used=held(w.base_rss, rss, sizes, reserved) if w.alive else 0, base=w.base_rss,
                residents=tuple(residents), load=sum(c.inflight for c in on[w.id])))
        return slots

    def _notify_capacity(self) -> None:
        if self._capacity_waiters:
            event, self._capacity = self._capacity, asyncio.Event()
            event.set()

    def _update_bytes(self, name: str) -> None:
        dep = self.deployments.get(name)
        total = sum(c.size for v in dep.versions.values() for c in v.copies
                    if c.state == READY) if dep else 0
        if total:
            self.metrics.model_bytes.labels(name).set(total)
        else:
            with contextlib.suppress(KeyError):
                self.metrics.model_bytes.remove(name)

    # -- loading ---------------------------------------------------------------------

    async def _prepare(self, v: Version) -> None:
        """Pull the version's source through the cache and decide its runtime."""
        v.phase, v.reason = PULLING, None
        try:
            view, resolved, disk = await asyncio.to_thread(self._prepare_sync, v)
        except CachemeshError as exc:
            v.phase, v.reason = FAILED, f"pull failed: {exc}"
            v.failed_until = time.monotonic() + self.cfg.failed_ttl_s
            v.error(v.reason)
            raise
        v.view, v.resolved, v.disk_bytes = view, resolved, disk
        v.predicted = max(int(disk * self.cfg.memory_factor), 1)
        if v.phase == PULLING:
            v.phase = UNLOADED
        self._background(self._warm_workers(v))

    async def _warm_workers(self, v: Version) -> None:
        """Import a slow runtime's framework in every worker ahead of the first request
        (``Runtime.preload_at_start``). When every declared version fits in the budget,
        one worker also reads this version's files into the page cache meanwhile."""
        from ..runtimes import runtime_class

        assert v.resolved is not None
        runtime = v.resolved.runtime
        try:
            if not runtime_class(runtime).preload_at_start:
                return
        except CachemeshError:
            return
        fits = sum(x.disk_bytes or x.predicted for x in self._all_versions()) <= self.budget
        paths = [str(v.view)] if fits else []
        calls = []
        for worker in self.workers:
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
        from ..caches import make_spec
        from ..sources import parse_source

        spec = v.spec
        cache_spec = make_spec(name=v.cache, source=spec.source, bucket=v.bucket)
        try:
            view = self.caches.ensure(cache_spec).view
        except ConflictError:
            # A cache of that name exists: reuse it when it holds the same source.
            info = self.caches.get(v.cache)
            wanted = parse_source(spec.source, {}, self.settings)
            if info.bucket != v.bucket:  # never serve another bucket's files
                raise ConflictError(
                    f"model {v.display!r}: cache {v.cache!r} is in another bucket;"
                    " remove it or name the model differently") from None
            if info.spec.get("source") != wanted.uri:  # (info.source is the shown form)
                raise ConflictError(
                    f"model {v.display!r}: cache {v.cache!r} already holds {info.source},"
                    f" not {wanted.display_uri}; remove that cache or name the model"
                    " differently") from None
            view = self.caches.pull(v.cache).view
        label = None if v.label == DEFAULT_VERSION else v.label
        resolved = resolve(view, spec.runtime, spec.parameters, label)
        self._pull_base(v, view, resolved)
        disk = sum(p.stat().st_size for p in view.rglob("*") if p.is_file())
        return view, resolved, disk

    def _pull_base(self, v: Version, view: Path, resolved: Resolved) -> None:
        """An adapter's base model goes through a cache of the model's own bucket, with
        that bucket's protection (never the default bucket, never hub/ for a protected
        one), pulled here; the worker gets its view as a local path. Adapters over one
        base in a bucket share its cache (named by bucket and source)."""
        from ..caches import make_spec
        from ..runtimes import adapters
        from ..sources import parse_source
        from ..sources.base import safe_name

        if resolved.runtime != "transformers" or not adapters.is_adapter(view):
            return
        base = adapters.base_source(view, resolved.parameters)
        source = parse_source(base, {}, self.settings)
        dep = self.deployments.get(v.model)
        # A base named by the adapter's own files, for a model deployed over the API,
        # is held to the deploy roots as parameters.base was when it came.
        roots = tuple(self.cfg.source_roots) if dep is not None and dep.origin == "api" else None
        self.caches.check_source(source, v.bucket, roots)
        key = hashlib.sha256(f"{v.bucket}\n{source.uri}".encode()).hexdigest()[:12]
        name = f"{safe_name(source.default_name())[:64]}.base-{key}"
        spec = make_spec(name=name, source=base, bucket=v.bucket)
        resolved.parameters["base"] = str(self.caches.ensure(spec).view)

    @staticmethod
    def _ready_copy(v: Version) -> Copy | None:
        ready = [c for c in v.copies if c.state == READY and c.worker.alive]
        return pick(ready) if ready else None

    async def _ensure_loaded(self, v: Version, priority: int, deadline: float | None) -> Copy:
        """A ready copy of ``v``, loading one if there is none. It is returned in the
        same step it was found ready in: the caller counts its request on it before
        anything else runs, so no eviction can pick it in between."""
        while True:
            copy = self._ready_copy(v)
            if copy is not None:
                return copy
            if v.removed and not v.inflight:
                # (A request routed to it before it was dropped counts in inflight: it
                # may still load it; _retire waits for it.)
                raise ModelNotFoundError(v.model, v.label)
            if v.phase == FAILED and time.monotonic() < v.failed_until:
                raise ModelFailedError(
                    f"model {v.display!r} is marked failed: {v.reason}",
                    retry_after=v.failed_until - time.monotonic())
            if v.load_task is None:
                # A copy on its way in or out settles first: then load only if none is left.
                unloading = [c.unload_task for c in v.copies if c.unload_task is not None]
                if unloading:
                    await asyncio.shield(unloading[0])
                    continue
                if v.copy_task is not None:
                    with contextlib.suppress(CachemeshError):
                        await asyncio.shield(v.copy_task)
                    continue
            if v.load_task is None:
                v.load_task = self._background(self._load(v, priority, deadline))
            else:
                self.queue.promote(v.ticket[0], priority)
            await asyncio.shield(v.load_task)

    async def _load(self, v: Version, priority: int, deadline: float | None) -> None:
        started = time.monotonic()
        try:
            if v.prepare_task is not None and not v.prepare_task.done():
                await asyncio.shield(v.prepare_task)
            elif v.resolved is None:  # the pull failed earlier; try again
                v.prepare_task = self._background(self._prepare(v))
                await asyncio.shield(v.prepare_task)
            v.phase, v.reason = LOADING, None
            queued = time.monotonic()
            async with self.queue.slot(priority, v.ticket):
                v.ticket[0] = None
                self.metrics.queue_delay.observe(time.monotonic() - queued)
                await self._load_attempts(v, deadline)
            self.metrics.load_time.labels(v.model).observe(time.monotonic() - started)
        except BaseException:
            if v.phase == LOADING:
                v.phase = UNLOADED
            raise
        finally:
            v.load_task = None
            self._notify_capacity()

    async def _load_attempts(self, v: Version, deadline: float | None) -> None:
        errors: list[str] = []
        avoid: set[int] = set()
        for _ in range(self.cfg.load_attempts):
            try:
                await self._load_copy(v, avoid=frozenset(avoid), deadline=deadline)
            except _LoadFailed as failed:
                errors.append(f"worker {failed.worker}: {failed.error}")
                avoid.add(failed.worker)
                self.metrics.load_failures.labels(v.model).inc()
                blob = getattr(failed.error, "corrupt_blob", None)
                if blob:  # every worker reads the same bytes: no retry; verify is told
                    await asyncio.to_thread(self.caches.mark_corrupt, blob, f"model {v.display}")
                    break
                continue
            v.phase = UNLOADED  # not loading any more; Ready comes from the copy
            return
        v.phase = FAILED
        v.reason = (f"{len(errors)} failed loads: " + " | ".join(errors))[:2000]
        v.failed_until = time.monotonic() + self.cfg.failed_ttl_s
        v.error(v.reason)
        raise ModelLoadError(f"model {v.display!r} could not be loaded: {v.reason}")

    async def _load_copy(self, v: Version, *, avoid: frozenset[int] = frozenset(),
                         deadline: float | None = None, extra: bool = False) -> Copy | None:
        """Load one copy of ``v`` on a worker that has none. An extra copy takes free
        memory only (None when there is none); a first copy may evict."""
        assert v.resolved is not None and v.view is not None
        need = v.size() or v.predicted
        placed = await self._place(v, need, avoid, deadline, evict=not extra)
        if placed is None:
            return None
        worker, why = placed
        copy = Copy(v, worker, key=f"{v.id}#{next(self._keys)}", extra=extra, placed=why)
        v.copies.append(copy)
        if v.hold is None:
            await asyncio.to_thread(self._take_hold, v)
        try:
            # What the worker checks the files against (load/integrity.py).
            files = await asyncio.to_thread(self.caches.integrity, v.cache)
            result: Loaded = await worker.call(Load(
                copy.key, v.resolved.runtime, v.resolved.settings(v.model, v.view),
                IntegrityCheck(files, self.cfg.verify_loads)))
        except (ModelLoadError, WorkerCrashedError) as exc:
            self._forget_copy(copy, None)
            raise _LoadFailed(worker.id, exc) from exc
        except BaseException:
            self._forget_copy(copy, None)
            raise
        now = time.monotonic()
        copy.size = _copy_size(result.size, result.reported, v)
        v.metadata = result.metadata
        v.capabilities = {"generate": result.generate, "stream": result.stream}
        copy.state, copy.loaded_at, copy.last_used = READY, now, now
        if not v.last_used:
            v.last_used = now
        v.reason = None
        v.loads += 1
        # The worker's own memory: what it held before this load less the models it
        # held then (by its own word: an unload the server has begun may not have run).
        held = set(result.held)
        others = sum(c.size for o in self._all_versions() for c in o.copies
                     if c.worker is worker and c is not copy and c.key in held)
        worker.base_rss = max(result.rss_before - others, 0)
        self._update_bytes(v.model)
        return copy

    async def _place(self, v: Version, need: int, avoid: frozenset[int],
                     deadline: float | None, *, evict: bool = True
                     ) -> tuple[WorkerHandle, str] | None:
        """Find room (evicting idle copies) and a worker; wait while everything is busy.
        Returns the worker and the placement's reasons (evictions included)."""
        evicted: list[str] = []
        while True:
            here = frozenset(c.worker.id for c in v.copies)
            slots = self._slots()
            plan: Placement = place(
                need, slots, time.monotonic(), pool=self.budget, exclude=here,
                avoid=avoid, evict=evict, min_resident_s=self.cfg.min_resident_s,
                prefer=v.prefetched_on)
            if plan.too_large:
                if not evict:
                    return None
                v.phase = FAILED
                v.reason = f"too large: {plan.reasons[0]}"
                v.failed_until = time.monotonic() + self.cfg.failed_ttl_s
                v.error(v.reason)
                raise ModelTooLargeError(f"model {v.display!r} {plan.reasons[0]}")
            if plan.slot is not None:
                copies = {c.key: c for o in self._all_versions() for c in o.copies}
                victims = [copies[key] for key in plan.evict if key in copies]
                # Start the unloads before any await: no request may pick a victim now.
                # The reason names no model: the victim may be in another bucket.
                tasks = [self._start_unload(c, "evicted to make room for another model",
                                            evicted=True) for c in victims]
                if tasks:
                    log.info("loading %s: %s", v.display, "; ".join(plan.reasons))
                    evicted += [x for x in plan.reasons if x.startswith("evict ")]
                    await asyncio.gather(*(asyncio.shield(t) for t in tasks))
                    continue  # plan again on what the workers hold now
                worker = next(w for w in self.workers if w.id == plan.slot)
                if worker.alive:
                    return worker, "; ".join([*evicted, *plan.reasons])
                continue
            if not evict or not plan.wait:
                if not evict:
                    return None
                raise UnavailableError(f"no worker can take model {v.display!r}: "
                                       + "; ".join(plan.reasons))
            short = need - (self.budget - sum(s.used for s in slots if s.alive))
            bloated = self._bloated(short)
            if bloated is not None:
                await self._recycle(bloated, short)
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise RequestTimeoutError(
                    f"no room to load model {v.display!r} in time: {'; '.join(plan.reasons)}")
            self._capacity_waiters += 1
            try:
                # Woken when a request ends, a load or unload finishes, a worker
                # dies; polled too, for the churn guard's clock.
                await asyncio.wait_for(self._capacity.wait(), min(
                    remaining if remaining is not None else CAPACITY_POLL_S, CAPACITY_POLL_S))
            except TimeoutError:
                pass
            finally:
                self._capacity_waiters -= 1

    async def _capacity_changed(self) -> None:
        """Wait until a request ends, a load or unload finishes or a worker dies (or
        CAPACITY_POLL_S passes)."""
        self._capacity_waiters += 1
        try:
            await asyncio.wait_for(self._capacity.wait(), CAPACITY_POLL_S)
        except TimeoutError:
            pass
        finally:
            self._capacity_waiters -= 1

    def _take_hold(self, v: Version) -> None:
        if v.hold is not None:
            return
        stack = contextlib.ExitStack()
        stack.enter_context(self.caches.open(v.cache))
        v.hold = stack

    def _release_hold(self, v: Version) -> None:
        if v.hold is not None:
            hold, v.hold = v.hold, None
            hold.close()

    def _forget_copy(self, c: Copy, reason: str | None) -> None:
        """The copy is gone (unloaded, failed to load, or its worker died)."""
        v = c.version
        if c in v.copies:
            v.copies.remove(c)
        c.state = UNLOADED
        if v.copies and all(o.extra for o in v.copies):
            # The first copy went (evicted, let go, or its worker died): the oldest
            # of the others is the first one now, and not the first to go.
            min(v.copies, key=lambda o: o.loaded_at or math.inf).extra = False
        if not v.copies:
            self._release_hold(v)
            if reason is not None:
                v.reason = reason
        self._update_bytes(v.model)
        self._notify_capacity()

    def _start_unload(self, c: Copy, reason: str, evicted: bool = False) -> asyncio.Task:
        """The copy's one unload task (started now, synchronously, if none runs).
        From now on no request picks it; those it has in flight finish first."""
        if c.unload_task is None:
            c.state = UNLOADING
            c.unload_task = asyncio.get_running_loop().create_task(
                self._unload_now(c, reason, evicted))
        return c.unload_task

    async def _unload_now(self, c: Copy, reason: str, evicted: bool) -> None:
        v = c.version
        try:
            while c.inflight and c.worker.alive:
                await self._capacity_changed()
            if c.worker.alive:
                await c.worker.call(Unload(c.key))
        except CachemeshError as exc:
            log.warning("unload of %s: %s", c.key, exc)
        finally:
            if evicted:
                v.evictions += 1
                self.metrics.evictions.labels(v.model).inc()
            self._forget_copy(c, reason)
            c.unload_task = None

    async def load(self, name: str, *, wait: bool = True) -> ModelStatus:
        """Load the versions that take traffic now (the repository extension's load)."""
        dep = self._deployment(name)
        targets = [dep.versions[label] for label in dep.doc.serving()]
        for v in targets:
            if v.phase == FAILED:
                v.failed_until = 0.0  # an explicit load clears the mark
        if wait:
            deadline = time.monotonic() + self.cfg.request_timeout_s
            await asyncio.gather(*(self._ensure_loaded(v, BACKGROUND, deadline)
                                   for v in targets))
        else:
            for v in targets:
                self._background(self._load_quietly(v))
        return self._status(dep)

    async def unload(self, name: str) -> ModelStatus:
        """Unload every copy of every version (the repository extension's unload)."""
        dep = self._deployment(name)
        busy = sum(v.inflight for v in dep.versions.values())
        if busy:
            raise ConflictError(f"model {name!r} has {busy} request(s) in flight")
        tasks = [self._start_unload(c, "unloaded on request")
                 for v in dep.versions.values() for c in list(v.copies) if c.state != LOADING]
        await asyncio.gather(*(asyncio.shield(t) for t in tasks))
        return self._status(dep)

    # -- copies ----------------------------------------------------------------------

    async def _scale_loop(self) -> None:
        while True:
            await asyncio.sleep(SCALE_INTERVAL_S)
            try:
                self._scale(time.monotonic())
            except Exception:  # a bug here must not stop the loop
                log.exception("copy scaler")

    def _scale(self, now: float) -> None:
        alive = sum(1 for w in self.workers if w.alive)
        for dep in list(self.deployments.values()):
            for v in dep.versions.values():
                v.rate = v.meter.sample(now, v.requests)
                ready = v.ready_copies()
                if not ready or v.removed or dep.removed or self.draining:
                    v.low_since = None
                    continue
                counted = len(ready) + sum(1 for c in v.copies if c.state == LOADING)
                s = decide(v.rate, counted, dep.policy, alive, now, v.low_since)
                v.low_since = s.low_since
                if s.reason:
                    v.scaling = s.reason
                if s.delta > 0 and v.copy_task is None and v.load_task is None:
                    v.copy_task = self._background(self._add_copy(v, s.reason))
                elif s.delta < 0 and len(ready) > 1:
                    victim = min(ready, key=lambda c: (c.inflight, c.last_used))
                    log.info("%s: letting the copy on worker %d go (%s)", v.display,
                             victim.worker.id, s.reason)
                    self._start_unload(victim, "extra copy no longer needed")

    async def _add_copy(self, v: Version, why: str) -> None:
        try:
            async with self.queue.slot(BACKGROUND):
                if v.removed or not v.ready_copies():
                    return
                copy = await self._load_copy(v, extra=True)
            if copy is None:
                v.scaling = f"{why}; no worker has room for another copy without evicting"
            else:
                log.info("%s: another copy on worker %d (%s)", v.display, copy.worker.id, why)
        except _LoadFailed as failed:
            v.error(f"extra copy on worker {failed.worker}: {failed.error}")
            self.metrics.load_failures.labels(v.model).inc()
        except CachemeshError as exc:
            v.error(f"extra copy: {exc}")
        finally:
            v.copy_task = None

    # -- inference -------------------------------------------------------------------

    def _admit(self, name: str, version: str | None, headers: Mapping[str, str] | None,
               parameters: Mapping[str, Any] | None) -> tuple[Deployment, Version]:
        if self.draining:
            raise DrainingError("the server is shutting down", retry_after=1.0)
        if self.inflight >= self.cfg.max_inflight:
            raise OverloadedError(
                f"{self.inflight} requests in flight, the most this server takes"
                " (CACHEMESH_SERVE_MAX_INFLIGHT)", retry_after=1.0)
        _, dep, v = self._route(name, version, headers, parameters)
        self.inflight += 1
        v.inflight += 1
        self._idle.clear()
        return dep, v

    def _series(self, dep: Deployment) -> Series:
        m, name = self.metrics, dep.name
        dep.series = Series(m.inflight.labels(name), m.hits.labels(name), m.misses.labels(name),
                            m.requests.labels(name, "ok"), m.latency.labels(name))
        return dep.series

    def _routed(self, v: Version) -> Any:
        v.routed = self.metrics.routed.labels(v.model, v.label)
        return v.routed

    def _done(self, v: Version) -> None:
        self.inflight -= 1
        v.inflight -= 1
        v.requests += 1
        now = time.monotonic()
        v.uses = v.uses * 0.5 ** ((now - v.last_used) / USES_HALF_LIFE_S) + 1.0
        v.last_used = now
        v.last_used_wall = time.time()
        if v.inflight == 0 and v.removed:
            self._notify_capacity()  # its retirement waits for this
        if self.inflight == 0:
            self._idle.set()

    async def _copy_for(self, v: Version, series: Series | None, deadline: float) -> Copy:
        copy = self._ready_copy(v)
        if copy is None:
            if series is not None:
                series.misses.inc()
            v.waiting += 1
            try:
                copy = await self._ensure_loaded(v, REQUEST, deadline)
            finally:
                v.waiting -= 1
        elif series is not None:
            series.hits.inc()
        copy.inflight += 1
        self._tick += 1
        copy.picked = self._tick
        return copy

    def _release(self, copy: Copy) -> None:
        copy.inflight -= 1
        copy.last_used = time.monotonic()
        if copy.inflight == 0:
            self._notify_capacity()

    async def infer(self, name: str, version: str | None, request: InferenceRequest, *,
                    headers: Mapping[str, str] | None = None) -> InferenceResponse:
        """Answer a V2 request. ``version``: one the request names (path); else the
        model's routes and traffic choose, from ``headers`` (lower-case names) and
        the request's parameters. ``response.model_version`` is the version that answered."""
        dep, v = self._admit(name, version, headers, request.parameters)
        started = time.perf_counter()
        outcome = "error"
        series = dep.series or self._series(dep)
        series.inflight.inc()
        copy: Copy | None = None
        try:
            try:
                async with asyncio.timeout(self.cfg.request_timeout_s):
                    copy = await self._copy_for(
                        v, series, time.monotonic() + self.cfg.request_timeout_s)
                    response: InferenceResponse = await copy.worker.call(
                        Infer(copy.key, request))
            except TimeoutError:
                raise RequestTimeoutError(
                    f"model {name!r} did not answer within {self.cfg.request_timeout_s:g}s"
                ) from None
            response.model_name = name
            # "default" stands for no version (the simple forms): the body says none, as it
            # always did; the adapter's x-model-version header still names it.
            response.model_version = v.label
            response.id = request.id
            outcome = "ok"
            return response
        except (InvalidInputError, ModelNotFoundError):
            outcome = "client_error"
            raise
        except RequestTimeoutError:
            outcome = "timeout"
            raise
        except UnavailableError:
            outcome = "unavailable"
            raise
        except ModelFailedError:
            outcome = "failed"
            raise
        finally:
            if copy is not None:
                self._release(copy)
            series.inflight.dec()
            self._done(v)
            (series.ok if outcome == "ok" else self.metrics.requests.labels(name, outcome)).inc()
            (v.routed or self._routed(v)).inc()
            series.latency.observe(time.perf_counter() - started)

    async def generate(self, name: str, payload: dict[str, Any], *, version: str | None = None,
                       headers: Mapping[str, str] | None = None,
                       parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The optional ``generate`` hook of a runtime (issue 7's OpenAI adapter calls this).
        ``version``, ``headers`` and ``parameters`` choose the version as :meth:`route`."""
        _, v = self._admit(name, version, headers, parameters)
        copy: Copy | None = None
        try:
            copy = await self._copy_for(v, None, time.monotonic() + self.cfg.request_timeout_s)
            if not v.capabilities.get("generate"):
                raise InferenceInputError(f"model {name!r} does not generate")
            async with asyncio.timeout(self.cfg.request_timeout_s):
                return await copy.worker.call(Generate(copy.key, payload))
        finally:
            if copy is not None:
                self._release(copy)
            self._done(v)

    async def stream(self, name: str, payload: dict[str, Any], *, version: str | None = None,
                     headers: Mapping[str, str] | None = None,
                     parameters: Mapping[str, Any] | None = None) -> AsyncIterator[Any]:
        """The optional ``stream`` hook: chunks as the worker yields them. The version
        is chosen (as :meth:`route`) when the first chunk is asked for."""
        _, v = self._admit(name, version, headers, parameters)
        copy: Copy | None = None
        try:
            copy = await self._copy_for(v, None, time.monotonic() + self.cfg.request_timeout_s)
            if not v.capabilities.get("stream"):
                raise InferenceInputError(f"model {name!r} does not stream")
            async for chunk in copy.worker.stream(Stream(copy.key, payload)):
                yield chunk
        finally:
            if copy is not None:
                self._release(copy)
            self._done(v)

    async def runtime_stats(self, name: str) -> dict[str, Any]:
        """The runtime's own counters (``Runtime.stats``: tokens generated, load phases)
        of each loaded copy of the model; ``stats`` is the first one's. Loads nothing."""
        dep = self._deployment(name)
        copies = [c for v in dep.versions.values() for c in v.copies if c.ready]

        async def ask(c: Copy) -> dict[str, Any]:
            reply = await asyncio.wait_for(c.worker.call(Stats()), self.cfg.request_timeout_s)
            return {"version": c.version.label, "worker": c.worker.id,
                    "stats": reply.stats.get(c.key, {})}

        found = list(await asyncio.gather(*(ask(c) for c in copies)))
        return {"loaded": bool(found), "stats": found[0]["stats"] if found else {},
                "copies": found}



def _copy_size(measured: int, reported: bool, v: Version) -> int:
    """What a loaded copy holds, for the memory accounting. RSS growth undercounts a
    load into memory its worker freed before (the allocator reuses it: a version
    reloaded after a rollback measured 1 byte), and an undercounted copy looks free
    to the placement of the next one; below half its bytes on disk, the prediction
    stands in. A size the runtime reports itself is taken as it is."""
    if not reported and measured < v.disk_bytes // 2:
        return max(v.predicted, measured, 1)
    return max(measured, 1)


def _shares(doc: ModelDoc) -> str:
    return ", ".join(f"{v} {p}%" for v, p in doc.traffic.items() if p) or "routes only"

def describe_size(n: int | None) -> str:
    return "-" if not n else format_size(n)
