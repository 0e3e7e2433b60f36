"""Node-to-node routes of cluster mode (only the other nodes call them).

``POST /api/v1/cluster/load`` with ``{"model": M, "version": V}``: load a copy of the
version here (as a first request would) and answer once it is ready
(``{"node", "model", "version"}``), or with the load's error. The claimer of a placement
(``placer.py``) calls it on the node it chose.

``auth.RULES`` leaves these paths open to the route: a caller must come through the
forwarding middleware as a node (``forward.py`` checked the hop header and the cluster
token and set ``cachemesh.forwarded_by``); anyone else gets 401.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ...access import INTERNAL, acting_as
from ...errors import DrainingError, ModelNotFoundError, UnauthorizedError
from ..core.loadqueue import REQUEST
from .placer import placer_of

router = APIRouter(prefix="/api/v1/cluster", tags=["cluster"])


class LoadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    version: str = Field(min_length=1, max_length=256)


@router.post("/load")
async def load_here(body: LoadBody, request: Request) -> dict[str, Any]:
    by = request.scope.get("cachemesh.forwarded_by")
    if not by:
        raise UnauthorizedError("only another node of the cluster may ask for a load")
    service = request.app.state.service
    placer = placer_of(service)
    if placer is not None and placer.draining:
        raise DrainingError(f"node {placer.name!r} is draining: it takes no new copies")
    with acting_as(INTERNAL):  # the claimer checked the caller; buckets open to nodes
        dep = service.deployments.get(body.model)
        v = dep.versions.get(body.version)
        if v is None:
            raise ModelNotFoundError(body.model, body.version)
        deadline = time.monotonic() + service.cfg.request_timeout_s
        await service.loader.ensure_loaded(v, REQUEST, deadline)
    return {"node": service.cluster.name, "model": body.model, "version": body.version}
