"""The control API for data caches: ``/api/v1/datacaches`` (FastAPI, documented at /docs),
a thin adapter over :class:`~.datacache_service.DataCacheService`.

    POST   /api/v1/datacaches                 declare a cache and pull it in the background
    GET    /api/v1/datacaches[?bucket=b]      every cache, with status and progress
                                              (``usage=true``: and its logical bytes)
    GET    /api/v1/datacaches/{name}          one cache, with its events
    DELETE /api/v1/datacaches/{name}          remove it (409 while it is in use or pulled;
                                              ``?cluster=true``: its cluster-wide declaration too)
    GET    /api/v1/datacaches/{name}/events   server-sent events until Available or Failed

A POST body is either our own shape (:class:`DataCacheRequest`: ``name``,
``source``, ``bucket``, ``path``, ``include``, ``exclude``, ``size_gib``,
``retention_days``, ``options``) or the shape of Alibaba Cloud ECI's
CreateDataCache (``eci.py``, recognised by its capitalised ``Name``/``DataSource``).
A POST validates everything (names, paths, source, options) before anything is
written, answers 202 with the description, and queues the pull. Every description
carries our fields and, always (whatever shape created the cache), the ECI-named
ones (``DataCacheId``, ``Name``, ``Status``, ``LastMatchedTime``, ...), so a client
written for either shape reads the answer without asking for a format.

Access: the whole API is control class (``CACHEMESH_API_TOKEN`` when set;
serve/adapters/auth.py); what a caller may see and create is the service's to decide
(protected buckets, deployable roots).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictInt, StrictStr, Tag

from ...caches import (
    AVAILABLE,
    FAILED,
    MAX_RETENTION_DAYS,
    MAX_SIZE_LIMIT_GIB,
    CacheInfo,
    make_spec,
)
from ...errors import CacheNotFoundError, ClusterError
from ..datacache.datacache_service import DataCacheService
from .eci import EciCreateDataCache, eci_fields, eci_to_spec_fields, iso, percent

router = APIRouter(prefix="/api/v1", tags=["datacaches"])

#: How often the event stream looks for news.
POLL_S = 0.2
#: How often it reads the nodes' progress of a cluster-wide cache from etcd (each node
#: writes its own at most every PREWARM_INTERVAL_S, and at once when its state changes).
NODES_POLL_S = 1.0
FINAL = (AVAILABLE, FAILED)


# -- request bodies ------------------------------------------------------------------


class DataCacheRequest(BaseModel):
    """A cache in cachemesh's own terms (what ``cachemesh pull`` takes)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="cache name: letters, digits, '.', '_', '-'")
    source: str = Field(description="hf://org/name[@rev], ms://org/name[@rev], s3://bucket/prefix,"
                                    " file:///path, https://host/file")
    bucket: str = "default"
    path: str | None = Field(default=None, description="view path inside the bucket; default: name")
    include: list[str] = Field(default_factory=list, description="globs of files to pull")
    exclude: list[str] = Field(default_factory=list, description="globs of files to leave out")
    size_gib: float | None = Field(default=None, gt=0, le=MAX_SIZE_LIMIT_GIB,
                                   description="quota: the pull fails above it")
    retention_days: float | None = Field(default=None, gt=0, le=MAX_RETENTION_DAYS,
                                         description="gc removes the cache after this long unused")
    options: dict[str, str | bool | int] = Field(
        default_factory=dict, description="source options: endpoint_url (s3), sha256 (https),"
                                          " follow_symlinks (file)")
    nodes: StrictStr | StrictInt | list[StrictStr] | None = Field(
        default=None, description="cluster mode: the nodes that pull it: 'all' (and every"
                                  " node that joins later), a count, or node names")
    min_copies: int | None = Field(default=None, ge=1, description="cluster mode: eviction"
                                   " keeps the cache on at least this many nodes")


def _shape(body: Any) -> str:
    return "eci" if isinstance(body, dict) and ("Name" in body or "DataSource" in body) else "ours"


CreateBody = Annotated[
    Annotated[DataCacheRequest, Tag("ours")] | Annotated[EciCreateDataCache, Tag("eci")],
    Discriminator(_shape),
]


# -- descriptions ----------------------------------------------------------------------


def _service(request: Request) -> DataCacheService:
    return request.app.state.datacaches


def describe(info: CacheInfo, events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Our fields, then ECI's names for the same things."""
    out = info.to_dict()
    out.pop("spec", None)
    out["progress"]["percent"] = percent(info)
    out["last_access_time"] = iso(info.last_access)
    if events is not None:
        out["events"] = events
    out.update(eci_fields(info, events))
    return out


def _events(service: DataCacheService, name: str, after: int = 0) -> list[dict[str, Any]]:
    return [{"id": e.id, "ts": e.ts, "level": e.level, "kind": e.kind, "message": e.message}
            for e in service.events(name, after=after)]


# -- routes ------------------------------------------------------------------------------


@router.post("/datacaches", status_code=202)
def create_datacache(body: CreateBody, request: Request, response: Response) -> dict[str, Any]:
    """Declare a cache and start pulling it; answers at once (202) with its description.

    The same declaration again is accepted (and pulls again if the cache Failed);
    another declaration under the same name is a 409.
    """
    if isinstance(body, EciCreateDataCache):
        fields = eci_to_spec_fields(body)
        nodes, min_copies = body.Nodes, body.MinCopies
    else:
        fields = {"name": body.name, "source": body.source, "bucket": body.bucket,
                  "path": body.path, "include": body.include, "exclude": body.exclude,
                  "size_limit_gib": body.size_gib, "retention_days": body.retention_days,
                  "options": body.options}
        nodes, min_copies = body.nodes, body.min_copies
    service = _service(request)
    spec = make_spec(**fields)
    response.headers["Location"] = f"/api/v1/datacaches/{spec.name}"
    if nodes is not None or min_copies is not None:
        return service.declare_cluster_wide(spec, nodes, min_copies)
    return describe(service.create(spec))


@router.get("/datacaches")
def list_datacaches(request: Request,
                    bucket: Annotated[str | None, Query()] = None,
                    usage: Annotated[bool, Query(description="add logical and physical bytes"
                                                 " (as `cachemesh du`)")] = False
                    ) -> dict[str, Any]:
    service = _service(request)
    infos = service.list(bucket)
    out: dict[str, Any] = {"datacaches": [describe(i) for i in infos], "TotalCount": len(infos)}
    if usage:
        each, out["usage"] = service.usage(infos)
        for item in out["datacaches"]:
            item["usage"] = each.get(item["name"])
    return out


@router.get("/datacaches/{name}")
def get_datacache(name: str, request: Request) -> dict[str, Any]:
    service = _service(request)
    return service.describe_cluster_wide(name, lambda info: describe(
        info, _events(service, info.name)))


@router.delete("/datacaches/{name}", status_code=204)
def delete_datacache(name: str, request: Request,
                     cluster: Annotated[bool, Query(description="cluster mode: also remove the"
                                                    " cluster-wide declaration (the other"
                                                    " nodes keep their copies)")] = False
                     ) -> Response:
    """Remove the cache from this node (and, with ``cluster=true``, its declaration)."""
    _service(request).delete(name, cluster=cluster)
    return Response(status_code=204)


@router.get("/datacaches/{name}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "event: event (one cache event), progress,"
                                            " status, nodes (cluster-wide caches)"}})
async def stream_datacache_events(name: str, request: Request) -> StreamingResponse:
    """Server-sent events: the cache's events (``event: event``, with ids, so that
    ``Last-Event-ID`` resumes), its progress while it changes (``event: progress``)
    and its status (``event: status``). For a cache declared cluster-wide, also every
    node's progress as it changes (``event: nodes``: ``{node: {state, progress, ...}}``
    and the nodes expected), on this node even where the cache is not pulled here. The
    stream ends once this node's status is final and every expected node is done."""
    service = _service(request)
    local, view = await asyncio.to_thread(_local_and_view, service, name)
    try:
        after = int(request.headers.get("Last-Event-ID", "0"))
    except ValueError:
        after = 0
    if not 0 <= after < 2**63:  # event ids are SQLite integers
        after = 0

    async def stream() -> AsyncIterator[str]:
        nonlocal after, view
        last_progress: tuple | None = None
        last_status = None
        last_nodes: dict[str, Any] | None = None
        view_read = time.monotonic()
        while True:
            local_done = True
            if local is not None:
                current = await asyncio.to_thread(service.current, local)
                news = await asyncio.to_thread(_events, service, local, after)
                for event in news:
                    after = event["id"]
                    yield _sse("event", event, event["id"])
                progress = (current.progress.bytes_done, current.progress.files_done,
                            current.progress.bytes_total)
                if progress != last_progress:
                    last_progress = progress
                    yield _sse("progress", {"name": local, "percent": percent(current),
                                            **current.to_dict()["progress"]})
                if current.status != last_status:
                    last_status = current.status
                    yield _sse("status", {"name": local, "status": current.status,
                                          "error": current.error})
                local_done = current.status in FINAL
            if view is not None:
                nodes = {"name": name, "nodes": view["nodes"], "expected": view["expected"],
                         "done": view["done"]}
                if nodes != last_nodes:
                    last_nodes = nodes
                    yield _sse("nodes", nodes)
            if local_done and (view is None or view["done"]):
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(POLL_S)
            if view is not None and time.monotonic() - view_read >= NODES_POLL_S:
                view_read = time.monotonic()
                try:
                    view = await asyncio.to_thread(service.cluster_view, name)
                except (ClusterError, TimeoutError):
                    pass  # etcd is away: the nodes' news when it is back

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _local_and_view(service: DataCacheService, name: str
                    ) -> tuple[str | None, dict[str, Any] | None]:
    """The cache's name here (None if it is not here) and its cluster-wide view (None if
    not declared so); a 404 when neither exists for this caller."""
    view = service.cluster_view(name)
    try:
        return service.get(name).name, view
    except CacheNotFoundError:
        if view is None:
            raise
        return None, view


def _sse(kind: str, data: dict[str, Any], event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data)}\n\n"
