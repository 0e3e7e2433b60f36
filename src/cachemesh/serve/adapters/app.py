"""The ASGI app: one factory, one port, routers added to it.

``create_app(service)`` serves, over one :class:`~.service.ModelService` and the
:class:`~.datacache_service.DataCacheService` beside it:

- the KServe V2 REST routes (``v2_rest.py``), ``/metrics`` and ``/ui``, as plain
  Starlette routes on the root app: the inference path crosses two middleware
  layers, not FastAPI's eight (measured: docs/benchmarks.md, section "serve");
- a FastAPI app mounted under them, holding the control API (``/api/v1/...``:
  ``control.py``, ``datacaches.py``), the OpenAI API (``openai.py``) and the
  OpenAPI document (``/openapi.json``), whose pages, ``/docs`` and ``/redoc``, are
  served offline by ``api_docs.py``.

Other routers are FastAPI routers too: pass them as ``routers=`` or add them
with ``app.state.api.include_router``. Two middleware layers on the root app see
every request, outermost first: authentication (``auth.py``: the path's access
class, the caller's tokens, 401 or 403 before the body is read) and the body
limit (``limits.py``: 413). A new route is covered by both with no code of its
own; ``auth.RULES`` says which token its path needs (control, unless a rule says
otherwise). Handlers reach the services as ``request.app.state.service`` and
``request.app.state.datacaches`` (both apps carry them). The model service starts
and stops with the root app's lifespan, and so does KServe V2 over gRPC
(``v2_grpc.py``) on ``grpc_port`` when it is not 0, in the same event loop; the
data caches' pulls stop with it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.responses import Response
from starlette.routing import Match, Mount, Route

from ... import __version__
from ...access import CONTROL, Keyring
from ...errors import CachemeshError
from ..cluster import cluster_routes
from ..cluster.forward import Forward
from ..cluster.placer import placer_of
from ..core.metrics import CONTENT_TYPE
from ..core.registry import ModelSpec
from ..core.service import ModelService
from ..datacache.datacache_cluster import start_cluster
from ..datacache.datacache_service import DataCacheService
from . import api_docs, blobs, control, datacaches, nodes, openai, ui, v2_rest
from .auth import Authenticate, access_of
from .http_errors import encodable
from .limits import BodyLimit, ParseBudget

log = logging.getLogger("cachemesh.serve")

def create_api(service: ModelService, caches_service: DataCacheService,
               routers: Sequence[Any] = ()) -> FastAPI:
    """The FastAPI part: control API routers, OpenAPI docs, error bodies."""
    api = FastAPI(title="cachemesh", version=__version__, docs_url=None, redoc_url=None,
                  description="The cachemesh model server: KServe V2 (Open Inference"
                  " Protocol) under /v2, the OpenAI API under /v1, the control API under"
                  " /api/v1.")
    api.state.service = service
    api.state.datacaches = caches_service
    api.include_router(control.router)
    api.include_router(nodes.router)
    api.include_router(datacaches.router)
    api.include_router(openai.router)
    api.include_router(cluster_routes.router)
    for router in routers:
        api.include_router(router)

    @api.exception_handler(CachemeshError)
    async def cachemesh_error(request: Request, exc: CachemeshError) -> Response:
        return v2_rest.error_response(exc)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI's own refusals (an unparsable body, 404, 405) in the body every other
        # error of the server has: {"error": ...}.
        return v2_rest.json_response({"error": encodable(str(exc.detail))}, exc.status_code,
                                     dict(exc.headers or {}))

    @api.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}"
            for err in exc.errors())
        return v2_rest.json_response({"error": encodable(f"invalid request: {problems}")}, 400)

    return api


class ApiMount(Mount):
    """The FastAPI app under the root routes. It matches every path, but only as a
    fallback: a root route whose path matches with another method (GET on ``.../infer``)
    comes first, so that the answer is 405 with ``Allow``, not the API's 404."""

    def matches(self, scope: Any) -> tuple[Match, dict[str, Any]]:
        match, child = super().matches(scope)
        return (Match.PARTIAL if match is Match.FULL else match), child


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals on the root routes (405) in the server's error body."""
    assert isinstance(exc, StarletteHTTPException)
    return v2_rest.json_response({"error": encodable(str(exc.detail))}, exc.status_code,
                                 dict(exc.headers or {}))


def create_app(service: ModelService, specs: Sequence[ModelSpec] = (), *,
               routers: Sequence[Any] = (),
               on_started: Callable[[], None] | None = None) -> Starlette:
    keyring = Keyring.from_settings(service.settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await service.start(list(specs))
        except CachemeshError as exc:
            app.state.startup_error = exc  # expected: server.run says it in one line
            raise
        placer = placer_of(service)
        if placer is not None:
            placer.start()  # the leader's copies across nodes (cluster_copies.py)
        # Data caches whose pull the last run's stop interrupted go on where they were.
        models_caches = {v.cache for v in service.deployments.versions()}
        try:
            await asyncio.to_thread(caches_service.resume_interrupted, models_caches)
        except CachemeshError as exc:  # a locked database: serve anyway
            log.warning("resuming interrupted pulls: %s", exc)
        grpc_server = None
        node = None
        try:
            if service.cfg.grpc_port:
                from .v2_grpc import start_grpc

                grpc_server = await start_grpc(service, keyring)
            # Cluster mode: this node's blobs in the index, caches declared cluster-wide.
            node = await start_cluster(service, caches_service)
        except BaseException as exc:
            if isinstance(exc, CachemeshError):
                app.state.startup_error = exc
            if grpc_server is not None:
                await grpc_server.stop(0)
            await service.stop()
            raise
        # Modules, routes and settings live as long as the server: keep the collector
        # from walking them again and again under load (long gen-2 pauses in p99).
        gc.collect()
        gc.freeze()
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(service.cfg.drain_timeout_s)
            if node is not None:
                await node.stop()
            await service.stop()
            if placer is not None:
                await placer.close()
            caches_service.stop()  # background pulls: stopped, resumable

    async def metrics(request: Request) -> Response:
        service.refresh_gauges()
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    cfg = service.cfg

    def body_limit(scope: dict[str, Any]) -> int:
        access = scope.get("cachemesh.access") or access_of(scope["method"], scope["path"])
        return cfg.max_control_body if access == CONTROL else cfg.max_body

    caches_service = DataCacheService(service.caches, cfg.source_roots)
    api = create_api(service, caches_service, routers)
    blobs.install(api, service)  # the peer route; it checks the cluster token itself
    app = Starlette(routes=[*v2_rest.routes(), Route("/metrics", metrics, methods=["GET"]),
                            *ui.routes(), *api_docs.install(api), ApiMount("", app=api)],
                    lifespan=lifespan,
                    exception_handlers={StarletteHTTPException: http_error},
                    middleware=[Middleware(Authenticate, keyring=keyring),
                                Middleware(BodyLimit, limit_of=body_limit),
                                # one node forwards nowhere: no layer to cross per request
                                *([Middleware(Forward, service=service)]
                                  if service.cluster is not None else [])])
    app.state.service = service
    app.state.datacaches = caches_service
    app.state.api = api
    app.state.startup_error = None  # a CachemeshError that stopped the start
    app.state.parse_budget = ParseBudget(cfg.parse_budget())  # inference bodies (limits.py)
    return app
