"""The control API for data caches: ``/api/v1/datacaches`` (FastAPI, documented at /docs).

    POST   /api/v1/datacaches                 declare a cache and pull it in the background
    GET    /api/v1/datacaches[?bucket=b]      every cache, with status and progress
                                              (``usage=true``: and its logical bytes)
    GET    /api/v1/datacaches/{name}          one cache, with its events
    DELETE /api/v1/datacaches/{name}          remove it (409 while it is in use or pulled)
    GET    /api/v1/datacaches/{name}/events   server-sent events until Available or Failed

A POST body is either our own shape (:class:`DataCacheRequest`: ``name``,
``source``, ``bucket``, ``path``, ``include``, ``exclude``, ``size_gib``,
``retention_days``, ``options``) or the shape of Alibaba Cloud ECI's
CreateDataCache (:class:`EciCreateDataCache`, recognised by its capitalised
``Name``/``DataSource``)::

    {"Name": "qwen", "Bucket": "default", "Path": "/models/qwen", "Size": 20, "RetentionDays": 7,
     "DataSource": {"Type": "URL", "Options": {"repoSource": "HuggingFace/Model",
                                                "repoId": "Qwen/Qwen2.5-0.5B", "revision": "main"}}}

``DataSource.Type``: ``URL`` with ``repoSource`` ``HuggingFace/Model``,
``HuggingFace/Dataset`` or ``ModelScope/Model`` and ``repoId`` (``revision``
optional), or with ``url`` (one https file); ``NAS`` with ``server`` and
``path`` of a share this node has mounted already (found in /proc/self/mounts;
``server`` ``localhost`` names a local directory); ``OSS`` with ``bucket``,
``path`` (a prefix) and ``url`` (the endpoint). The option names follow ECI's
documentation as we know it (the option table was not reachable from here,
2026-11); credentials in options (``akId``, ``akSecret``, ...) are refused:
they would be stored with the cache, so OSS reads ``AWS_*`` from the server's
environment instead. ``Size`` (GiB, 20 by default as in ECI) is the cache's
quota: a pull whose files exceed it fails. ``RetentionDays``: a cache not used
for that long is removed by ``cachemesh gc`` (the server does not run gc on
its own).

A POST validates everything (names, paths, source, options) before anything
is written, answers 202 with the description, and queues the pull: at most
:data:`MAX_PULLS` pulls run at once, each in a child process (:class:`Puller`),
stopped with the server. Statuses are
ECI's: Pending, Loading, Available, Failed. Every description carries our
fields and, always (whatever shape created the cache), the ECI-named ones
(``DataCacheId``, ``Name``, ``Status``, ``LastMatchedTime``, ...), so a client
written for either shape reads the answer without asking for a format.

Access: the whole API is control class (``CACHEMESH_API_TOKEN`` when set;
serve/auth.py). A protected bucket's caches are listed, described, watched and
deleted only by a caller that presents that bucket's token
(``X-Cachemesh-Bucket-Token``); for anyone else they do not exist (404). Creating
a cache in a protected bucket needs its token too (403), and a local source
must lie in ``CACHEMESH_SERVE_SOURCE_ROOTS`` (without it, none is taken).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from ..access import can_use
from ..caches import (
    AVAILABLE,
    FAILED,
    MAX_RETENTION_DAYS,
    MAX_SIZE_LIMIT_GIB,
    PENDING,
    CacheInfo,
    Caches,
    CacheSpec,
    make_spec,
)
from ..errors import (
    CacheNotFoundError,
    ConflictError,
    ForbiddenError,
    InvalidInputError,
)
from ..sources import parse_source
from .auth import get_visible_cache, visible_caches

router = APIRouter(prefix="/api/v1", tags=["datacaches"])
log = logging.getLogger(__name__)

#: Pulls the server runs at once (each is itself parallel across files and ranges).
MAX_PULLS = 2
#: How often the event stream looks for news.
POLL_S = 0.2
FINAL = (AVAILABLE, FAILED)
ECI_DEFAULT_SIZE_GIB = 20
# Option names that carry credentials: never stored with a cache.
_SECRET_OPTIONS = {"akid", "aksecret", "accesskeyid", "accesskeysecret", "securitytoken",
                   "token", "password", "stsToken".lower()}


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


class EciDataSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    Type: Literal["URL", "NAS", "OSS"]
    Options: dict[str, str | int | bool] = Field(default_factory=dict)


class EciCreateDataCache(BaseModel):
    """Alibaba Cloud ECI's CreateDataCache request (the parts that mean something on one node)."""

    model_config = ConfigDict(extra="forbid")

    Name: str
    DataSource: EciDataSource
    Bucket: str = "default"
    Path: str | None = None
    Size: float = Field(default=ECI_DEFAULT_SIZE_GIB, gt=0, le=MAX_SIZE_LIMIT_GIB,
                        description="GiB; the cache's quota")
    RetentionDays: float | None = Field(default=None, gt=0, le=MAX_RETENTION_DAYS)
    # Accepted for compatibility, without meaning on a single node.
    RegionId: str | None = None
    SecurityGroupId: str | None = None
    VSwitchId: str | None = None
    ClientToken: str | None = None
    ResourceGroupId: str | None = None


def _shape(body: Any) -> str:
    return "eci" if isinstance(body, dict) and ("Name" in body or "DataSource" in body) else "ours"


CreateBody = Annotated[
    Annotated[DataCacheRequest, Tag("ours")] | Annotated[EciCreateDataCache, Tag("eci")],
    Discriminator(_shape),
]


# -- translating ECI ------------------------------------------------------------------


def _refuse_secrets(options: dict[str, Any]) -> None:
    secret = sorted(k for k in options if k.lower() in _SECRET_OPTIONS)
    if secret:
        raise InvalidInputError(
            f"DataSource.Options: {', '.join(secret)} would be stored with the cache; give the"
            " server its credentials in its environment (AWS_ACCESS_KEY_ID, ...) instead")


def _option(options: dict[str, Any], name: str, required: bool = True) -> str | None:
    value = options.get(name)
    if value is None or str(value).strip() == "":
        if required:
            raise InvalidInputError(f"DataSource.Options.{name} is required")
        return None
    return str(value).strip()


def _nas_path(server: str, share_path: str, mounts_file: str = "/proc/self/mounts") -> Path:
    """Where this node has ``server:share_path`` mounted (or a local directory for localhost)."""
    if not share_path.startswith("/"):
        raise InvalidInputError(f"DataSource.Options.path must be absolute, got {share_path!r}")
    if server in ("localhost", "127.0.0.1", "::1"):
        local = Path(share_path)
    else:
        local = None
        try:
            lines = Path(mounts_file).read_text().splitlines()
        except OSError:
            lines = []
        best = ""
        for line in lines:
            fields = line.split()
            if len(fields) < 3 or not fields[2].startswith("nfs"):
                continue
            host, _, exported = fields[0].partition(":")
            exported = "/" + exported.strip("/")
            rest = share_path.rstrip("/") or "/"
            if host != server or not (rest == exported or rest.startswith(exported.rstrip("/") + "/")):
                continue
            if len(exported) > len(best):
                best = exported
                mountpoint = fields[1].replace("\\040", " ")
                local = Path(mountpoint) / os.path.relpath(rest, exported)
        if local is None:
            raise InvalidInputError(f"NAS share {server}:{share_path} is not mounted on this"
                                    " node; mount it first (cachemesh reads mounted shares)")
    if not local.is_dir():
        raise InvalidInputError(f"NAS path {server}:{share_path} ({local}) is not a directory")
    return local


def eci_to_spec_fields(body: EciCreateDataCache) -> dict[str, Any]:
    """The fields of a :class:`~cachemesh.caches.CacheSpec` for an ECI request."""
    source_type, opts = body.DataSource.Type, dict(body.DataSource.Options)
    _refuse_secrets(opts)
    options: dict[str, Any] = {}
    if source_type == "URL":
        url = _option(opts, "url", required=False)
        repo_source = _option(opts, "repoSource", required=url is None)
        if url is not None and repo_source is None:
            source = url
        else:
            repo_id = _option(opts, "repoId")
            revision = _option(opts, "revision", required=False)
            kinds = {"huggingface/model": "hf://", "huggingface/dataset": "hf://datasets/",
                     "modelscope/model": "ms://"}
            prefix = kinds.get(str(repo_source).lower())
            if prefix is None:
                raise InvalidInputError(
                    f"DataSource.Options.repoSource {repo_source!r} is not one of"
                    " HuggingFace/Model, HuggingFace/Dataset, ModelScope/Model")
            source = f"{prefix}{repo_id}" + (f"@{revision}" if revision else "")
    elif source_type == "NAS":
        source = str(_nas_path(str(_option(opts, "server")), str(_option(opts, "path"))))
    else:  # OSS
        bucket = _option(opts, "bucket")
        prefix_path = (_option(opts, "path", required=False) or "").strip("/")
        if any(part in (".", "..") for part in prefix_path.split("/")):
            raise InvalidInputError(f"DataSource.Options.path {prefix_path!r}: an OSS prefix"
                                    " has no '.' or '..' segments")
        endpoint = _option(opts, "url", required=False) or _option(opts, "endpoint", required=False)
        source = f"s3://{bucket}/{prefix_path}".rstrip("/")
        if endpoint:
            if "://" not in endpoint:
                endpoint = f"https://{endpoint}"
            options["endpoint_url"] = endpoint
    return {
        "name": body.Name, "source": source, "bucket": body.Bucket,
        "path": body.Path.strip("/") if body.Path else None,
        "size_limit_gib": body.Size, "retention_days": body.RetentionDays, "options": options,
    }


# -- the background puller ---------------------------------------------------------------


class Puller:
    """Runs pulls in child processes of the server, :data:`MAX_PULLS` at a time.

    A process, not a thread of the server: hashing and writing gigabytes would
    take the server's GIL from its requests, and a process can be stopped at once
    when the server stops (a thread cannot: the server would wait for every pull
    to finish before exiting). Stopping one is a crash that the store is built
    for: the pull lock goes with the process, the cache then reads as Failed
    ("the pull was interrupted; pull again to resume it"), and what was verified
    or partly downloaded stays for the next pull, which POSTing the same
    declaration again starts. The child gets the server's settings (pickled on
    its stdin) and writes progress and events to the store, where the API reads
    them.
    """

    def __init__(self, caches: Caches, max_pulls: int = MAX_PULLS) -> None:
        self.settings = caches.settings
        self._pool = ThreadPoolExecutor(max_pulls, thread_name_prefix="cachemesh-datacache")
        self._queued: set[str] = set()
        self._children: dict[str, subprocess.Popen] = {}
        self._stopping = False
        self._lock = threading.Lock()

    def submit(self, name: str) -> None:
        with self._lock:
            if self._stopping or name in self._queued:
                return
            self._queued.add(name)
        self._pool.submit(self._run, name)

    def _run(self, name: str) -> None:
        try:
            with self._lock:
                if self._stopping:
                    return
                child = subprocess.Popen([sys.executable, "-c", _PULL_CHILD],
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
                self._children[name] = child
            child.communicate(pickle.dumps((self.settings, name)))
            if child.returncode not in (0, _PULL_FAILED) and not self._stopping:
                # A crash of the child (its traceback is on stderr); the store says
                # the pull was interrupted.
                log.warning("pull of %s: the pull process exited with %s", name,
                            child.returncode)
        except Exception:  # a bug: logged with its traceback, the pool's thread lives on
            log.exception("pull of %s failed", name)
        finally:
            with self._lock:
                self._children.pop(name, None)
                self._queued.discard(name)

    def queued(self, name: str) -> bool:
        """Whether a pull of ``name`` is queued or running here."""
        with self._lock:
            return name in self._queued

    def stop(self) -> None:
        """Stop every pull now (the caches read as interrupted) and start no other."""
        with self._lock:
            self._stopping = True
            children = list(self._children.values())
        for child in children:
            child.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)


_PULL_FAILED = 3  # the child's exit status for a failure the store recorded
_PULL_CHILD = f"""
import pickle, sys
from cachemesh.caches import Caches
from cachemesh.errors import CachemeshError
settings, name = pickle.load(sys.stdin.buffer)
try:
    Caches(settings).pull(name)
except CachemeshError:
    sys.exit({_PULL_FAILED})  # recorded: status Failed, the error and an event
"""


def stop_pulls(api: Any) -> None:
    """Stop the background pulls of ``api`` (the FastAPI app), when the server stops."""
    with _PULLER_LOCK:
        puller = getattr(api.state, "datacache_puller", None)
    if puller is not None:
        puller.stop()


def _caches(request: Request) -> Caches:
    return request.app.state.service.caches


def _as_seen(request: Request, info: CacheInfo) -> CacheInfo:
    """``info`` as the API reports it: a Failed cache that this server has queued a
    pull of again is Pending (its child process has not started yet)."""
    puller = getattr(request.app.state, "datacache_puller", None)
    if info.status == FAILED and puller is not None and puller.queued(info.name):
        return dataclasses.replace(info, status=PENDING, error=None)
    return info


def _puller(request: Request) -> Puller:
    state = request.app.state
    with _PULLER_LOCK:
        puller = getattr(state, "datacache_puller", None)
        if puller is None:
            puller = state.datacache_puller = Puller(_caches(request))
        return puller


_PULLER_LOCK = threading.Lock()


# -- who sees what -------------------------------------------------------------------------
# Protected buckets (access.py): a cache of a bucket whose token the caller did not
# present is not listed, and is "not found" when described, watched or deleted, exactly
# as a cache that does not exist (auth.visible_caches, auth.get_visible_cache).


def _check_create(caches: Caches, spec: CacheSpec, roots: tuple[Path, ...]) -> None:
    """Refuse, before anything is written, what this caller may not create.

    A protected bucket needs its token (403, as deploying a model there). A name
    taken by a cache the caller cannot see is a 409 that says nothing of it. A
    local source (a path, file://, NAS) must lie in the server's deployable roots
    (CACHEMESH_SERVE_SOURCE_ROOTS; none when unset), as for models deployed over the API.
    """
    if not can_use(caches.buckets, spec.bucket):
        raise ForbiddenError(f"bucket {spec.bucket!r} is protected; the request does not"
                             " carry its token")
    try:
        existing = caches.get(spec.name)
    except CacheNotFoundError:
        existing = None
    if existing is not None and not can_use(caches.buckets, existing.bucket):
        raise ConflictError(f"the name {spec.name!r} is taken")
    caches.check_source(parse_source(spec.source, spec.options, caches.settings), spec.bucket,
                        roots)


# -- descriptions ----------------------------------------------------------------------


def _iso(ts: float | None) -> str | None:
    if not ts:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):  # a date no calendar holds: none
        return None


def _percent(info: CacheInfo) -> int:
    if info.status == AVAILABLE:
        return 100
    p = info.progress
    return int(100 * p.bytes_done / p.bytes_total) if p.bytes_total else 0


def describe(info: CacheInfo, events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Our fields, then ECI's names for the same things."""
    out = info.to_dict()
    out.pop("spec", None)
    out["progress"]["percent"] = _percent(info)
    out["last_access_time"] = _iso(info.last_access)
    if events is not None:
        out["events"] = events
    out.update({
        "DataCacheId": f"edc-{info.name}",
        "Name": info.name,
        "Bucket": info.bucket,
        "Path": "/" + info.path.strip("/"),
        "Status": info.status,
        "Progress": f"{_percent(info)}%",
        "Size": info.size_limit_gib,
        "RetentionDays": info.retention_days,
        "CreationTime": _iso(info.created_at),
        "LastMatchedTime": _iso(info.last_access),
        "ExpireDateTime": _iso(info.last_access + info.retention_days * 86400)
        if info.retention_days else None,
    })
    if events is not None:
        out["Events"] = [{"Type": "Warning" if e["level"] in ("warning", "error") else "Normal",
                          "Reason": e["kind"], "Message": e["message"],
                          "FirstTimestamp": _iso(e["ts"]), "LastTimestamp": _iso(e["ts"]),
                          "Count": 1} for e in events]
    return out


def _usage(caches: Caches, infos: list[CacheInfo]
           ) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Each cache's files and logical bytes, the bytes no other cache shares (what
    removing it frees), and over ``infos``: logical against physical bytes, each
    distinct content counted once. Only the caches the caller sees are summed."""
    du = {c["name"]: c for c in caches.du()["caches"]}
    each = {i.name: {k: du[i.name][k] for k in ("files", "logical_bytes", "exclusive_bytes")}
            for i in infos if i.name in du}
    blobs: dict[str, int] = {}
    for name in each:
        blobs.update((r["sha256"], r["size"]) for r in caches.store.file_rows(name).values())
    logical, physical = sum(e["logical_bytes"] for e in each.values()), sum(blobs.values())
    return each, {"logical_bytes": logical, "physical_bytes": physical,
                  "saved_bytes": logical - physical}


def _events(caches: Caches, name: str, after: int = 0) -> list[dict[str, Any]]:
    return [{"id": e.id, "ts": e.ts, "level": e.level, "kind": e.kind, "message": e.message}
            for e in caches.events(name, after=after)]


# -- routes ------------------------------------------------------------------------------


@router.post("/datacaches", status_code=202)
def create_datacache(body: CreateBody, request: Request, response: Response) -> dict[str, Any]:
    """Declare a cache and start pulling it; answers at once (202) with its description.

    The same declaration again is accepted (and pulls again if the cache Failed);
    another declaration under the same name is a 409.
    """
    if isinstance(body, EciCreateDataCache):
        fields = eci_to_spec_fields(body)
    else:
        fields = {"name": body.name, "source": body.source, "bucket": body.bucket,
                  "path": body.path, "include": body.include, "exclude": body.exclude,
                  "size_limit_gib": body.size_gib, "retention_days": body.retention_days,
                  "options": body.options}
    spec = make_spec(**fields)
    caches = _caches(request)
    _check_create(caches, spec, request.app.state.service.cfg.source_roots)
    info = caches.create(spec)  # validates the source; writes nothing when it refuses
    if info.status != AVAILABLE:
        _puller(request).submit(info.name)
    response.headers["Location"] = f"/api/v1/datacaches/{info.name}"
    return describe(_as_seen(request, caches.get(info.name)))


@router.get("/datacaches")
def list_datacaches(request: Request,
                    bucket: Annotated[str | None, Query()] = None,
                    usage: Annotated[bool, Query(description="add logical and physical bytes"
                                                 " (as `cachemesh du`)")] = False
                    ) -> dict[str, Any]:
    infos = visible_caches(_caches(request), bucket)
    out: dict[str, Any] = {"datacaches": [describe(_as_seen(request, i)) for i in infos],
                           "TotalCount": len(infos)}
    if usage:
        each, out["usage"] = _usage(_caches(request), infos)
        for item in out["datacaches"]:
            item["usage"] = each.get(item["name"])
    return out


@router.get("/datacaches/{name}")
def get_datacache(name: str, request: Request) -> dict[str, Any]:
    info = _as_seen(request, get_visible_cache(_caches(request), name))
    return describe(info, _events(_caches(request), info.name))


@router.delete("/datacaches/{name}", status_code=204)
def delete_datacache(name: str, request: Request) -> Response:
    info = get_visible_cache(_caches(request), name)
    _caches(request).rm(info.name)
    return Response(status_code=204)


@router.get("/datacaches/{name}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "event: event (one cache event), progress, status"}})
async def stream_datacache_events(name: str, request: Request) -> StreamingResponse:
    """Server-sent events: the cache's events (``event: event``, with ids, so that
    ``Last-Event-ID`` resumes), its progress while it changes (``event: progress``)
    and its status (``event: status``); the stream ends once the status is final."""
    caches = _caches(request)
    info = await asyncio.to_thread(get_visible_cache, caches, name)
    try:
        after = int(request.headers.get("Last-Event-ID", "0"))
    except ValueError:
        after = 0
    if not 0 <= after < 2**63:  # event ids are SQLite integers
        after = 0

    async def stream() -> AsyncIterator[str]:
        nonlocal after
        last_progress: tuple | None = None
        last_status = None
        while True:
            current = _as_seen(request, await asyncio.to_thread(caches.get, info.name))
            news = await asyncio.to_thread(_events, caches, info.name, after)
            for event in news:
                after = event["id"]
                yield _sse("event", event, event["id"])
            progress = (current.progress.bytes_done, current.progress.files_done,
                        current.progress.bytes_total)
            if progress != last_progress:
                last_progress = progress
                yield _sse("progress", {"name": info.name, "percent": _percent(current),
                                        **current.to_dict()["progress"]})
            if current.status != last_status:
                last_status = current.status
                yield _sse("status", {"name": info.name, "status": current.status,
                                      "error": current.error})
            if current.status in FINAL:
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(kind: str, data: dict[str, Any], event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data)}\n\n"
