"""A user's own runtime class, named as ``module:Class`` (or ``module.Class``).

The module may be a file shipped in the model directory (as MLServer's custom
runtimes are; each model's copy is imported under a name of its own), or any
installed module. The class subclasses
:class:`cachemesh.runtimes.Runtime`; the custom runtime builds it with the
model's settings and hands every call to it.

    --model mine=/models/mine,runtime=custom,class=my_model:MyModel
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
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
    try:
        module = _import_from(search, module_name) if search is not None else None
        if module is None:
            module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot import custom runtime class {target!r}: {exc}") from exc
    if not isinstance(cls, type):
        raise ModelLoadError(f"{target!r} is not a class")
    return cls


def _import_from(search: Path, module_name: str) -> ModuleType | None:
    """Import a module shipped in a model directory under a name of its own, so that
    two models that both ship ``model.py`` do not get each other's code."""
    if not search.is_dir():
        return None
    first = module_name.split(".")[0]
    if not ((search / f"{first}.py").is_file() or (search / first / "__init__.py").is_file()):
        return None
    if "." in module_name:  # a package inside the model directory: import it from there
        if str(search) not in sys.path:
            sys.path.insert(0, str(search))
        return importlib.import_module(module_name)
    unique = f"_cachemesh_model_{hashlib.sha256(str(search).encode()).hexdigest()[:12]}_{first}"
    if unique in sys.modules:
        return sys.modules[unique]
    spec = importlib.util.spec_from_file_location(unique, search / f"{first}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[unique] = module  # pickle and dataclasses look classes up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(unique, None)
        raise
    return module


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
        self.batchable = cls.batchable  # type: ignore[misc]

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

    def capabilities(self) -> dict[str, bool]:
        return self.inner.capabilities()

    def stats(self) -> dict[str, float]:
        return self.inner.stats()

    def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self.inner.generate(payload)

    def stream(self, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return self.inner.stream(payload)
