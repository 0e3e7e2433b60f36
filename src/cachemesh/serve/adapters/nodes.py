"""``GET /api/v1/nodes``: the nodes of the cluster, as the control API shows them.

    GET /api/v1/nodes   {"nodes": [{name, advertise, http, grpc, labels, capacity_bytes,
                         memory_used_bytes, copies: [...], draining, cannot_load, prepared,
                         healthy, degraded, stale, updated_at, self}], "cluster": {...} | null}

In cluster mode the list comes from this node's watch of ``nodes/`` (every live node);
this node's own entry says whether it is degraded (etcd unreachable). While it is, the
other entries are ``stale``: what the watch last saw, which no one can confirm now (a
node that died meanwhile is still listed), so they are not called healthy either.
``updated_at`` is when a node last wrote its record, which it does only when something in
it changed: an old one is no sign of trouble (the lease, not the record, says a node is
alive). On a lone node the list has one entry, the node itself, so that the operator and
the UI need no second code path; ``cluster`` is null there.

``prepared``: model -> the versions whose files the node's store holds (in cluster mode a
node pulls a version only when it is to load it). A node's ``copies``, ``cannot_load``
and ``prepared`` name models: those the caller may not see (a
protected bucket without its token, access.py) are left out, as ``GET /api/v1/models``
leaves them out; so is a model this node has not applied yet (its bucket is unknown here).
The memory figures stay whole: they say how full a node is, not what fills it.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from fastapi import APIRouter, Request

from ... import __version__
from ...cluster.records import CopyState, NodeRecord
from ..core.service import ModelService
from ..core.state import LOADING, READY, UNLOADING

router = APIRouter(prefix="/api/v1", tags=["nodes"])


@router.get("/nodes")
async def list_nodes(request: Request) -> dict[str, Any]:
    service: ModelService = request.app.state.service
    cluster = service.cluster
    if cluster is None:
        return {"nodes": [_visible(service, _shown(lone_record(service), degraded=False,
                                                   me=True))], "cluster": None}
    records = await cluster.nodes()
    blind = cluster.degraded
    return {"nodes": [_visible(service, _shown(r, degraded=blind, me=True)
                               if r.name == cluster.name
                               else _shown(r, degraded=False, me=False, stale=blind))
                      for r in records],
            "cluster": cluster.status()}


def _visible(service: ModelService, node: dict[str, Any]) -> dict[str, Any]:
    """The node's entry without the models the caller may not see."""
    def seen(model: str) -> bool:
        dep = service.deployments.by_name.get(model)
        return dep is not None and not dep.removed and service.deployments.visible(dep)

    node["copies"] = [c for c in node["copies"] if seen(c["model"])]
    node["cannot_load"] = {m: why for m, why in node["cannot_load"].items() if seen(m)}
    node["prepared"] = {m: labels for m, labels in node.get("prepared", {}).items() if seen(m)}
    return node


def _shown(record: NodeRecord, *, degraded: bool, me: bool,
           stale: bool = False) -> dict[str, Any]:
    data = record.model_dump(mode="json", exclude={"node_id"})
    data["healthy"] = not degraded and not stale and not record.draining
    data["degraded"] = degraded
    data["stale"] = stale
    data["self"] = me
    return data


def lone_record(service: ModelService) -> NodeRecord:
    """This server as the one node there is (no cluster mode)."""
    cfg = service.cfg
    memory = service.pool.memory()
    copies = []
    prepared: dict[str, list[str]] = {}
    for v in service.deployments.versions():
        if v.resolved is not None:
            prepared.setdefault(v.model, []).append(v.label)
        held = [c for c in v.copies if c.state in (LOADING, READY, UNLOADING)]
        if held:
            states = {c.state for c in held}
            copies.append(CopyState(
                model=v.model, version=v.label,
                state="ready" if READY in states else "loading" if LOADING in states
                else "draining", bytes=sum(c.size for c in held), rate=round(v.rate, 2)))
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    now = time.time()
    return NodeRecord(
        name=socket.gethostname().lower(), node_id="", advertise=f"http://{host}:{cfg.port}",
        http=f"{host}:{cfg.port}", grpc=f"{host}:{cfg.grpc_port}" if cfg.grpc_port else None,
        capacity_bytes=memory["budget_bytes"], memory_used_bytes=memory["held_bytes"],
        copies=copies, draining=service.draining, version=__version__, updated_at=now,
        prepared={m: sorted(labels) for m, labels in sorted(prepared.items())})
