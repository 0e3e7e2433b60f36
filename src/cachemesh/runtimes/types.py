"""Protocol-free inference messages: what a runtime receives and returns.

These are the only shapes that cross from the server into a worker process and
back, so they stay small: dataclasses with slots, numpy arrays for tensor data
(they pickle out of band, see ``serve/workers/ipc.py``). Protocol adapters (V2 REST,
later V2 gRPC and OpenAI) translate their wire formats into these and back.

Tensor data is always a numpy array shaped like ``shape``. ``BYTES`` tensors
are object arrays whose elements are ``bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InferenceInputError

# KServe V2 datatype -> numpy dtype. BYTES is an object array of bytes.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_BY_KIND = {dt: name for name, dt in DATATYPES.items() if name != "BYTES"}


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype naming a numpy array's dtype (strings and objects are BYTES)."""
    name = _BY_KIND.get(array.dtype)
    if name is not None:
        return name
    if array.dtype.kind in ("O", "U", "S"):
        return "BYTES"
    raise InferenceInputError(f"no KServe V2 datatype for numpy dtype {array.dtype}")


def as_bytes_array(array: np.ndarray) -> np.ndarray:
    """A str/bytes/object array as an object array of ``bytes`` (BYTES tensors)."""
    out = np.empty(array.shape, dtype=object)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, v in enumerate(flat_in):
        flat_out[i] = v if isinstance(v, bytes) else str(v).encode()
    return out


@dataclass(slots=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, array: Any, **parameters: Any) -> Tensor:
        """A tensor from an array-like; the datatype follows the dtype."""
        arr = np.asarray(array)
        datatype = datatype_of(arr)
        if datatype == "BYTES":
            arr = as_bytes_array(arr)
        return cls(name, datatype, tuple(arr.shape), arr, dict(parameters))


@dataclass(slots=True)
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferenceRequest:
    inputs: list[Tensor]
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    def input(self, name: str) -> Tensor:
        for t in self.inputs:
            if t.name == name:
                return t
        raise InferenceInputError(
            f"missing input {name!r} (got {', '.join(repr(t.name) for t in self.inputs) or 'none'})"
        )

    def wants(self) -> list[str]:
        return [o.name for o in self.outputs]


@dataclass(slots=True)
class InferenceResponse:
    outputs: list[Tensor]
    parameters: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""
    model_version: str | None = None
    id: str | None = None
