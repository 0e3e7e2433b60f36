"""The model server: many models on a few worker processes, KServe V2 over REST and gRPC,
OpenAI over REST, and the control API.

One subpackage per layer; imports go down this list, never up (docs/architecture.md,
"Inside serve/", has the module map and the exceptions):

    adapters/   the protocol adapters (they parse, call the core, and answer; none
                imports another) and the HTTP plumbing:
                v2_rest.py (v2_codec.py, json_tensors.py), v2_grpc.py, grpc_health.py,
                openai.py, control.py, repository.py (the V2 repository extension,
                shared by REST and gRPC), datacaches.py (eci.py), blobs.py (sharing.py),
                nodes.py, ui.py (ui_static/), api_docs.py; app.py (the ASGI app
                factory), server.py (uvicorn with a draining SIGTERM), ports.py,
                auth.py (tokens per path), limits.py, http_errors.py
    cluster/    cluster mode, any node answers any request: cluster_mode.py (the
                node's ClusterContext), registry_etcd.py, placer.py, node_choice.py,
                forward.py, forward_grpc.py, cluster_copies.py, cluster_routes.py
    datacache/  DataCacheService (datacache_service.py; pull_child.py: the process
                that pulls one), datacache_cluster.py (the blob index), preheat.py
    core/       the protocol-free core: service.py (ModelService, the facade),
                deployments.py, documents.py, registry.py, loading.py, prepare.py,
                loadqueue.py, copies.py, placement.py, routing.py, pool.py, slot.py,
                memory.py, state.py, shared.py, introspect.py, accounting.py,
                metrics.py (Prometheus), jsonshape.py (JSON depth and size)
    workers/    the worker processes: workers.py (seen from the server), worker.py
                (the process itself; readahead.py), messages.py, ipc.py (framing)
    protos/     inference.proto and health.proto, their committed descriptors

The public names (ModelService, ModelSpec, create_app, make_server, run) are
re-exported here, imported on first use.
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
