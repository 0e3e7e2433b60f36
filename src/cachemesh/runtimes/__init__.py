"""Runtimes: how each kind of model is loaded and asked (see ``base.py``).

Runtimes are named. The built-in ones (``sklearn``, ``custom``, ``transformers``,
``ctranslate2``, ``onnx``; the last two need the ``[ct2]`` and ``[onnx]`` extras) and any that
installed packages declare under the entry-point group ``cachemesh.runtimes``
are listed by :func:`available`; an installed plugin may not take a built-in
name. :func:`resolve` decides which runtime serves a model directory:

1. the runtime the user named (``runtime=sklearn``);
2. else MLServer's ``model-settings.json``, so MLServer users migrate with
   their folders unchanged: ``mlserver_sklearn.SKLearnModel`` maps to
   ``sklearn``, any other ``implementation`` to ``custom`` with that class;
3. else the runtime whose ``detect`` is most confident about the files.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, UnknownRuntimeError
from .base import ModelSettings, Runtime
from .types import (
    DATATYPES,
    InferenceRequest,
    InferenceResponse,
    RequestedOutput,
    Tensor,
    datatype_of,
)

__all__ = [
    "Runtime",
    "ModelSettings",
    "Tensor",
    "RequestedOutput",
    "InferenceRequest",
    "InferenceResponse",
    "DATATYPES",
    "datatype_of",
    "ENTRY_POINT_GROUP",
    "available",
    "runtime_class",
    "resolve",
    "Resolved",
    "describe",
]

ENTRY_POINT_GROUP = "cachemesh.runtimes"
BUILTIN: dict[str, str] = {
    "sklearn": "cachemesh.runtimes.sklearn:SKLearnRuntime",
    "custom": "cachemesh.runtimes.custom:CustomRuntime",
    "ctranslate2": "cachemesh.runtimes.ctranslate2:CTranslate2Runtime",
    "onnx": "cachemesh.runtimes.onnx:OnnxRuntime",
    "transformers": "cachemesh.runtimes.transformers:TransformersRuntime",
}
# MLServer implementations and what serves them here (None: no runtime yet).
MLSERVER_IMPLEMENTATIONS: dict[str, str | None] = {
    "mlserver_sklearn.SKLearnModel": "sklearn",
    "mlserver_sklearn.sklearn.SKLearnModel": "sklearn",
    "mlserver_xgboost.XGBoostModel": None,
    "mlserver_lightgbm.LightGBMModel": None,
    "mlserver_mlflow.MLflowRuntime": None,
    "mlserver_huggingface.HuggingFaceRuntime": None,
}
MODEL_SETTINGS = "model-settings.json"


def available() -> dict[str, str]:
    """Runtime name -> ``module:Class``: built-ins, then installed plugins."""
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTIN and ep.value != BUILTIN[ep.name]:
            continue  # a plugin cannot replace a built-in runtime
        found.setdefault(ep.name, ep.value)
    return found


def runtime_class(name: str) -> type[Runtime]:
    target = available().get(name)
    if target is None:
        raise UnknownRuntimeError(
            f"unknown runtime {name!r}; installed: {', '.join(sorted(available()))}"
        )
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Runtime)):
        raise UnknownRuntimeError(f"runtime {name!r} ({target}) does not subclass Runtime")
    return cls


@dataclass
class Resolved:
    """Which runtime serves a model directory, and with what settings."""

    runtime: str
    parameters: dict[str, Any] = field(default_factory=dict)
    version: str | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    # V2 metadata read from the files before any load (Runtime.describe); None: a load
    # must tell.
    metadata: dict[str, Any] | None = None

    def settings(self, name: str, path: Path) -> ModelSettings:
        return ModelSettings(name=name, path=path, version=self.version,
                             parameters=dict(self.parameters), inputs=list(self.inputs),
                             outputs=list(self.outputs))


def describe(resolved: Resolved, name: str, path: Path) -> dict[str, Any] | None:
    """The model's V2 metadata without loading it (``Runtime.describe``), or None."""
    try:
        return runtime_class(resolved.runtime).describe(resolved.settings(name, path))
    except Exception:  # a plugin's describe that fails: the load will tell
        return None


def read_model_settings(path: Path) -> dict[str, Any] | None:
    file = path / MODEL_SETTINGS
    if not path.is_dir() or not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{file}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidInputError(f"{file}: expected a JSON object")
    return data


def resolve(path: Path, runtime: str | None = None, parameters: dict[str, Any] | None = None,
            version: str | None = None) -> Resolved:
    """Pick the runtime for the model in ``path`` (see the module docstring)."""
    params: dict[str, Any] = {}
    inputs: list[dict[str, Any]] = []
    outputs: list[dict[str, Any]] = []
    chosen, reason = runtime, "named by the user" if runtime else ""
    ms = read_model_settings(path)
    if ms is not None:
        p = dict(ms.get("parameters") or {})
        extra = p.pop("extra", None) or {}
        params.update({k: v for k, v in p.items() if k in ("uri", "version", "format")})
        params.update(extra)
        version = version or (str(p["version"]) if p.get("version") else None)
        inputs, outputs = list(ms.get("inputs") or []), list(ms.get("outputs") or [])
        impl = ms.get("implementation")
        if chosen is None and impl:
            if impl in MLSERVER_IMPLEMENTATIONS:
                chosen = MLSERVER_IMPLEMENTATIONS[impl]
                if chosen is None:
                    raise UnknownRuntimeError(
                        f"{path / MODEL_SETTINGS}: MLServer implementation {impl!r} has no"
                        " cachemesh runtime yet; name one with runtime=..."
                    )
            else:
                chosen = "custom"
                params.setdefault("class", impl)
            reason = f"{MODEL_SETTINGS} implementation {impl}"
    params.pop("version", None)
    params.update(parameters or {})
    if chosen is None:
        scores = []
        for name in available():
            try:
                score = runtime_class(name).detect(path)
            except Exception:  # a broken plugin must not stop the others
                score = 0
            if score > 0:
                scores.append((score, name))
        if not scores:
            raise UnknownRuntimeError(
                f"cannot tell which runtime serves {path}; name one with runtime=..."
                f" (installed: {', '.join(sorted(available()))})"
            )
        score, chosen = max(scores)
        reason = f"detected from the files (confidence {score})"
    runtime_class(chosen)  # fail early on an unknown name
    return Resolved(chosen, params, version, inputs, outputs, reason)
