"""The model service: the protocol-free core every adapter calls.

It knows models, workers and memory; it knows nothing of HTTP or gRPC (the V2
REST adapter, the control API, and later V2 gRPC and OpenAI translate their
wire formats into calls here, and errors from :mod:`cachemesh.errors` back).

A model goes through::

    Pulling -> Unloaded -> Loading -> Ready -> Unloading -> Unloaded ...
                              |
                              +--> Failed (after ``load_attempts`` failed loads; expires)

- Pulling: its source is pulled through the cache (``Caches.ensure``) once,
  at deploy time, in the background; its files then live in a cache view.
- Loading: one load per model at a time (a single shared task that every
  request waiting on the model awaits), through the load queue (bounded,
  ``load_concurrency`` at once, request-driven loads first). The placement
  function (``placement.py``) picks a worker and the idle models to evict;
  a load whose worker raised, crashed or ran out of memory is tried again on
  another worker.
- Ready: requests go straight to the worker that holds it. While loaded, the
  model's cache is held open (``Caches.open``) so the store's gc and eviction
  leave its files alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..access import can_use
from ..config import Settings, format_size
from ..errors import (
    CachemeshError,
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
from . import ipc
from .loadqueue import BACKGROUND, REQUEST, LoadQueue, Ticket
from .memory import default_budget
from .metrics import Metrics
from .placement import ModelView, Placement, WorkerView, held, place
from .registry import DEFAULT_BUCKET, ModelRegistry, ModelSpec
from .workers import WorkerHandle

log = logging.getLogger("cachemesh.serve")

PULLING, UNLOADED, LOADING, READY, UNLOADING, FAILED = (
    "Pulling", "Unloaded", "Loading", "Ready", "Unloading", "Failed")
MODEL_BUCKET = DEFAULT_BUCKET
CAPACITY_POLL_S = 0.05
USES_HALF_LIFE_S = 30.0


@dataclass
class ModelStatus:
    """What the control API and ``cachemesh models ls`` show of a model."""

    name: str
    version: str | None
    source: str
    runtime: str | None
    state: str
    reason: str | None
    eager: bool
    origin: str  # "config": the command line or --config; "api": deployed at run time
    bucket: str  # of its cache; a protected bucket hides the model from callers without its token
    worker: int | None
    size_bytes: int | None  # measured after the last load
    predicted_bytes: int | None
    inflight: int
    loads: int
    evictions: int
    last_used: float | None  # unix time
    view: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Series:
    inflight: Any
    hits: Any
    misses: Any
    ok: Any
    latency: Any


@dataclass(eq=False)
class Model:
    spec: ModelSpec
    origin: str
    state: str = PULLING
    reason: str | None = None
    view: Path | None = None
    resolved: Resolved | None = None
    disk_bytes: int = 0
    predicted: int = 0
    size: int = 0
    worker: WorkerHandle | None = None
    key: str = ""
    generation: int = 0
    inflight: int = 0
    last_used: float = 0.0  # monotonic
    last_used_wall: float | None = None
    uses: float = 0.0  # recent uses, halving every USES_HALF_LIFE_S (the churn guard)
    loaded_at: float = 0.0
    loads: int = 0
    evictions: int = 0
    failed_until: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    capabilities: dict[str, bool] = field(default_factory=dict)
    prepare_task: asyncio.Task | None = None
    load_task: asyncio.Task | None = None
    unload_task: asyncio.Task | None = None
    ticket: list[Ticket | None] = field(default_factory=lambda: [None])
    hold: contextlib.ExitStack | None = None
    removed: bool = False
    series: _Series | None = None  # its metric series, looked up once

    @property
    def name(self) -> str:
        return self.spec.name


class ModelService:
    """Many models on a few worker processes, under one memory budget."""

    def __init__(self, settings: Settings, *, registry: ModelRegistry | None = None,
                 caches: Any = None) -> None:
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
        self.models: dict[str, Model] = {}
        self.workers: list[WorkerHandle] = []
        self.queue = LoadQueue(self.cfg.load_concurrency, self.cfg.load_queue)
        self.inflight = 0
        self.started = False
        self.warm = False
        self.draining = False
        self.stopping = False
        self._next_worker_id = 0
        self._capacity = asyncio.Event()
        self._capacity_waiters = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task] = set()
        self._warmed: set[tuple[int, str]] = set()  # (worker id, runtime) preloaded

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, specs: list[ModelSpec] = ()) -> None:  # type: ignore[assignment]
        """Start the workers, declare the models, and warm up in the background:
        readiness turns true once every eager model has loaded (or failed)."""
        n = self.cfg.worker_count()
        self.workers = list(await asyncio.gather(*(self._spawn() for _ in range(n))))
        self.started = True
        declared = {s.name for s in specs}
        for spec in specs:
            self._add(spec, origin="config")
        for spec in self.registry.list():
            if spec.name not in declared:
                self._add(spec, origin="api")
        eager = [m for m in self.models.values() if m.spec.eager]
        self._background(self._warm_up(eager))

    async def _warm_up(self, eager: list[Model]) -> None:
        await asyncio.gather(*(self._load_quietly(m) for m in eager))
        self.warm = True

    async def _load_quietly(self, model: Model) -> None:
        try:
            await self._ensure_loaded(model, BACKGROUND, deadline=None)
        except CachemeshError as exc:
            log.warning("eager load of %s failed: %s", model.name, exc)

    async def stop(self) -> None:
        self.stopping = True
        self.draining = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        for model in self.models.values():
            self._release_hold(model)

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
                           environ={**self.settings.environ,
                                    "CACHEMESH_HOME": str(self.settings.home)})
        return worker

    def _on_worker_death(self, worker: WorkerHandle) -> None:
        log.warning("%s", worker.exit_reason)
        for model in self.models.values():
            if model.worker is worker and model.state in (READY, UNLOADING):
                self._mark_unloaded(model, f"{worker.exit_reason}; loads again on demand")
        if not self.stopping:
            self.metrics.restarts.inc()
            self._background(self._replace(worker))
        self._notify_capacity()

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

    # -- models: declare, list, remove ---------------------------------------------

    def _add(self, spec: ModelSpec, origin: str) -> Model:
        model = Model(spec=spec, origin=origin)
        self.models[spec.name] = model
        model.prepare_task = self._background(self._prepare(model))
        return model

    async def deploy(self, spec: ModelSpec, *, persist: bool = True) -> ModelStatus:
        """Add a model at run time (kept in the registry so it survives a restart).
        Its source is checked now; the pull runs in the background."""
        from ..sources import parse_source

        # An unknown scheme, a path into the store, or one outside the deployable
        # roots fails here, as 400, before anything is kept.
        source = parse_source(spec.source, {}, self.settings)
        self.caches.check_source(source, spec.bucket, self.cfg.source_roots if persist else ())
        if not can_use(self.caches.buckets, spec.bucket):
            raise ForbiddenError(f"bucket {spec.bucket!r} is protected; the request does not"
                                 " carry its token")
        existing = self.models.get(spec.name)
        if existing is not None and not self._visible(existing):
            raise ConflictError(f"the name {spec.name!r} is taken")
        if existing is not None:
            if existing.spec == spec:
                return self.status(spec.name)
            raise ConflictError(
                f"model {spec.name!r} exists with another spec; remove it first")
        if persist:
            self.registry.put(spec)
        model = self._add(spec, origin="api" if persist else "config")
        if spec.eager:
            self._background(self._load_quietly(model))
        return self.status(spec.name)

    async def remove(self, name: str) -> None:
        model = self._get(name)
        model.removed = True
        self.registry.remove(name)
        if model.load_task is not None:
            with contextlib.suppress(CachemeshError, asyncio.CancelledError):
                await asyncio.shield(model.load_task)
        await self._unload(model, reason="removed")
        self.models.pop(name, None)
        if model.prepare_task is not None:
            model.prepare_task.cancel()

    def _visible(self, model: Model) -> bool:
        """Whether the caller of the current request may see the model (access.py)."""
        return can_use(self.caches.buckets, model.spec.bucket)

    def _get(self, name: str, version: str | None = None) -> Model:
        model = self.models.get(name)
        if model is None or model.removed or not self._visible(model):
            raise ModelNotFoundError(name, version)
        if version and version != (model.spec.version or model.resolved and model.resolved.version):
            raise ModelNotFoundError(name, version)
        return model

    def status(self, name: str) -> ModelStatus:
        return self._status(self._get(name))

    def list_models(self) -> list[ModelStatus]:
        return [self._status(m) for _, m in sorted(self.models.items())
                if not m.removed and self._visible(m)]

    def _status(self, m: Model) -> ModelStatus:
        state = m.state
        if state == FAILED and time.monotonic() >= m.failed_until:
            state = UNLOADED
        return ModelStatus(
            name=m.name, version=self.version_of(m), source=m.spec.source,
            runtime=m.resolved.runtime if m.resolved else m.spec.runtime, state=state,
            reason=m.reason, eager=m.spec.eager, origin=m.origin, bucket=m.spec.bucket,
            worker=m.worker.id if m.worker is not None and state == READY else None,
            size_bytes=m.size or None, predicted_bytes=m.predicted or None,
            inflight=m.inflight, loads=m.loads, evictions=m.evictions,
            last_used=m.last_used_wall, view=str(m.view) if m.view else None,
        )

    def version_of(self, m: Model) -> str | None:
        return m.spec.version or (m.resolved.version if m.resolved else None)

    def is_ready(self, name: str, version: str | None = None) -> bool:
        m = self._get(name, version)
        return m.state == READY and m.worker is not None and m.worker.alive

    async def metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """V2 model metadata. A model that is not loaded answers from what it declares."""
        m = self._get(name, version)
        if m.resolved is None and m.prepare_task is not None:
            with contextlib.suppress(CachemeshError):
                await asyncio.shield(m.prepare_task)
        meta = dict(m.metadata) if m.metadata else {}
        if not meta and m.resolved is not None:
            meta = {"inputs": m.resolved.inputs, "outputs": m.resolved.outputs}
        version = self.version_of(m)
        return {
            "name": m.name,
            "versions": [version] if version else [],
            "platform": meta.get("platform") or (m.resolved.runtime if m.resolved else ""),
            "inputs": meta.get("inputs") or [],
            "outputs": meta.get("outputs") or [],
        }

    # -- memory ----------------------------------------------------------------------

    def memory(self) -> dict[str, Any]:
        models = self._model_views()
        workers = []
        for w in self.workers:
            view = self._worker_view(w)
            workers.append({"id": w.id, "pid": w.pid, "alive": w.alive, "rss_bytes": view.rss,
                            "base_bytes": view.base, "held_bytes": held(view, models),
                            "models": list(view.models)})
        total = sum(x["held_bytes"] for x in workers if x["alive"])
        return {"budget_bytes": self.budget, "held_bytes": total, "workers": workers}

    def refresh_gauges(self) -> None:
        mem = self.memory()
        self.metrics.held.set(mem["held_bytes"])
        for w in mem["workers"]:
            self.metrics.worker_rss.labels(str(w["id"])).set(w["rss_bytes"])
        self.metrics.loaded.set(sum(1 for m in self.models.values() if m.state == READY))

    def _worker_view(self, w: WorkerHandle) -> WorkerView:
        on = tuple(m.name for m in self.models.values()
                   if m.worker is w and m.state in (READY, LOADING, UNLOADING))
        reserved = sum(m.predicted for m in self.models.values()
                       if m.worker is w and m.state == LOADING)
        return WorkerView(w.id, w.alive, w.base_rss, w.rss(), on, reserved)

    def _model_views(self) -> list[ModelView]:
        now = time.monotonic()
        return [ModelView(m.name, m.worker.id, m.size or m.predicted, m.inflight, m.last_used,
                          m.loaded_at, loading=m.state != READY,
                          uses=m.uses * 0.5 ** ((now - m.last_used) / USES_HALF_LIFE_S))
                for m in self.models.values()
                if m.worker is not None and m.state in (READY, UNLOADING)]

    def _notify_capacity(self) -> None:
        if self._capacity_waiters:
            event, self._capacity = self._capacity, asyncio.Event()
            event.set()

    # -- loading ---------------------------------------------------------------------

    async def _prepare(self, model: Model) -> None:
        """Pull the model's source through the cache and decide its runtime."""
        model.state, model.reason = PULLING, None
        try:
            view, resolved, disk = await asyncio.to_thread(self._prepare_sync, model.spec)
        except CachemeshError as exc:
            model.state, model.reason = FAILED, f"pull failed: {exc}"
            model.failed_until = time.monotonic() + self.cfg.failed_ttl_s
            raise
        model.view, model.resolved, model.disk_bytes = view, resolved, disk
        model.predicted = max(int(disk * self.cfg.memory_factor), 1)
        if model.state == PULLING:
            model.state = UNLOADED
        self._background(self._warm_workers(model))

    async def _warm_workers(self, model: Model) -> None:
        """Import a slow runtime's framework in every worker ahead of the first request
        (``Runtime.preload_at_start``). When every declared model fits in the budget,
        one worker also reads this model's files into the page cache meanwhile."""
        from ..runtimes import runtime_class

        assert model.resolved is not None
        runtime = model.resolved.runtime
        try:
            if not runtime_class(runtime).preload_at_start:
                return
        except CachemeshError:
            return
        fits = sum(m.disk_bytes or m.predicted for m in self.models.values()) <= self.budget
        paths = [str(model.view)] if fits else []
        calls = []
        for worker in self.workers:
            if not worker.alive or (not paths and (worker.id, runtime) in self._warmed):
                continue
            self._warmed.add((worker.id, runtime))
            calls.append(worker.call(ipc.PRELOAD, "", {"runtime": runtime, "paths": paths}))
            paths = []  # the page cache is shared: one worker reads ahead
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, Exception):
                log.warning("preloading runtime %s: %s", runtime, result)

    def _prepare_sync(self, spec: ModelSpec) -> tuple[Path, Resolved, int]:
        from ..caches import make_spec
        from ..sources import parse_source

        cache_spec = make_spec(name=spec.name, source=spec.source, bucket=spec.bucket)
        try:
            view = self.caches.ensure(cache_spec).view
        except ConflictError:
            # A cache of that name exists: reuse it when it holds the same source.
            info = self.caches.get(spec.name)
            wanted = parse_source(spec.source, {}, self.settings).uri
            if info.bucket != spec.bucket:  # never serve another bucket's files
                raise ConflictError(
                    f"model {spec.name!r}: a cache of that name is in another bucket;"
                    " remove it or name the model differently")
            if info.source != wanted:
                raise ConflictError(
                    f"model {spec.name!r}: cache {spec.name!r} already holds {info.source},"
                    f" not {wanted}; remove that cache or name the model differently") from None
            view = self.caches.pull(spec.name).view
        resolved = resolve(view, spec.runtime, spec.parameters, spec.version)
        disk = sum(p.stat().st_size for p in view.rglob("*") if p.is_file())
        return view, resolved, disk

    async def _ensure_loaded(self, model: Model, priority: int,
                             deadline: float | None) -> WorkerHandle:
        while True:
            if model.state == READY and model.worker is not None and model.worker.alive:
                return model.worker
            if model.removed:
                raise ModelNotFoundError(model.name)
            if model.state == FAILED and time.monotonic() < model.failed_until:
                raise ModelFailedError(
                    f"model {model.name!r} is marked failed: {model.reason}",
                    retry_after=model.failed_until - time.monotonic())
            if model.unload_task is not None:
                await asyncio.shield(model.unload_task)
                continue
            if model.load_task is None:
                model.load_task = self._background(self._load(model, priority, deadline))
            else:
                self.queue.promote(model.ticket[0], priority)
            await asyncio.shield(model.load_task)

    async def _load(self, model: Model, priority: int, deadline: float | None) -> None:
        started = time.monotonic()
        try:
            if model.prepare_task is not None and not model.prepare_task.done():
                await asyncio.shield(model.prepare_task)
            elif model.resolved is None:  # the pull failed earlier; try again
                model.prepare_task = self._background(self._prepare(model))
                await asyncio.shield(model.prepare_task)
            model.state, model.reason = LOADING, None
            queued = time.monotonic()
            async with self.queue.slot(priority, model.ticket):
                model.ticket[0] = None
                self.metrics.queue_delay.observe(time.monotonic() - queued)
                await self._load_attempts(model, deadline)
            self.metrics.load_time.labels(model.name).observe(time.monotonic() - started)
        except BaseException:
            if model.state == LOADING:
                model.state = UNLOADED
            raise
        finally:
            model.load_task = None
            self._notify_capacity()

    async def _load_attempts(self, model: Model, deadline: float | None) -> None:
        assert model.resolved is not None and model.view is not None
        errors: list[str] = []
        avoid: set[int] = set()
        for _ in range(self.cfg.load_attempts):
            worker = await self._place(model, frozenset(avoid), deadline)
            model.generation += 1
            model.key = f"{model.name}#{model.generation}"
            model.worker = worker
            await asyncio.to_thread(self._take_hold, model)
            try:
                spec = {"runtime": model.resolved.runtime,
                        "settings": model.resolved.settings(model.name, model.view)}
                result = await worker.call(ipc.LOAD, model.key, spec)
            except (ModelLoadError, WorkerCrashedError) as exc:
                self._release_hold(model)
                model.worker = None
                errors.append(f"worker {worker.id}: {exc}")
                avoid.add(worker.id)
                self.metrics.load_failures.labels(model.name).inc()
                self._notify_capacity()
                continue
            now = time.monotonic()
            model.size = max(int(result["size"]), 1)
            model.metadata = result["metadata"]
            model.capabilities = {"generate": result["generate"], "stream": result["stream"]}
            model.state, model.reason = READY, None
            model.loaded_at = model.last_used = now
            model.loads += 1
            # The worker's own memory: what it holds less its models.
            others = sum(m.size for m in self.models.values()
                         if m.worker is worker and m is not model and m.state == READY)
            worker.base_rss = max(int(result["rss_before"]) - others, 0)
            self.metrics.model_bytes.labels(model.name).set(model.size)
            if model.removed:
                await self._unload(model, reason="removed")
            return
        model.state = FAILED
        model.reason = (f"{len(errors)} failed loads: " + " | ".join(errors))[:2000]
        model.failed_until = time.monotonic() + self.cfg.failed_ttl_s
        model.worker = None
        raise ModelLoadError(f"model {model.name!r} could not be loaded: {model.reason}")

    async def _place(self, model: Model, avoid: frozenset[int],
                     deadline: float | None) -> WorkerHandle:
        """Find room (evicting idle models) and a worker; wait while everything is busy."""
        while True:
            plan: Placement = place(
                model.predicted, [self._worker_view(w) for w in self.workers],
                self._model_views(), self.budget, time.monotonic(),
                min_resident_s=self.cfg.min_resident_s, avoid=avoid)
            if plan.too_large:
                model.state = FAILED
                model.reason = f"too large: {plan.reasons[0]}"
                model.failed_until = time.monotonic() + self.cfg.failed_ttl_s
                raise ModelTooLargeError(f"model {model.name!r} {plan.reasons[0]}")
            if plan.worker is not None:
                victims = [self.models[name] for name in plan.evict]
                # Start the unloads before any await: no request may pick a victim now.
                # The reason names no model: the victim may be in another bucket.
                tasks = [self._start_unload(v, "evicted to make room for another model",
                                            evicted=True) for v in victims]
                if tasks:
                    log.info("loading %s: %s", model.name, "; ".join(plan.reasons))
                    await asyncio.gather(*(asyncio.shield(t) for t in tasks))
                    continue  # plan again on what the workers hold now
                worker = next(w for w in self.workers if w.id == plan.worker)
                if worker.alive:
                    return worker
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise RequestTimeoutError(
                    f"no room to load model {model.name!r} in time: {'; '.join(plan.reasons)}")
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

    def _take_hold(self, model: Model) -> None:
        self._release_hold(model)
        stack = contextlib.ExitStack()
        stack.enter_context(self.caches.open(model.name))
        model.hold = stack

    def _release_hold(self, model: Model) -> None:
        if model.hold is not None:
            hold, model.hold = model.hold, None
            hold.close()

    def _mark_unloaded(self, model: Model, reason: str | None) -> None:
        model.state, model.reason, model.worker = UNLOADED, reason, None
        self._release_hold(model)
        self.metrics.model_bytes.remove(model.name) if model.size else None
        model.size = 0

    async def _unload(self, model: Model, *, reason: str, evicted: bool = False) -> None:
        if model.unload_task is None and model.worker is None:
            if model.state in (READY, UNLOADING):
                self._mark_unloaded(model, reason)
            return
        await asyncio.shield(self._start_unload(model, reason, evicted))

    def _start_unload(self, model: Model, reason: str, evicted: bool = False) -> asyncio.Task:
        """The model's one unload task (started now, synchronously, if none runs)."""
        if model.unload_task is None:
            model.state = UNLOADING
            model.unload_task = asyncio.get_running_loop().create_task(
                self._unload_now(model, reason, evicted))
        return model.unload_task

    async def _unload_now(self, model: Model, reason: str, evicted: bool) -> None:
        model.state = UNLOADING
        worker = model.worker
        try:
            if worker is not None and worker.alive:
                await worker.call(ipc.UNLOAD, model.key)
        except CachemeshError as exc:
            log.warning("unload of %s: %s", model.name, exc)
        finally:
            if evicted:
                model.evictions += 1
                self.metrics.evictions.labels(model.name).inc()
            self._mark_unloaded(model, reason)
            model.unload_task = None
            self._notify_capacity()

    async def load(self, name: str, *, wait: bool = True) -> ModelStatus:
        """Load now (the repository extension's load; ``eager``)."""
        model = self._get(name)
        if model.state == FAILED:
            model.failed_until = 0.0  # an explicit load clears the mark
        if wait:
            await self._ensure_loaded(model, BACKGROUND,
                                      time.monotonic() + self.cfg.request_timeout_s)
        else:
            self._background(self._load_quietly(model))
        return self._status(model)

    async def unload(self, name: str) -> ModelStatus:
        model = self._get(name)
        if model.inflight:
            raise ConflictError(f"model {name!r} has {model.inflight} request(s) in flight")
        await self._unload(model, reason="unloaded on request")
        return self._status(model)

    # -- inference -------------------------------------------------------------------

    def _admit(self, name: str, version: str | None) -> Model:
        if self.draining:
            raise DrainingError("the server is shutting down", retry_after=1.0)
        if self.inflight >= self.cfg.max_inflight:
            raise OverloadedError(
                f"{self.inflight} requests in flight, the most this server takes"
                " (CACHEMESH_SERVE_MAX_INFLIGHT)", retry_after=1.0)
        model = self._get(name, version)
        self.inflight += 1
        model.inflight += 1
        self._idle.clear()
        return model

    def _series(self, model: Model) -> _Series:
        m, name = self.metrics, model.name
        model.series = _Series(m.inflight.labels(name), m.hits.labels(name), m.misses.labels(name),
                               m.requests.labels(name, "ok"), m.latency.labels(name))
        return model.series

    def _done(self, model: Model) -> None:
        self.inflight -= 1
        model.inflight -= 1
        now = time.monotonic()
        model.uses = model.uses * 0.5 ** ((now - model.last_used) / USES_HALF_LIFE_S) + 1.0
        model.last_used = now
        model.last_used_wall = time.time()
        if model.inflight == 0:
            self._notify_capacity()
        if self.inflight == 0:
            self._idle.set()

    async def infer(self, name: str, version: str | None,
                    request: InferenceRequest) -> InferenceResponse:
        model = self._admit(name, version)
        started = time.perf_counter()
        outcome = "error"
        series = model.series or self._series(model)
        series.inflight.inc()
        try:
            deadline = time.monotonic() + self.cfg.request_timeout_s
            try:
                async with asyncio.timeout(self.cfg.request_timeout_s):
                    worker = model.worker
                    if model.state != READY or worker is None or not worker.alive:
                        series.misses.inc()
                        worker = await self._ensure_loaded(model, REQUEST, deadline)
                    else:
                        series.hits.inc()
                    response: InferenceResponse = await worker.call(ipc.INFER, model.key, request)
            except TimeoutError:
                raise RequestTimeoutError(
                    f"model {name!r} did not answer within {self.cfg.request_timeout_s:g}s"
                ) from None
            response.model_name = name
            response.model_version = self.version_of(model)
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
            series.inflight.dec()
            self._done(model)
            (series.ok if outcome == "ok" else self.metrics.requests.labels(name, outcome)).inc()
            series.latency.observe(time.perf_counter() - started)

    async def generate(self, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The optional ``generate`` hook of a runtime (issue 7's OpenAI adapter calls this)."""
        model = self._admit(name, None)
        try:
            worker = await self._ensure_loaded(
                model, REQUEST, time.monotonic() + self.cfg.request_timeout_s)
            if not model.capabilities.get("generate"):
                raise InferenceInputError(f"model {name!r} does not generate")
            async with asyncio.timeout(self.cfg.request_timeout_s):
                return await worker.call(ipc.GENERATE, model.key, payload)
        finally:
            self._done(model)

    async def stream(self, name: str, payload: dict[str, Any]) -> AsyncIterator[Any]:
        """The optional ``stream`` hook: chunks as the worker yields them."""
        model = self._admit(name, None)
        try:
            worker = await self._ensure_loaded(
                model, REQUEST, time.monotonic() + self.cfg.request_timeout_s)
            if not model.capabilities.get("stream"):
                raise InferenceInputError(f"model {name!r} does not stream")
            async for chunk in worker.stream(model.key, payload):
                yield chunk
        finally:
            self._done(model)

    async def runtime_stats(self, name: str) -> dict[str, Any]:
        """The loaded model's own counters (``Runtime.stats``: tokens generated, load
        phases); empty while it is not loaded. Loads nothing."""
        model = self._get(name)
        worker = model.worker
        if model.state != READY or worker is None or not worker.alive:
            return {"loaded": False, "stats": {}}
        key = model.key
        reply = await asyncio.wait_for(worker.call(ipc.STATS, key), self.cfg.request_timeout_s)
        return {"loaded": True, "stats": reply.get("stats", {}).get(key, {})}


def describe_size(n: int | None) -> str:
    return "-" if not n else format_size(n)
