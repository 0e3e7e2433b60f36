"""Find the safetensors files of a checkpoint and read their headers.

A checkpoint is one of:

- a single ``*.safetensors`` file;
- a directory with a shard index ``model.safetensors.index.json``::

      {"metadata": {"total_size": 4940000000},
       "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors", ...}}

  whose shards are loaded in the order they first appear in ``weight_map``;
  another ``*.safetensors.index.json`` is used when it is the only index there;
- a directory without an index: every ``*.safetensors`` in it, by name;
- a cache source such as ``hf://org/name@rev``: pulled into the local cache first
  (anything containing ``://``). ``iter_tensors`` and ``load_state_dict`` stream
  a remote source that is not cached yet instead (``origin.py``).

Every header is read and validated before a byte of tensor data is, so a missing
shard, a shard that lacks a tensor the index promises, or a name that two files
both define fails fast with :class:`LoadError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoadError
from .format import SafetensorsHeader, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Checkpoint:
    """The validated headers of every file of one checkpoint, in load order."""

    root: Path
    headers: tuple[SafetensorsHeader, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in all files: what loading allocates."""
        return sum(h.nbytes for h in self.headers)

    def tensors(self) -> Iterator[TensorInfo]:
        for header in self.headers:
            yield from header.tensors


def resolve_source(path_or_source: str | os.PathLike[str]) -> Path:
    """A local path for ``path_or_source``; sources with ``://`` are pulled first."""
    text = os.fspath(path_or_source)
    if "://" in text:
        # Imported here: the cache layer is heavier and optional for plain paths.
        from ..caches import pull

        return Path(pull(text))
    return Path(text).expanduser()


def read_checkpoint(path_or_source: str | os.PathLike[str]) -> Checkpoint:
    """Resolve ``path_or_source`` to its safetensors files and read every header."""
    path = resolve_source(path_or_source)
    if path.is_file():
        return Checkpoint(path.parent, (read_header(path),))
    if not path.is_dir():
        raise LoadError(f"{path}: no such file or directory")

    index = _find_index(path)
    if index is None:
        files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if not files:
            raise LoadError(f"{path}: no *.safetensors files and no {INDEX_NAME}")
        headers = tuple(read_header(f) for f in files)
        _check_unique_names(headers)
        return Checkpoint(path, headers)

    weight_map = _read_index(index)
    shard_names = list(dict.fromkeys(weight_map.values()))
    for name in shard_names:
        if not (path / name).is_file():
            raise LoadError(f"{path / name}: shard listed in {index.name} is missing")
    headers = tuple(read_header(path / name) for name in shard_names)
    _check_unique_names(headers)
    by_file = {h.path.name: {t.name for t in h.tensors} for h in headers}
    for tensor, shard in weight_map.items():
        if tensor not in by_file[shard]:
            raise LoadError(
                f"{path / shard}: has no tensor {tensor!r}, which {index.name} says it holds"
            )
    return Checkpoint(path, headers)


def _find_index(directory: Path) -> Path | None:
    preferred = directory / INDEX_NAME
    if preferred.is_file():
        return preferred
    candidates = sorted(directory.glob("*.safetensors.index.json"))
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(c.name for c in candidates)
        raise LoadError(f"{directory}: several shard indexes ({names}); pass one file")
    return None


def _read_index(index: Path) -> dict[str, str]:
    try:
        raw = index.read_bytes()
    except OSError as exc:
        raise LoadError(f"{index}: unreadable shard index: {exc}") from exc
    return parse_index(raw, index)


def parse_index(raw: bytes, index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index's bytes (``index`` names it in errors)."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise LoadError(f"{index}: unreadable shard index: {exc}") from exc
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise LoadError(f"{index}: weight_map must map tensor names to file names")
    for shard in set(weight_map.values()):
        # A shard is a plain name beside the index, never a path out of the directory.
        if shard != Path(shard).name or shard in ("", ".", ".."):
            raise LoadError(f"{index}: shard name {shard!r} is not a file name")
    return weight_map


def _check_unique_names(headers: tuple[SafetensorsHeader, ...]) -> None:
    seen: dict[str, Path] = {}
    for header in headers:
        for t in header.tensors:
            if t.name in seen:
                raise LoadError(
                    f"{header.path}: tensor {t.name!r} is also defined in {seen[t.name]}"
                )
            seen[t.name] = header.path
