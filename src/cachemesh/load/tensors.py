"""From header entries to torch dtypes and shapes."""

from __future__ import annotations

import torch

from ..errors import InvalidInputError, LoadError
from .format import DTYPES, SafetensorsHeader, TensorInfo

# What ``dtype=`` converts. Float8 and float4 tensors are quantized weights that
# only make sense next to their scales, so they keep their type.
CASTABLE = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def torch_dtype(header: SafetensorsHeader, info: TensorInfo) -> torch.dtype:
    spec = DTYPES[info.dtype]
    dtype = getattr(torch, spec.torch_name, None) if spec.torch_name else None
    if not isinstance(dtype, torch.dtype):
        needs = f"torch.{spec.torch_name}" if spec.torch_name else "a torch dtype"
        raise LoadError(
            f"{header.path}: tensor {info.name!r} has dtype {info.dtype}, which needs "
            f"{needs}; torch {torch.__version__} has none"
        )
    return dtype


def torch_shape(header: SafetensorsHeader, info: TensorInfo) -> tuple[int, ...]:
    per = DTYPES[info.dtype].per_element
    if per == 1:
        return info.shape
    # Packed types hold `per` values in one torch element along the last axis.
    if not info.shape or info.shape[-1] % per:
        raise LoadError(
            f"{header.path}: tensor {info.name!r} ({info.dtype} {list(info.shape)}) cannot be "
            f"packed {per} to an element: its last dimension is not a multiple of {per}"
        )
    return (*info.shape[:-1], info.shape[-1] // per)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype=`` as given by a caller: a torch dtype, its name ("bfloat16") or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise InvalidInputError(f"not a torch dtype: {dtype!r}")
    return value
