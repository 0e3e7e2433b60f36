"""The control API for models: ``/api/v1/models`` (FastAPI, documented at /docs).

    GET    /api/v1/models            every model: document, versions, copies, workers; memory
                                     (models of a protected bucket only with its token)
    POST   /api/v1/models            deploy a model (body: ModelSpec); kept across restarts
    GET    /api/v1/models/{name}     one model: its document (documents.py) and status
    PUT    /api/v1/models/{name}     set its document: deploys a new model (201), or rolls
                                     out a change (200, once the new versions serve)
    GET    /api/v1/models/{name}/stats  the loaded model's runtime counters (tokens generated,
                                     load phases); loads nothing
    DELETE /api/v1/models/{name}     unload it, forget it
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from ..errors import InvalidInputError
from .documents import make_document
from .registry import ModelSpec
from .service import ModelService

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
    return {"models": [s.to_dict() for s in models], "memory": memory}


@router.post("/models", status_code=201)
async def deploy_model(spec: ModelSpec, request: Request) -> dict[str, Any]:
    return (await _service(request).deploy(spec)).to_dict()


@router.get("/models/{name}")
async def get_model(name: str, request: Request) -> dict[str, Any]:
    return _service(request).status(name).to_dict()


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
    status, created = await _service(request).apply(doc)
    response.status_code = 201 if created else 200
    return status.to_dict()


@router.delete("/models/{name}", status_code=204)
async def delete_model(name: str, request: Request) -> Response:
    await _service(request).remove(name)
    return Response(status_code=204)


@router.get("/models/{name}/stats")
async def model_stats(name: str, request: Request) -> dict[str, Any]:
    return await _service(request).runtime_stats(name)
