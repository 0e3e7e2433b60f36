"""The model server: many models on a few worker processes, KServe V2 over REST and gRPC,
OpenAI over REST.

    app.py          the ASGI app factory: routers over one service
    v2_rest.py      KServe V2 REST adapter (v2_codec.py: bodies <-> messages)
    v2_grpc.py      KServe V2 gRPC adapter (protos/: inference.proto and its descriptor)
    openai.py       OpenAI /v1 adapter (completions, chat, embeddings; SSE streaming)
    control.py      /api/v1/models
    ui.py           /ui: the read-only web page (ui_static/: its HTML, script and style)
    http_errors.py  errors -> status codes (the only place)
    service.py      the protocol-free core: models, loads, rollouts, inference
    state.py        what it holds: deployments -> versions -> copies, and their status
    documents.py    the model document: versions, traffic, routes, aliases, scaling
    routing.py      which version answers a request (a pure decision)
    copies.py       when a hot model gets another copy, and which copy answers
    placement.py    where a copy loads and what is evicted (a pure function over slots)
    loadqueue.py    bounded, prioritised load queue
    memory.py       the default memory budget (cgroup / physical memory)
    registry.py     model specs and where run-time deployments are kept
    workers.py      worker processes seen from the server
    worker.py       the worker process itself; ipc.py: the messages between them
    metrics.py      Prometheus metrics
    server.py       uvicorn with a draining SIGTERM
"""

from __future__ import annotations

__all__ = ["ModelService", "ModelSpec", "create_app", "make_server", "run"]

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "ModelService":
        from .service import ModelService

        return ModelService
    if name == "ModelSpec":
        from .registry import ModelSpec

        return ModelSpec
    if name == "create_app":
        from .app import create_app

        return create_app
    if name in ("make_server", "run"):
        from . import server

        return getattr(server, name)
    raise AttributeError(name)
