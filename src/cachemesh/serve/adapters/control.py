"""The control API for models: ``/api/v1/models`` (FastAPI, documented at /docs).

    GET    /api/v1/models            every model: document, versions, copies, workers; memory
                                     (models of a protected bucket only with its token)
    POST   /api/v1/models            deploy a model (body: ModelSpec); kept across restarts
    GET    /api/v1/models/{name}     one model: its document (documents.py) and status;
                                     ``ETag: "<revision>"`` (and ``revision`` in the body)
    PUT    /api/v1/models/{name}     set its document: deploys a new model (201), or rolls
                                     out a change (200, once the new versions serve); the
                                     same document again is 200 and writes nothing.
                                     ``If-Match: <revision>`` (from GET; 0 or ``"0"``: the
                                     model must be new): another revision is 409
    GET    /api/v1/models/{name}/stats  the loaded model's runtime counters (tokens generated,
                                     load phases); loads nothing
    DELETE /api/v1/models/{name}     unload it, forget it
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from ...errors import InvalidInputError
from ..core.documents import make_document
from ..core.registry import ModelSpec
from ..core.service import ModelService

router = APIRouter(prefix="/api/v1", tags=["models"])


def _service(request: Request) -> ModelService:
    return request.app.state.service


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    service = _service(request)
    models = service.list_models()  # only those the caller may see (protected buckets)
    memory = service.memory()
    shown = {s.name for s in models}
    for worker in memory["workers"]:
        # A copy is named MODEL or MODEL@VERSION (state.py); '@' is in no model name.
        worker["models"] = [name for name in worker["models"]
                            if name.partition("@")[0] in shown]
    return {"models": [_with_nodes(service, s.to_dict()) for s in models], "memory": memory}


def _with_nodes(service: ModelService, body: dict[str, Any]) -> dict[str, Any]:
    """In cluster mode, each version's status names the nodes holding a copy of it
    (``copies/`` in etcd, as this node's watch last saw it)."""
    cluster = service.cluster
    if cluster is None:
        return body
    held = cluster.copies_of(body["name"])
    for label, version in body.get("versions", {}).items():
        version["status"]["nodes"] = [
            {"node": node, "state": state.state, "bytes": state.bytes}
            for node, v, state in held if v == label]
    return body


@router.post("/models", status_code=201)
async def deploy_model(spec: ModelSpec, request: Request, response: Response) -> dict[str, Any]:
    service = _service(request)
    existed = _revision(service, spec.name) is not None
    status = await service.deploy(spec)
    if existed:  # the same spec again (another would be 409): nothing was written
        response.status_code = 200
    return _with_revision(service, status.to_dict(), response)


@router.get("/models/{name}")
async def get_model(name: str, request: Request, response: Response) -> dict[str, Any]:
    service = _service(request)
    return _with_revision(service, _with_nodes(service, service.status(name).to_dict()),
                          response)


def _revision(service: ModelService, name: str) -> int | None:
    dep = service.deployments.by_name.get(name)
    return None if dep is None or dep.removed else dep.revision


def _with_revision(service: ModelService, body: dict[str, Any],
                   response: Response) -> dict[str, Any]:
    """The document's revision (``revision`` in the body) as the ETag too (for If-Match)."""
    revision = _revision(service, body["name"])
    if revision is not None:
        response.headers["etag"] = f'"{revision}"'
    return body


def _if_match(request: Request) -> int | None:
    raw = request.headers.get("if-match")
    if raw is None:
        return None
    text = raw.strip().removeprefix("W/").strip('"')
    if not text.isdigit():
        raise InvalidInputError(f"If-Match must be a model revision (a number, as the ETag"
                                f" of GET /api/v1/models/NAME), got {raw!r}")
    return int(text)


_EXAMPLE = {"versions": {"v1": {"source": "s3://models/digits/1", "runtime": "sklearn"},
                         "v2": {"source": "s3://models/digits/2"}},
            "traffic": {"v1": 90, "v2": 10},
            "routes": [{"header": "x-model-version", "value": "v2", "version": "v2"}]}


# The body is read as JSON whatever its Content-Type says (`curl -d @doc.json` sends
# a form type), so it is described here rather than declared as a parameter.
_DOCUMENT_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "object", "additionalProperties": True}, "examples": {
        "canary": {"value": _EXAMPLE}}}}}}


@router.put("/models/{name}", openapi_extra=_DOCUMENT_BODY)
async def put_model(name: str, request: Request, response: Response) -> dict[str, Any]:
    """Set the model's document: its versions, traffic shares and routes (or a simple
    spec: ``source``, ``runtime``, ``version``). The versions it sends traffic to are
    loaded before it takes effect; versions it drops are unloaded after."""
    try:
        document = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError(f"the body is not a JSON document: {exc}") from None
    doc = make_document(document, name)
    service = _service(request)
    status, created = await service.apply(doc, if_match=_if_match(request))
    response.status_code = 201 if created else 200
    return _with_revision(service, status.to_dict(), response)


@router.delete("/models/{name}", status_code=204)
async def delete_model(name: str, request: Request) -> Response:
    await _service(request).remove(name)
    return Response(status_code=204)


@router.get("/models/{name}/stats")
async def model_stats(name: str, request: Request) -> dict[str, Any]:
    return await _service(request).runtime_stats(name)
