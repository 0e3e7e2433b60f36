"""The model service: the protocol-free core every adapter calls, and a facade.

It knows models, slots and memory; it knows nothing of HTTP or gRPC: the
adapters (``serve/adapters/``: ``v2_rest.py``, ``v2_grpc.py``, ``openai.py``,
``control.py``) translate their wire formats into calls here, and errors from
:mod:`cachemesh.errors` back. What it holds is drawn in ``state.py``; the work
is done by its parts, all beside it in ``serve/core/``:

    deployments.py  declare, apply (roll out), retire, remove; their checks
    loading.py      the life of a copy: load, adopt, unload; a slot lost
    prepare.py      a version's files pulled through the cache, its runtime decided
    introspect.py   V2 metadata, Triton-style statistics, the runtime's own counters
    pool.py         the worker processes: spawn, death, recycle, replace; memory
    copies.py       the copy scaler: more copies of a busy version, fewer after
    placement.py    where a copy loads and what is evicted (pure)
    routing.py      which version answers a request (pure)
    accounting.py   what a request and the state leave in /metrics

The worker processes themselves are ``serve/workers/`` (``workers.py``'s
``WorkerHandle`` is the slot the pool holds); cluster mode (``serve/cluster/``)
reaches the service only through the ClusterContext it is given.

Here: start, stop and drain; :meth:`ModelService.route`, the one place that
picks the version a request goes to (path, then routes, then traffic);
``infer``, ``generate`` and ``stream``, which route, take a ready copy (loading
one if there is none: ``Loader.ensure_loaded``) and call its slot; and status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ...config import Settings
from ...errors import (
    CachemeshError,
    DrainingError,
    InferenceInputError,
    OverloadedError,
    RequestTimeoutError,
)
from ...runtimes import InferenceRequest, InferenceResponse
from ..workers.messages import Generate, Infer, Stream
from ..workers.workers import Launched, WorkerHandle
from .accounting import Counted, refresh_gauges, routed_of
from .copies import CopyScaler
from .deployments import Deployments
from .documents import ModelDoc
from .introspect import Introspection
from .loading import Loader
from .loadqueue import REQUEST
from .metrics import LLMSeries, Metrics
from .pool import USES_HALF_LIFE_S, WorkerPool
from .registry import ModelRegistry, ModelSpec
from .routing import Decision
from .shared import Background, Shared
from .state import Copy, Deployment, ModelStatus, Series, Version, versions_of

if TYPE_CHECKING:
    from ..cluster.cluster_mode import ClusterContext

log = logging.getLogger("cachemesh.serve")
PINNED_VERSION = "cachemesh-forwarded-version"


class ModelService:
    """Many models on a few worker processes, under one memory budget."""

    def __init__(self, settings: Settings, *, registry: ModelRegistry | None = None,
                 caches: Any = None, launched: Sequence[Launched] = ()) -> None:
        """``launched``: worker processes started ahead (``workers.launch_workers``),
        adopted by :meth:`start` before it starts any of its own."""
        from ...caches import Caches

        self.settings = settings
        self.cfg = settings.serve
        self.caches = caches or Caches(settings)
        # Cluster mode (``cluster_mode.py``): declarations live in etcd, shared by the nodes.
        self.cluster: ClusterContext | None = None
        if registry is None and settings.cluster.enabled:
            from ..cluster.cluster_mode import ClusterContext

            self.cluster = ClusterContext(settings)
            registry = self.cluster.registry
        if registry is None:
            from .registry import SqliteModelRegistry

            registry = SqliteModelRegistry(self.caches.db)
        self.registry = registry
        self.metrics = Metrics()
        self.background = Background()
        shared = Shared(settings, self.caches, self.metrics, self.background)
        models: dict[str, Deployment] = {}
        self.pool = WorkerPool(shared, lambda: versions_of(models), launched)
        self.loader = Loader(shared, self.pool, models)
        # In a cluster a node pulls a version's files only when it is to load it.
        self.deployments = Deployments(shared, registry, self.loader, models,
                                       pull_on_declare=self.cluster is None)
        self.scaler = CopyScaler(models, self.loader, self.pool, lambda: self.draining)
        self.introspect = Introspection(self.cfg, self.deployments, self.loader)
        self.inflight = 0
        self.started = False
        self.warm = False
        self.draining = False
        self.stopping = False
        self._tick = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def workers(self) -> list[WorkerHandle]:
        """The worker processes (``pool.py``)."""
        return self.pool.workers

    @property
    def budget(self) -> int:
        """Bytes every model of the server may hold together (``--memory``)."""
        return self.pool.budget

    @budget.setter
    def budget(self, value: int) -> None:
        self.pool.budget = value

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, specs: Sequence[ModelSpec | ModelDoc] = ()) -> None:
        """Start the workers, declare the models, and warm up in the background:
        readiness turns true once every eager model has loaded (or failed).

        First, the store is repaired after a crash of an earlier server (or a pull):
        removals finished, interrupted pulls marked Failed, blob files whose row
        was never written adopted (``Caches.recover``, as its docstring promised)."""
        try:
            await asyncio.to_thread(self.caches.recover)
        except CachemeshError as exc:  # a locked database: serve anyway, gc repairs later
            log.warning("store recovery at start failed: %s", exc)
        if self.cluster is not None:
            # Join first: a node refused (its name taken) starts nothing. The models given
            # at start become the cluster's declarations (idempotent across nodes).
            await self.cluster.start(self)
            try:
                await self.cluster.declare(specs)
            except BaseException:
                await self.cluster.stop()  # leave at once rather than a lease later
                raise
            specs = []
        await self.pool.start()
        self.started = True
        eager = self.deployments.restore(specs)
        if self.cluster is not None:
            self.background.start(self.cluster.follow())  # subscribed now: nothing missed
        self.background.start(self._warm_up(eager))
        self.background.start(self.scaler.run())

    async def _warm_up(self, eager: list[Version]) -> None:
        await asyncio.gather(*(self.loader.load_quietly(v) for v in eager))
        self.warm = True

    async def stop(self) -> None:
        self.stopping = self.pool.stopping = True  # a worker that dies now is not replaced
        self.draining = True
        await self.background.cancel_all()
        if self.cluster is not None:
            await self.cluster.stop()  # the lease goes: the others forget this node's copies
        await self.pool.stop()
        for v in self.deployments.versions():
            self.loader.release_hold(v)

    @property
    def live(self) -> bool:
        return self.started and not self.stopping

    @property
    def ready(self) -> bool:
        return (self.started and self.warm and not self.draining
                and any(w.alive for w in self.pool.workers))

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

    # -- declarations (deployments.py) ---------------------------------------------

    async def deploy(self, spec: ModelSpec, *, persist: bool = True) -> ModelStatus:
        """Add a model in its simple form (``POST /api/v1/models``); ``persist``: keep it
        in the registry (a model from the command line is declared at each start)."""
        await self.deployments.deploy(spec, persist=persist)
        return self.status(spec.name)

    async def apply(self, doc: ModelDoc, *, if_match: int | None = None
                    ) -> tuple[ModelStatus, bool]:
        """Make ``doc`` the model's document (``PUT /api/v1/models/{name}``): a new
        model, or a rollout of a known one; True if new. ``if_match``: the revision the
        caller read; another one is RevisionConflictError (409)."""
        created = await self.deployments.apply(doc, if_match=if_match)
        return self.status(doc.name), created

    async def remove(self, name: str) -> None:
        await self.deployments.remove(name)

    async def load(self, name: str, *, wait: bool = True) -> ModelStatus:
        """Load the versions that take traffic now (the repository extension's load)."""
        dep = self.deployments.get(name)
        await self.loader.load(dep, wait=wait)
        return dep.status()

    async def unload(self, name: str) -> ModelStatus:
        """Unload every copy of every version (the repository extension's unload)."""
        dep = self.deployments.get(name)
        await self.loader.unload(dep)
        return dep.status()

    # -- routing ---------------------------------------------------------------------

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
        if version is None and headers and self.cluster is not None:
            # The version another node of the cluster drew for this request (forward.py
            # passes it, and drops the header from every request from outside; a lone
            # node runs no forward.py, so it never reads the header).
            version = headers.get(PINNED_VERSION) or None
        dep = self.deployments.get(name, version)
        decision = dep.router.choose(version, headers, parameters)
        return decision, dep, dep.versions[decision.version]

    # -- status ----------------------------------------------------------------------

    def status(self, name: str) -> ModelStatus:
        return self.deployments.get(name).status()

    def list_models(self) -> list[ModelStatus]:
        return [d.status() for _, d in sorted(self.deployments.by_name.items())
                if not d.removed and self.deployments.visible(d)]

    def is_ready(self, name: str, version: str | None = None) -> bool:
        return self.deployments.get(name, version).is_ready(version)

    async def metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """V2 model metadata, the same before and after the first load (``introspect.py``)."""
        return await self.introspect.metadata(name, version)

    def statistics(self, name: str = "", version: str | None = None) -> list[dict[str, Any]]:
        """Each version's tally in Triton's statistics terms (``introspect.py``)."""
        return self.introspect.statistics(name, version)

    async def runtime_stats(self, name: str) -> dict[str, Any]:
        """The runtime's own counters of each loaded copy (``introspect.py``)."""
        return await self.introspect.runtime_stats(name)

    def memory(self) -> dict[str, Any]:
        return self.pool.memory()

    def refresh_gauges(self) -> None:
        """The gauges /metrics reads, from the state now (``accounting.py``)."""
        refresh_gauges(self.metrics, self.memory(), self.deployments.versions(), self.cluster)

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

    def _done(self, v: Version) -> None:
        self.inflight -= 1
        v.inflight -= 1
        v.requests += 1
        now = time.monotonic()
        v.uses = v.uses * 0.5 ** ((now - v.last_used) / USES_HALF_LIFE_S) + 1.0
        v.last_used = now
        v.last_used_wall = time.time()
        if v.inflight == 0 and v.removed:
            self.pool.notify()  # its retirement waits for this
        if self.inflight == 0:
            self._idle.set()

    async def _copy_for(self, v: Version, series: Series, deadline: float,
                        llm: LLMSeries | None = None) -> Copy:
        copy = self.loader.ready_copy(v)
        if copy is None:
            series.misses.inc()
            v.waiting += 1
            waited = time.perf_counter_ns()
            try:
                with llm.waiting.track_inprogress() if llm else contextlib.nullcontext():
                    copy = await self.loader.ensure_loaded(v, REQUEST, deadline)
            finally:
                v.waiting -= 1
                v.tally.queued += 1
                v.tally.queue_ns += time.perf_counter_ns() - waited
        else:
            series.hits.inc()
        copy.inflight += 1
        self._tick += 1
        copy.picked = self._tick
        return copy

    def _release(self, copy: Copy) -> None:
        copy.inflight -= 1
        copy.last_used = time.monotonic()
        if copy.inflight == 0:
            self.pool.notify()

    async def infer(self, name: str, version: str | None, request: InferenceRequest, *,
                    headers: Mapping[str, str] | None = None) -> InferenceResponse:
        """Answer a V2 request. ``version``: one the request names (path); else the
        model's routes and traffic choose, from ``headers`` (lower-case names) and
        the request's parameters. ``response.model_version`` is the version that answered."""
        dep, v = self._admit(name, version, headers, request.parameters)
        copy: Copy | None = None
        try:
            with Counted(self.metrics, name, dep, v) as series:
                try:
                    async with asyncio.timeout(self.cfg.request_timeout_s):
                        copy = await self._copy_for(
                            v, series, time.monotonic() + self.cfg.request_timeout_s)
                        response: InferenceResponse = await copy.slot.call(
                            Infer(copy.key, request))
                except TimeoutError:
                    raise RequestTimeoutError(
                        f"model {name!r} did not answer within {self.cfg.request_timeout_s:g}s"
                    ) from None
                response.model_name = name
                # "default" stands for no version (the simple forms): the body says none,
                # as it always did; the adapter's x-model-version header still names it.
                response.model_version = v.label
                response.id = request.id
                return response
        finally:
            if copy is not None:
                self._release(copy)
            self._done(v)
            (v.routed or routed_of(self.metrics, v)).inc()

    async def generate(self, name: str, payload: dict[str, Any], *, version: str | None = None,
                       headers: Mapping[str, str] | None = None,
                       parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The optional ``generate`` hook of a runtime (issue 7's OpenAI adapter calls this).
        ``version``, ``headers`` and ``parameters`` choose the version as :meth:`route`."""
        dep, v = self._admit(name, version, headers, parameters)
        llm = self.metrics.llm(name) if payload.get("kind") != "embedding" else None
        copy: Copy | None = None
        try:
            with Counted(self.metrics, name, dep, v) as series:
                copy = await self._copy_for(v, series, time.monotonic()
                                            + self.cfg.request_timeout_s, llm)
                if not v.capabilities.get("generate"):
                    raise InferenceInputError(f"model {name!r} does not generate")
                with llm.running.track_inprogress() if llm else contextlib.nullcontext():
                    async with asyncio.timeout(self.cfg.request_timeout_s):
                        result: dict[str, Any] = await copy.slot.call(
                            Generate(copy.key, payload))
                if llm:
                    llm.tokens(result)
                return result
        finally:
            if copy is not None:
                self._release(copy)
            self._done(v)

    async def stream(self, name: str, payload: dict[str, Any], *, version: str | None = None,
                     headers: Mapping[str, str] | None = None,
                     parameters: Mapping[str, Any] | None = None) -> AsyncIterator[Any]:
        """The optional ``stream`` hook: chunks as the worker yields them. The version
        is chosen (as :meth:`route`) when the first chunk is asked for."""
        dep, v = self._admit(name, version, headers, parameters)
        llm = self.metrics.llm(name)
        admitted = time.perf_counter()
        copy: Copy | None = None
        try:
            with Counted(self.metrics, name, dep, v) as series:
                copy = await self._copy_for(v, series, time.monotonic()
                                            + self.cfg.request_timeout_s, llm)
                if not v.capabilities.get("stream"):
                    raise InferenceInputError(f"model {name!r} does not stream")
                first: float | None = None
                with llm.running.track_inprogress():
                    async for chunk in copy.slot.stream(Stream(copy.key, payload)):
                        if first is None and chunk.get("text"):
                            first = time.perf_counter()
                            llm.ttft.observe(first - admitted)
                        if "finish_reason" in chunk:
                            llm.tokens(chunk, first)
                        yield chunk
        finally:
            if copy is not None:
                self._release(copy)
            self._done(v)
