"""The API's documentation, offline: ``/docs`` (Swagger UI), ``/redoc``, ``/openapi.json``.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so they are blank
offline and in air-gapped clusters. These load them from the package
``fastapi-offline`` (its ``static/`` folder: swagger-ui-dist 5, Apache-2.0, and
ReDoc, MIT), served under ``/docs/assets/``; the pages load nothing from
elsewhere. ``swagger-ui-bundle`` (PyPI) was rejected: its Swagger UI (4.15)
does not render OpenAPI 3.1, which FastAPI writes.

The KServe V2 routes are plain Starlette routes on the root app (``v2_rest.py``:
the hot path has no validation models), so FastAPI does not see them: their part
of the document is written here (:func:`v2_paths`), with schemas named after the
protocol's JSON objects. ``tests/serve/test_v2_rest.py`` checks that every V2
route is described.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

ASSETS = "/docs/assets"

Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                   "INT64", "FP16", "FP32", "FP64", "BF16", "BYTES"]


def assets_dir() -> Path:
    """Swagger UI's and ReDoc's files, as the package ``fastapi-offline`` ships them."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"


# -- the V2 protocol's JSON objects, for the document only ---------------------------

class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    data: list[Any] = Field(description="flat (row-major) or nested; absent with the binary"
                            " extension (binary_data_size in parameters)")


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = None


class V2InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2Tensor]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int] = Field(description="-1: any size")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2RepositoryEntry(BaseModel):
    name: str
    version: str | None = None
    state: str
    reason: str | None = None


class V2RepositoryRequest(BaseModel):
    parameters: dict[str, Any] | None = Field(
        default=None, description='load: {"source": ...} deploys a new model;'
        ' unload: {"remove": true} forgets one')


class V2Error(BaseModel):
    error: str


MODELS = (V2Tensor, V2RequestedOutput, V2InferenceRequest, V2InferenceResponse,
          V2TensorMetadata, V2ModelMetadata, V2ServerMetadata, V2Live, V2Ready, V2ModelReady,
          V2RepositoryEntry, V2RepositoryRequest, V2Error)
TAG = "KServe V2"


def _ref(model: type[BaseModel] | str) -> dict[str, Any]:
    name = model if isinstance(model, str) else model.__name__
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _op(summary: str, ok: dict[str, Any], *, body: type[BaseModel] | None = None,
        params: Sequence[str] = (), errors: dict[str, str] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"tags": [TAG], "summary": summary, "responses": {"200": ok}}
    if params:
        op["parameters"] = [{"name": p, "in": "path", "required": True,
                             "schema": {"type": "string"}} for p in params]
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": _ref(body)}}}
    for status, why in (errors or {}).items():
        op["responses"][status] = _json(_ref(V2Error), why)
    return op


def v2_paths() -> dict[str, dict[str, Any]]:
    """The V2 routes of ``v2_rest.routes()`` as OpenAPI path items."""
    model_errors = {"404": "no such model (or version)", "503": "not available now"}
    paths: dict[str, dict[str, Any]] = {
        "/v2": {"get": _op("Server metadata", _json(_ref(V2ServerMetadata), "the server"))},
        "/v2/health/live": {"get": _op("Liveness", _json(_ref(V2Live), "live"),
                                       errors={"503": "shutting down"})},
        "/v2/health/ready": {"get": _op("Readiness", _json(_ref(V2Ready), "ready"),
                                        errors={"503": "warming up or draining"})},
        "/v2/repository/index": {"post": _op(
            "Every model version and its state",
            _json({"type": "array", "items": _ref(V2RepositoryEntry)}, "the versions"))},
    }
    for action, what in (("load", "Load a model (or deploy one from a source)"),
                         ("unload", "Unload a model (or remove it)")):
        paths[f"/v2/repository/models/{{model}}/{action}"] = {"post": _op(
            what, _json({"type": "object"}, "done"), body=V2RepositoryRequest,
            params=["model"], errors={"404": "no such model"})}
    for prefix, params in (("/v2/models/{model}", ["model"]),
                           ("/v2/models/{model}/versions/{version}", ["model", "version"])):
        paths[prefix] = {"get": _op("Model metadata", _json(_ref(V2ModelMetadata), "metadata"),
                                    params=params, errors=model_errors)}
        paths[prefix + "/ready"] = {"get": _op(
            "Model readiness", _json(_ref(V2ModelReady), "loaded"), params=params,
            errors={"400": "not loaded", "404": "no such model"})}
        paths[prefix + "/infer"] = {"post": _op(
            "Inference", _json(_ref(V2InferenceResponse), "the outputs"),
            body=V2InferenceRequest, params=params,
            errors={"400": "a request the model cannot take", **model_errors,
                    "413": "too large", "429": "too many requests"})}
    paths["/v2/repository/index"]["get"] = paths["/v2/repository/index"]["post"]
    return paths


def install(api: FastAPI) -> list[Any]:
    """The document with the V2 routes on ``api``, and its pages (routes for the root
    app: ``/docs``, ``/redoc`` and their assets). ``api`` is made with ``docs_url=None,
    redoc_url=None``."""

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            doc = get_openapi(title=api.title, version=api.version,
                              description=api.description, routes=api.routes)
            doc["paths"] = {**v2_paths(), **doc.get("paths", {})}
            _, defs = models_json_schema([(m, "serialization") for m in MODELS],
                                         ref_template="#/components/schemas/{model}")
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(defs.get("$defs", {}))
            api.openapi_schema = doc
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]

    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title=f"{api.title} - API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png")

    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{api.title} - API",
                              redoc_js_url=f"{ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{ASSETS}/favicon.png",
                              with_google_fonts=False)

    return [Route("/docs", swagger, methods=["GET"]), Route("/redoc", redoc, methods=["GET"]),
            Mount(ASSETS, app=StaticFiles(directory=assets_dir()))]
