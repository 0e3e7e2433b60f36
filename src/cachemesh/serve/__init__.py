"""The model server: many models on a few worker processes, KServe V2 over REST and gRPC,
OpenAI over REST, and the control API.

Protocol adapters (they parse, call the core, and answer; none imports another):

    v2_rest.py      KServe V2 REST (v2_codec.py: bodies <-> messages; json_tensors.py)
    v2_grpc.py      KServe V2 gRPC (protos/: inference.proto and its descriptor),
                    Triton's ModelConfig and ModelStatistics
    grpc_health.py  grpc.health.v1.Health on the gRPC port (protos/health.proto)
    openai.py       OpenAI /v1 (completions, chat, embeddings; SSE streaming)
    control.py      /api/v1/models
    datacaches.py   /api/v1/datacaches (eci.py: Alibaba Cloud ECI's shape, translated)
    ui.py           /ui: the read-only web page (ui_static/: its HTML, script and style)
    api_docs.py     /docs and /redoc offline, and the V2 routes in /openapi.json
    repository.py   the V2 repository extension, shared by REST and gRPC

The protocol-free core:

    service.py      ModelService, the facade: start/stop/drain, route, infer/generate/
                    stream, status
    deployments.py  declare, apply (roll out), retire, remove; their checks
    loading.py      the life of a copy: load, adopt, unload; a lost slot (prepare.py:
                    a version's files pulled and its runtime decided)
    pool.py         the worker processes: spawn, death, recycle, replace; memory
    slot.py         what placement and routing see of a worker
    copies.py       copies of busy versions: when to add or drop one, which answers
    placement.py    where a copy loads and what is evicted (a pure function over slots)
    routing.py      which version answers a request (a pure decision)
    loadqueue.py    bounded, prioritised load queue
    state.py        what it holds: deployments -> versions -> copies, and their status
    shared.py       what the parts share: settings, caches, metrics, background tasks
    documents.py    the model document: versions, traffic, routes, aliases, scaling
    registry.py     model specs, and where run-time deployments are kept (revisions,
                    compare-and-put, watch)
    memory.py       the default memory budget (cgroup / physical memory)
    datacache_service.py  DataCacheService: caches declared and pulled over the API
                    (pull_child.py: the process that pulls one)
    datacache_cluster.py  cluster mode: this node's blobs in the blob index, preheat
    preheat.py            caches declared cluster-wide, pulled onto the nodes they name

Cluster mode (any node answers any request; cluster_mode.py: the node's ClusterContext):

    forward.py      HTTP requests served here or sent once to the node that holds the model
    forward_grpc.py the same for gRPC V2 (ModelInfer, ModelMetadata, ModelReady)
    placer.py       where a request goes: here, a ready copy elsewhere, or the one load in
                    the cluster (the placing/ claim); the retry rule; the drain's moves
    node_choice.py  which node loads a copy, which copy answers (pure)
    cluster_copies.py  the leader's copies across nodes: min_copies, hot models
    cluster_routes.py  node-only routes (/api/v1/cluster/load)

Worker processes:

    workers.py      worker processes seen from the server (WorkerHandle: a slot)
    worker.py       the worker process itself (readahead.py: files read ahead)
    messages.py     the messages between them; ipc.py: how they are framed

HTTP plumbing: app.py (the ASGI app factory), auth.py (tokens per path),
limits.py (body size, tensor shapes, parsing memory), jsonshape.py (JSON depth and
size), http_errors.py (errors -> status codes), metrics.py (Prometheus),
server.py (uvicorn with a draining SIGTERM), ports.py (both ports taken before
anything starts).
"""

from __future__ import annotations

__all__ = ["ModelService", "ModelSpec", "create_app", "make_server", "run"]

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "ModelService":
        from .core.service import ModelService

        return ModelService
    if name == "ModelSpec":
        from .core.registry import ModelSpec

        return ModelSpec
    if name == "create_app":
        from .adapters.app import create_app

        return create_app
    if name in ("make_server", "run"):
        from .adapters import server

        return getattr(server, name)
    raise AttributeError(name)
