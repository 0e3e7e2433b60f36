"""``GET /api/v1/nodes``: the nodes of the cluster, as the control API shows them.

    GET /api/v1/nodes   {"nodes": [{name, advertise, http, grpc, labels, capacity_bytes,
                         memory_used_bytes, copies: [...], draining, cannot_load, healthy,
                         degraded, updated_at, self}], "cluster": {...} | null}

In cluster mode the list comes from this node's watch of ``nodes/`` (every live node);
this node's own entry says whether it is degraded (etcd unreachable). On a lone node the
list has one entry, the node itself, so that the operator and the UI need no second code
path; ``cluster`` is null there.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from fastapi import APIRouter, Request

from .. import __version__
from ..cluster.records import CopyState, NodeRecord
from .service import ModelService
from .state import LOADING, READY, UNLOADING

router = APIRouter(prefix="/api/v1", tags=["nodes"])


@router.get("/nodes")
async def list_nodes(request: Request) -> dict[str, Any]:
    service: ModelService = request.app.state.service
    cluster = service.cluster
    if cluster is None:
        return {"nodes": [_shown(lone_record(service), degraded=False, me=True)],
                "cluster": None}
    records = await cluster.nodes()
    return {"nodes": [_shown(r, degraded=cluster.degraded if r.name == cluster.name else False,
                             me=r.name == cluster.name) for r in records],
            "cluster": cluster.status()}


def _shown(record: NodeRecord, *, degraded: bool, me: bool) -> dict[str, Any]:
    data = record.model_dump(mode="json", exclude={"node_id"})
    data["healthy"] = not degraded and not record.draining
    data["degraded"] = degraded
    data["self"] = me
    return data


def lone_record(service: ModelService) -> NodeRecord:
    """This server as the one node there is (no cluster mode)."""
    cfg = service.cfg
    memory = service.pool.memory()
    copies = []
    for v in service.deployments.versions():
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
        copies=copies, draining=service.draining, version=__version__, updated_at=now)
