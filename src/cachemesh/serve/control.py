"""The control API for models: ``/api/v1/models`` (FastAPI, documented at /docs).

    GET    /api/v1/models            every model, its state, size and worker; the memory summary
                                     (models of a protected bucket only with its token)
    POST   /api/v1/models            deploy a model (body: ModelSpec); kept across restarts
    GET    /api/v1/models/{name}     one model
    GET    /api/v1/models/{name}/stats  the loaded model's runtime counters (tokens generated,
                                     load phases); loads nothing
    DELETE /api/v1/models/{name}     unload it, forget it
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

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
        worker["models"] = [name for name in worker["models"] if name in shown]
    return {"models": [s.to_dict() for s in models], "memory": memory}


@router.post("/models", status_code=201)
async def deploy_model(spec: ModelSpec, request: Request) -> dict[str, Any]:
    return (await _service(request).deploy(spec)).to_dict()


@router.get("/models/{name}")
async def get_model(name: str, request: Request) -> dict[str, Any]:
    return _service(request).status(name).to_dict()


@router.delete("/models/{name}", status_code=204)
async def delete_model(name: str, request: Request) -> Response:
    await _service(request).remove(name)
    return Response(status_code=204)


@router.get("/models/{name}/stats")
async def model_stats(name: str, request: Request) -> dict[str, Any]:
    return await _service(request).runtime_stats(name)
