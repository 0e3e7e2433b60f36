"""The fast safetensors loader.

    load_state_dict(path_or_source, device="cpu", dtype=None, threads=None) -> dict
    iter_tensors(path_or_source, device="cpu", dtype=None, threads=None) -> TensorStream
    load_pretrained(path_or_source, auto_class=None, **kwargs) -> transformers model

Modules: ``format`` parses and validates one file's header, ``checkpoint``
finds a checkpoint's files (shard index, directory, cache source),
``reader`` reads chunks in parallel (page cache first, then ``O_DIRECT``),
``memory`` allocates the huge-page host buffers, ``stream`` turns landed chunks
into tensors (and holds the CUDA staging path), ``origin`` streams a source
that is not cached yet from the fetcher's partial files while it is pulled
(building on ``stream``; ``feed`` finds where those bytes are), ``iterate`` picks
one of the two for ``iter_tensors``,
``state_dict`` and ``pretrained`` build on it.

The names that need torch are imported on first use, so reading a header to
size a checkpoint (``read_checkpoint(path).nbytes``) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .checkpoint import Checkpoint, read_checkpoint
from .format import DTYPES, SafetensorsHeader, TensorInfo, read_header
from .stats import LoadStats

__all__ = [
    "DTYPES",
    "Checkpoint",
    "LoadStats",
    "LoadedStateDict",
    "SafetensorsHeader",
    "TensorInfo",
    "TensorStream",
    "iter_tensors",
    "load_pretrained",
    "load_state_dict",
    "read_checkpoint",
    "read_header",
]

_LAZY: dict[str, str] = {
    "LoadedStateDict": "cachemesh.load.state_dict",
    "load_state_dict": "cachemesh.load.state_dict",
    "TensorStream": "cachemesh.load.stream",
    "iter_tensors": "cachemesh.load.iterate",
    "load_pretrained": "cachemesh.load.pretrained",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'cachemesh.load' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from .iterate import iter_tensors as iter_tensors
    from .pretrained import load_pretrained as load_pretrained
    from .state_dict import LoadedStateDict as LoadedStateDict
    from .state_dict import load_state_dict as load_state_dict
    from .stream import TensorStream as TensorStream
