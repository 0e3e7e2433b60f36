"""``load_state_dict``: a whole checkpoint into a dict of tensors."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from .checkpoint import Checkpoint, read_checkpoint
from .stats import LoadStats
from .stream import iter_tensors


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
) -> LoadedStateDict:
    """Load every tensor of a safetensors checkpoint.

    Arguments are those of :func:`cachemesh.load.iter_tensors`. Tensors are
    views into one buffer per file, so the memory of a file is returned once all
    of its tensors are freed. On the CPU each view has a storage of its own
    (``torch.save`` of one tensor writes only that tensor); on CUDA the tensors
    of a file share one device storage.
    """
    checkpoint = (
        path_or_source
        if isinstance(path_or_source, Checkpoint)
        else read_checkpoint(path_or_source)
    )
    result = LoadedStateDict()
    with iter_tensors(
        checkpoint,
        device=device,
        dtype=dtype,
        threads=threads,
        chunk_bytes=chunk_bytes,
        direct_io=direct_io,
    ) as stream:
        for name, tensor in stream:
            result[name] = tensor
    result.stats = stream.stats
    metadata: dict[str, str] = {}
    for header in checkpoint.headers:
        metadata.update(header.metadata)
    result.metadata = metadata
    return result
