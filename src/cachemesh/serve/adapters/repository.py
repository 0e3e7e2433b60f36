"""The KServe V2 repository extension, whatever the protocol: its index, load and
unload over the model service. ``v2_rest.py`` (``/v2/repository/...``) and
``v2_grpc.py`` (``Repository*`` RPCs) translate their messages into these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ...errors import InvalidInputError
from ..core.documents import DEFAULT_VERSION
from ..core.registry import make_model_spec
from ..core.service import ModelService
from ..core.state import LOADING, PULLING, READY, UNLOADING

#: What the server metadata names (REST's GET /v2, gRPC's ServerMetadata).
EXTENSIONS = ["model_repository", "binary_tensor_data", "parameters"]
#: A version's state in the index, in Triton's words (else UNAVAILABLE).
TRITON_STATE = {READY: "READY", LOADING: "LOADING", PULLING: "LOADING", UNLOADING: "UNLOADING"}


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str | None  # None: the model has no versions (the simple forms)
    state: str  # Triton's
    reason: str | None


def index(service: ModelService, ready_only: bool = False) -> list[IndexEntry]:
    """One entry per version of every model the caller may see, as Triton lists them."""
    out = []
    for s in service.list_models():
        for label, v in s.versions.items():
            if ready_only and v.state != READY:
                continue
            out.append(IndexEntry(s.name, None if label == DEFAULT_VERSION else label,
                                  TRITON_STATE.get(v.state, "UNAVAILABLE"), v.reason))
    return out


async def load_model(service: ModelService, name: str, params: dict[str, Any]) -> None:
    """The repository extension's load. With ``params["source"]`` (and optionally runtime,
    version, and runtime parameters under ``"config"``, an object or JSON text), a model
    not yet known is deployed first, as ``POST /api/v1/models`` would, and kept across
    restarts."""
    if "source" in params and name not in {s.name for s in service.list_models()}:
        config = params.get("config") or {}
        if isinstance(config, str):
            try:
                config = orjson.loads(config)
            except orjson.JSONDecodeError:
                raise InvalidInputError("parameter 'config' is not valid JSON") from None
        spec = make_model_spec({"name": name, "source": params["source"],
                                "runtime": params.get("runtime"),
                                "version": params.get("version"), "parameters": config})
        await service.deploy(spec)
    await service.load(name)


async def unload_model(service: ModelService, name: str, params: dict[str, Any]) -> None:
    """The repository extension's unload; with ``params["remove"] is True`` also forget it."""
    if params.get("remove") is True:
        await service.remove(name)
    else:
        await service.unload(name)
