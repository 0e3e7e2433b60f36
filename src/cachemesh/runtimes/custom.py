"""A user's own runtime class, named as ``module:Class`` (or ``module.Class``).

The model directory is put first on ``sys.path`` inside the worker, so the
module may be a file shipped with the model (as MLServer's custom runtimes
are), or any installed module. The class subclasses
:class:`cachemesh.runtimes.Runtime`; the custom runtime builds it with the
model's settings and hands every call to it.

    --model mine=/models/mine,runtime=custom,class=my_model:MyModel
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, ModelLoadError
from .base import ModelSettings, Runtime
from .types import InferenceRequest, InferenceResponse


def import_class(target: str, search: Path | None = None) -> type:
    """Import ``module:Class`` or ``module.Class``, looking in ``search`` first."""
    module_name, sep, class_name = target.partition(":")
    if not sep:
        module_name, _, class_name = target.rpartition(".")
    if not module_name or not class_name:
        raise InvalidInputError(f"a custom runtime class is 'module:Class', got {target!r}")
    if search is not None and search.is_dir() and str(search) not in sys.path:
        sys.path.insert(0, str(search))
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot import custom runtime class {target!r}: {exc}") from exc
    if not isinstance(cls, type):
        raise ModelLoadError(f"{target!r} is not a class")
    return cls


class CustomRuntime(Runtime):
    name = "custom"

    def __init__(self, settings: ModelSettings) -> None:
        super().__init__(settings)
        target = settings.parameters.get("class") or settings.parameters.get("implementation")
        if not target:
            raise InvalidInputError(
                f"model {settings.name!r}: the custom runtime needs parameter class=module:Class"
            )
        cls = import_class(str(target), Path(settings.path))
        if not issubclass(cls, Runtime):
            raise ModelLoadError(
                f"{target!r} does not subclass cachemesh.runtimes.Runtime"
            )
        self.inner: Runtime = cls(settings)

    def load(self) -> None:
        self.inner.load()

    def predict(self, request: InferenceRequest) -> InferenceResponse:
        return self.inner.predict(request)

    def unload(self) -> None:
        self.inner.unload()

    def memory_bytes(self) -> int | None:
        return self.inner.memory_bytes()

    def metadata(self) -> dict[str, Any]:
        return self.inner.metadata()

    def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self.inner.generate(payload)

    def stream(self, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return self.inner.stream(payload)
