"""ONNX models on onnxruntime (CPU), asked over KServe V2.

The model file, in this order: the ``uri`` parameter, the file the conversion
manifest names (``cachemesh-convert.json``, ``runtime.file``), ``model.onnx``,
then the only ``*.onnx`` in the directory. ``cachemesh convert SRC --to onnx``
writes such a directory; any other ONNX file serves the same way.

The graph says what it takes: V2 metadata lists its tensor inputs and outputs
with V2 datatypes and shapes (a dynamic dimension is ``-1``), and a request is
checked against them before onnxruntime sees it. A missing or unknown input,
a datatype other than the graph's, a wrong rank or a wrong fixed dimension is
the request's fault (``InferenceInputError``, a 4xx), named in the message. No
datatype is converted silently: a float64 array sent to a float32 input is
refused, as Triton refuses it. Outputs are all the graph's tensor outputs, or
those the request names.

Parameters: ``threads`` (onnxruntime's intra-op threads; default: the
worker's thread budget, ``CACHEMESH_SERVE_WORKER_THREADS``; 0 lets onnxruntime
pick), ``batchable`` (whether requests that arrive together may be stacked
into one run; by default, when every input and output has a dynamic first
dimension that is unnamed or named like a batch).

Memory: onnxruntime copies the weights into its own arena, so the worker's
RSS measurement (``memory_bytes`` returns None) is the model's true size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..config import worker_threads
from ..errors import InferenceInputError, InvalidInputError, ModelLoadError
from .base import ModelSettings, Runtime
from .files import (
    conversion_runtime,
    flag,
    int_param,
    single_file,
    uri_file,
)
from .onnx_signature import PLATFORM
from .types import DATATYPES, InferenceRequest, InferenceResponse, Tensor, as_bytes_array

# onnxruntime's element type names -> KServe V2 datatypes.
ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
# Names of a dynamic first dimension that say "rows" ("unk__…": an exporter's unnamed dim).
_ROW_NAMES = ("n", "none", "rows")


def model_file(path: Path, uri: str | None = None) -> Path:
    """The ONNX file to load from a model directory (or the file itself)."""
    if path.is_file():
        return path
    if uri:
        return uri_file(path, uri)
    named = conversion_runtime(path).get("file")
    if isinstance(named, str) and "/" not in named and (path / named).is_file():
        return path / named
    if (path / "model.onnx").is_file():
        return path / "model.onnx"
    return single_file(path, (".onnx",), "ONNX file", ("model.onnx",))


class _Spec:
    """One graph tensor: its name, V2 datatype and shape (None for a dynamic dim)."""

    __slots__ = ("datatype", "dim_names", "dims", "name")

    def __init__(self, node: Any) -> None:
        self.name: str = node.name
        self.datatype: str | None = ORT_TO_V2.get(node.type)
        shape = node.shape if isinstance(node.shape, list | tuple) else []
        self.dims: list[int | None] = [d if isinstance(d, int) and d >= 0 else None
                                       for d in shape]
        self.dim_names: list[str | None] = [d if isinstance(d, str) else None for d in shape]

    def v2(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype,
                "shape": [-1 if d is None else d for d in self.dims]}

    def batch_first(self) -> bool:
        if not self.dims or self.dims[0] is not None:
            return False
        label = (self.dim_names[0] or "").lower()
        return (not label or "batch" in label or label in _ROW_NAMES
                or label.startswith("unk__"))


class OnnxRuntime(Runtime):
    name = "onnx"

    def __init__(self, settings: ModelSettings) -> None:
        super().__init__(settings)
        self.session: Any = None
        self.file: Path | None = None
        self.inputs: list[_Spec] = []
        self.outputs: list[_Spec] = []

    @classmethod
    def detect(cls, path: Path) -> int:
        if path.is_file():
            return 80 if path.suffix == ".onnx" else 0
        if conversion_runtime(path).get("engine") == "onnxruntime":
            return 95
        if (path / "model.onnx").is_file():
            return 80
        return 60 if any(p.suffix == ".onnx" for p in path.iterdir() if p.is_file()) else 0

    @classmethod
    def preload(cls) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            pass  # load() says what to install

    def load(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelLoadError("the onnx runtime needs onnxruntime: install cachemesh[onnx]") \
                from exc
        params = self.settings.parameters
        self.file = model_file(Path(self.settings.path), params.get("uri"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int_param(params, "threads", worker_threads())
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.file), sess_options=options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception types are not importable API
            raise ModelLoadError(f"onnxruntime cannot load {self.file.name}: {exc}") from exc
        self.inputs = [_Spec(i) for i in self.session.get_inputs()]
        self.outputs = [_Spec(o) for o in self.session.get_outputs()]
        unfed = [f"{s.name} ({i.type})" for s, i in zip(self.inputs, self.session.get_inputs(),
                                                       strict=True) if s.datatype is None]
        if unfed:
            raise ModelLoadError(
                f"{self.file.name}: inputs of types KServe V2 cannot carry: {', '.join(unfed)}"
            )
        if not any(o.datatype for o in self.outputs):
            raise ModelLoadError(f"{self.file.name}: no tensor outputs (sequences and maps, such"
                                 " as skl2onnx's ZipMap, are not served; convert without them)")
        if "batchable" in params:
            self.batchable = flag(params["batchable"])  # type: ignore[misc]
        else:
            self.batchable = all(s.batch_first() for s in self.inputs + self.outputs  # type: ignore[misc]
                                 if s.datatype)

    def unload(self) -> None:
        self.session = None

    @classmethod
    def describe(cls, settings: ModelSettings) -> dict[str, Any] | None:
        from .onnx_signature import read_signature

        try:
            file = model_file(Path(settings.path), settings.parameters.get("uri"))
        except (ModelLoadError, InvalidInputError):
            return None
        return read_signature(file)

    def metadata(self) -> dict[str, Any]:
        return {
            "platform": PLATFORM,
            "inputs": [s.v2() for s in self.inputs],
            "outputs": [s.v2() for s in self.outputs if s.datatype],
        }

    def predict(self, request: InferenceRequest) -> InferenceResponse:
        feed = self._feed(request)
        wanted = request.wants()
        servable = {s.name: s for s in self.outputs if s.datatype}
        for name in wanted:
            if name not in servable:
                raise InferenceInputError(
                    f"model {self.settings.name!r} has no output {name!r}"
                    f" (it has {', '.join(servable)})"
                )
        names = wanted or list(servable)
        try:
            results = self.session.run(names, feed)
        except Exception as exc:
            # What passed our checks and still fails is the graph's verdict on values
            # (an index out of range, mismatched dynamic dims between inputs).
            if type(exc).__name__ in ("InvalidArgument", "InvalidGraph"):
                raise InferenceInputError(f"model {self.settings.name!r}: {exc}") from exc
            raise
        return InferenceResponse(outputs=[
            Tensor(name, servable[name].datatype or "BYTES", tuple(np.shape(value)),
                   as_bytes_array(np.asarray(value)) if servable[name].datatype == "BYTES"
                   else np.asarray(value))
            for name, value in zip(names, results, strict=True)
        ])

    def _feed(self, request: InferenceRequest) -> dict[str, np.ndarray]:
        expected = {s.name: s for s in self.inputs}
        given = {t.name: t for t in request.inputs}
        model = self.settings.name
        unknown = [n for n in given if n not in expected]
        missing = [n for n in expected if n not in given]
        if unknown or missing:
            parts = []
            if missing:
                parts.append(f"missing input{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(map(repr, missing))}")
            if unknown:
                parts.append(f"unknown input{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))}")
            raise InferenceInputError(
                f"model {model!r}: {'; '.join(parts)} (it takes {', '.join(map(repr, expected))})"
            )
        feed = {}
        for name, spec in expected.items():
            t = given[name]
            if t.datatype != spec.datatype:
                raise InferenceInputError(
                    f"model {model!r}: input {name!r} is {spec.datatype}, got {t.datatype}"
                )
            shape = tuple(t.data.shape)
            want = [-1 if d is None else d for d in spec.dims]
            if len(shape) != len(spec.dims) or any(
                    d is not None and d != s for d, s in zip(spec.dims, shape, strict=True)):
                raise InferenceInputError(
                    f"model {model!r}: input {name!r} has shape {list(shape)}, the model takes"
                    f" {want} (-1: any size)"
                )
            if spec.datatype == "BYTES":
                array = np.empty(shape, dtype=object)
                flat = array.reshape(-1)
                for i, v in enumerate(t.data.reshape(-1)):
                    try:
                        flat[i] = v.decode() if isinstance(v, bytes) else str(v)
                    except UnicodeDecodeError:
                        raise InferenceInputError(
                            f"model {model!r}: input {name!r} element {i} is not UTF-8 text"
                        ) from None
                feed[name] = array
            else:
                feed[name] = np.ascontiguousarray(t.data, dtype=DATATYPES[spec.datatype])
        return feed
