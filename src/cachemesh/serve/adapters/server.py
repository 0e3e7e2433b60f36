"""Running the app: uvicorn on uvloop and httptools, with a draining SIGTERM.

On SIGTERM (or Ctrl-C) the server drains: readiness turns false, new requests
get 503 with Retry-After, requests in flight finish (up to ``drain_timeout_s``),
then uvicorn stops and the workers exit. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import uvicorn

from ...config import Settings
from ...sources.redact import redact_log_handlers
from ..cluster.placer import placer_of
from ..core.registry import ModelSpec
from ..core.service import ModelService
from ..workers.workers import Launched
from .app import create_app
from .ports import Ports, take_ports

log = logging.getLogger("cachemesh.serve")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: ModelService) -> None:
        super().__init__(config)
        self.service = service
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            return super().handle_exit(sig, frame)  # second signal: stop now
        self._draining = True
        log.warning("%s: draining (%d request(s) in flight)", signal.Signals(sig).name,
                    self.service.inflight)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if placer_of(self.service) is None:
            self.service.begin_drain()
        self._loop.create_task(self._drain())  # type: ignore[union-attr]

    async def _drain(self) -> None:
        placer = placer_of(self.service)
        if placer is not None:  # a cluster: hot models go elsewhere first (placer.drain)
            moved = await placer.drain(self.service.cfg.drain_timeout_s)
            log.warning("drain: %d hot model version(s) now served elsewhere", len(moved))
        self.service.begin_drain()
        done = await self.service.wait_idle(self.service.cfg.drain_timeout_s)
        if not done:
            log.warning("drain timeout: %d request(s) still in flight", self.service.inflight)
        self.should_exit = True


def make_server(settings: Settings, specs: Sequence[ModelSpec] = (), *,
                service: ModelService | None = None, routers: Sequence[Any] = (),
                on_started: Callable[[], None] | None = None,
                log_level: str = "warning", launched: Sequence[Launched] = ()
                ) -> DrainingServer:
    service = service or ModelService(settings, launched=launched)
    app = create_app(service, specs, routers=routers, on_started=on_started)
    cfg = settings.serve
    config = uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_level=log_level, access_log=False,
        loop="uvloop" if _has("uvloop") else "asyncio",
        http="httptools" if _has("httptools") else "h11",
        lifespan="on", timeout_graceful_shutdown=cfg.drain_timeout_s,
        timeout_keep_alive=30, backlog=2048, proxy_headers=False,
        ssl_certfile=str(cfg.tls_cert) if cfg.tls_cert else None,
        ssl_keyfile=str(cfg.tls_key) if cfg.tls_key else None,
    )
    return DrainingServer(config, service)


class _QuietStartup(logging.Filter):
    """An expected start-up failure (a :class:`CachemeshError`: a port lost, a model
    refused) is said once, by :func:`run`, without Starlette's traceback of it and
    uvicorn's "Application startup failed" after it."""

    def __init__(self, app: Any) -> None:
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        return self.app.state.startup_error is None or record.levelno < logging.ERROR


def run(settings: Settings, specs: Sequence[ModelSpec] = (), *,
        on_started: Callable[[], None] | None = None, launched: Sequence[Launched] = (),
        ports: Ports | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C (what ``cachemesh serve`` runs). ``launched``:
    the workers, started before this module was imported (``workers.launch_workers``).
    ``ports``: taken already (``ports.take_ports``); else taken here. An expected
    start-up failure raises its :class:`CachemeshError` once the server has stopped."""
    if ports is None:
        ports = take_ports(settings.serve)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = make_server(settings, specs, on_started=on_started, launched=launched)
    # After make_server: uvicorn's config installs its own handlers. httpx logs each
    # request's URL at INFO, a presigned signature included.
    redact_log_handlers(logging.getLogger(), logging.getLogger("uvicorn"),
                        logging.getLogger("uvicorn.access"))
    app = server.config.app
    quiet = _QuietStartup(app)
    logging.getLogger("uvicorn.error").addFilter(quiet)
    try:
        server.run(sockets=[ports.http])
    except SystemExit:  # uvicorn's exit after a failed start
        if app.state.startup_error is None:
            raise
    finally:
        logging.getLogger("uvicorn.error").removeFilter(quiet)
        ports.http.close()
    if app.state.startup_error is not None:
        raise app.state.startup_error
