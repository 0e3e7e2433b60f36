"""``iter_tensors``: a checkpoint's tensors as they land, from a file, a folder or a source.

It picks the stream: a checkpoint on disk (or a source already cached) is read by a
:class:`~.stream.TensorStream`; a remote source that is not cached yet is read by an
:class:`~.origin.OriginStream` from the bytes its pull writes. Both modules are
imported from here, so neither needs the other's chooser (``origin.py`` builds on
``stream.py``, never the reverse).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .checkpoint import Checkpoint, read_checkpoint
from .origin import STREAM_CHUNK_BYTES, OriginStream, open_origin_stream
from .stream import TensorStream


def iter_tensors(
    path_or_source: str | os.PathLike[str] | Checkpoint,
    device: torch.device | str | int = "cpu",
    dtype: torch.dtype | str | None = None,
    threads: int | None = None,
    *,
    chunk_bytes: int | None = None,
    direct_io: bool | None = None,
    stream_origin: bool = True,
) -> TensorStream | OriginStream:
    """Stream ``(name, tensor)`` pairs of a safetensors checkpoint in file order.

    ``path_or_source`` is a file, a directory (sharded through
    ``model.safetensors.index.json``, else every ``*.safetensors`` in it) or a
    cache source such as ``hf://org/name``. Each tensor is yielded as soon as
    its bytes have landed, while later ones are still being read. ``dtype``
    converts float16/bfloat16/float32/float64 tensors; ``device`` places them
    (``"cuda"`` streams through pinned staging buffers). ``threads`` reads in
    parallel (default: twice the cores, 4 to 16); ``chunk_bytes`` is the size
    of one read (default 16 MiB; 1 MiB from an origin); ``direct_io`` chooses
    how bytes not in the page cache are read (see ``reader.py``).

    A remote source that is not cached yet is pulled while its tensors are
    yielded from the bytes the fetcher writes (``origin.py``): tensors come
    before their bytes are verified, and the stream raises at its end if the
    pull fails. ``stream_origin=False`` pulls first, then loads.
    """
    options: dict[str, Any] = dict(device=device, dtype=dtype, threads=threads,
                                   chunk_bytes=chunk_bytes, direct_io=direct_io)
    if stream_origin and not isinstance(path_or_source, Checkpoint):
        text = os.fspath(path_or_source)
        if "://" in text:
            stream = open_origin_stream(
                text, {**options, "chunk_bytes": chunk_bytes or STREAM_CHUNK_BYTES})
            if stream is not None:
                return stream
    checkpoint = (
        path_or_source
        if isinstance(path_or_source, Checkpoint)
        else read_checkpoint(path_or_source)
    )
    return TensorStream(checkpoint, **options)
