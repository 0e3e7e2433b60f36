"""``load_state_dict``: a whole checkpoint into a dict of tensors."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import RefetchedError
from .checkpoint import Checkpoint, read_checkpoint
from .iterate import iter_tensors
from .origin import OriginStream
from .stats import LoadStats
from .stream import TensorStream


class LoadedStateDict(dict[str, torch.Tensor]):
    """A plain ``dict`` of name -> tensor, plus what the load did.

    ``stats`` is the :class:`LoadStats` of the load (bytes by source, tensors
    copied because misaligned, tensors cast, seconds); ``metadata`` merges the
    ``__metadata__`` of every file (for example ``{"format": "pt"}``).
    """

    stats: LoadStats
    metadata: Mapping[str, str]


def load_state_dict(
    path_or_source: str | os.PathLike[str] | Checkpoint,
    device: torch.device | str | int = "cpu",
    dtype: torch.dtype | str | None = None,
    threads: int | None = None,
    *,
    chunk_bytes: int | None = None,
    direct_io: bool | None = None,
    stream_origin: bool = True,
) -> LoadedStateDict:
    """Load every tensor of a safetensors checkpoint.

    Arguments are those of :func:`cachemesh.load.iter_tensors`. Tensors are
    views into one buffer per file, so the memory of a file is returned once all
    of its tensors are freed. On the CPU each view has a storage of its own
    (``torch.save`` of one tensor writes only that tensor); on CUDA the tensors
    of a file share one device storage.

    From a remote source that is not cached yet, tensors are read while the
    pull fetches them, and the dict is returned only once every file was
    verified: a failed pull raises its error, and a file fetched again after
    failing verification is read again from the verified cache.
    """
    options: dict[str, Any] = dict(device=device, dtype=dtype, threads=threads,
                                   chunk_bytes=chunk_bytes, direct_io=direct_io)
    stream = iter_tensors(path_or_source, stream_origin=stream_origin, **options)
    try:
        result = _collect(stream)
    except RefetchedError:
        # The pull succeeded, but some bytes we streamed were replaced: the view is verified.
        stream = iter_tensors(read_checkpoint(stream.view), **options)  # type: ignore[union-attr]
        result = _collect(stream)
    metadata: dict[str, str] = {}
    for header in stream.checkpoint.headers:
        metadata.update(header.metadata)
    result.metadata = metadata
    return result


def _collect(stream: TensorStream | OriginStream) -> LoadedStateDict:
    result = LoadedStateDict()
    with stream:
        for name, tensor in stream:
            result[name] = tensor
    result.stats = stream.stats
    return result
