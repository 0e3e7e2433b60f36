"""The safetensors file format: parse and validate a file's header.

A safetensors file is laid out like this (all integers little-endian)::

    offset 0        8-byte unsigned integer N: the length of the JSON header in bytes
    offset 8        N bytes of UTF-8 JSON (writers pad it with spaces to a multiple of 8)
    offset 8 + N    the data section: the raw bytes of every tensor, back to back

The JSON header is an object. Each key except ``__metadata__`` names a tensor::

    {
      "__metadata__": {"format": "pt"},                      optional, string -> string
      "model.embed.weight": {
        "dtype": "BF16",                                     see DTYPES below
        "shape": [32000, 4096],                              non-negative integers; [] is a scalar
        "data_offsets": [0, 262144000]                       [begin, end), relative to 8 + N
      },
      ...
    }

Tensor bytes are stored C-contiguous (row-major) and little-endian. Offsets are
relative to the start of the data section, so a tensor lives at file offsets
``[8 + N + begin, 8 + N + end)``. The official writer sorts tensors by
descending dtype size, pads the header to a multiple of 8, and so keeps every
tensor aligned for its dtype; other writers may not, and the loader copies a
tensor whose offset is not a multiple of its element size (see ``LoadStats``).

What :func:`parse_header` checks, so that a bad file raises :class:`LoadError`
instead of producing a silently wrong tensor:

- the file holds at least 8 bytes, and N is at most 100 MB (the limit the
  reference implementation uses) and fits in the file;
- the header is a UTF-8 JSON object without duplicate keys;
- every tensor has a known dtype, a shape of non-negative integers and
  ``0 <= begin <= end``;
- ``end - begin`` equals the number of elements times the dtype's size;
- every tensor ends inside the file (a truncated file fails here);
- no two non-empty tensors share a byte.

Gaps between tensors and bytes after the last tensor are tolerated and never
read. This module does not import torch: the header alone tells how much memory
a checkpoint needs, which the server uses before it decides to load.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoadError

# The reference implementation refuses headers above this size; so do we.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class DtypeSpec:
    """One safetensors dtype: its size in bits and the torch dtype that holds it."""

    name: str
    bits: int
    # Attribute of the torch module, or None where torch has no such type.
    torch_name: str | None
    # Values per torch element: 2 for F4, which torch packs two to a byte.
    per_element: int = 1


# Every dtype the safetensors format defines. The format counts F4 and F6 values
# in the shape; torch has a packed two-per-byte type for F4 and none for F6.
DTYPES: dict[str, DtypeSpec] = {
    spec.name: spec
    for spec in (
        DtypeSpec("BOOL", 8, "bool"),
        DtypeSpec("U8", 8, "uint8"),
        DtypeSpec("I8", 8, "int8"),
        DtypeSpec("I16", 16, "int16"),
        DtypeSpec("U16", 16, "uint16"),
        DtypeSpec("F16", 16, "float16"),
        DtypeSpec("BF16", 16, "bfloat16"),
        DtypeSpec("I32", 32, "int32"),
        DtypeSpec("U32", 32, "uint32"),
        DtypeSpec("F32", 32, "float32"),
        DtypeSpec("I64", 64, "int64"),
        DtypeSpec("U64", 64, "uint64"),
        DtypeSpec("F64", 64, "float64"),
        DtypeSpec("C64", 64, "complex64"),
        DtypeSpec("F8_E4M3", 8, "float8_e4m3fn"),
        DtypeSpec("F8_E5M2", 8, "float8_e5m2"),
        DtypeSpec("F8_E4M3FNUZ", 8, "float8_e4m3fnuz"),
        DtypeSpec("F8_E5M2FNUZ", 8, "float8_e5m2fnuz"),
        DtypeSpec("F8_E8M0", 8, "float8_e8m0fnu"),
        DtypeSpec("F4", 4, "float4_e2m1fn_x2", per_element=2),
        DtypeSpec("F6_E2M3", 6, None),
        DtypeSpec("F6_E3M2", 6, None),
    )
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, as its header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    # Absolute file offsets [start, end) of the tensor's bytes.
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed, validated header of one safetensors file."""

    path: Path
    file_size: int
    # N, the JSON header's length; the data section starts at 8 + N.
    header_size: int
    # Tensors in file order (by start offset, then name).
    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_size

    @property
    def data_end(self) -> int:
        """File offset just past the last tensor byte (the data start if there are none)."""
        return max((t.end for t in self.tensors), default=self.data_start)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data, which is what loading the file allocates."""
        return sum(t.nbytes for t in self.tensors)


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise LoadError(
                    f"{path}: not a safetensors file: {file_size} bytes, "
                    "too short for the 8-byte header length"
                )
            (header_size,) = struct.unpack("<Q", prefix)
            check_header_size(path, header_size, file_size)
            raw = f.read(header_size)
    except OSError as exc:
        raise LoadError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(raw) != header_size:
        raise LoadError(f"{path}: file is truncated inside its header")
    return parse_header(path, raw, file_size)


def check_header_size(path: Path, header_size: int, file_size: int) -> None:
    if header_size > MAX_HEADER_BYTES:
        raise LoadError(
            f"{path}: header length {header_size} exceeds {MAX_HEADER_BYTES} bytes; "
            "not a safetensors file, or a corrupt one"
        )
    if 8 + header_size > file_size:
        raise LoadError(
            f"{path}: header length {header_size} runs past the end of the file "
            f"({file_size} bytes): the file is truncated or not a safetensors file"
        )


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_header(path: Path, raw: bytes, file_size: int) -> SafetensorsHeader:
    """Validate the JSON header ``raw`` of a file of ``file_size`` bytes at ``path``."""
    header_size = len(raw)
    check_header_size(path, header_size, file_size)
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise LoadError(f"{path}: header is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise LoadError(f"{path}: header is not a JSON object")

    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise LoadError(f"{path}: __metadata__ must map strings to strings")

    data_start = 8 + header_size
    tensors = [_tensor_info(path, name, entry, data_start) for name, entry in doc.items()]
    tensors.sort(key=lambda t: (t.start, t.end, t.name))

    for t in tensors:
        if t.end > file_size:
            raise LoadError(
                f"{path}: file is truncated: tensor {t.name!r} ends at byte {t.end} "
                f"but the file has {file_size} bytes"
            )
    previous: TensorInfo | None = None
    for t in tensors:
        if t.nbytes == 0:
            continue
        if previous is not None and t.start < previous.end:
            raise LoadError(
                f"{path}: header lies about offsets: tensors {previous.name!r} "
                f"and {t.name!r} overlap"
            )
        previous = t
    return SafetensorsHeader(path, file_size, header_size, tuple(tensors), metadata)


def _is_int(value: object) -> bool:
    # JSON true/false arrive as Python bools, which are ints; they are not sizes.
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise LoadError(f"{where}: entry is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise LoadError(f"{where}: missing or invalid dtype")
    spec = DTYPES.get(dtype)
    if spec is None:
        raise LoadError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise LoadError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise LoadError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end")
    numel = 1
    for d in shape:
        numel *= d
    bits = numel * spec.bits
    begin, end = offsets
    if bits % 8 or bits // 8 != end - begin:
        raise LoadError(
            f"{where}: header lies about offsets: {dtype} {shape} needs {bits / 8:g} bytes "
            f"but data_offsets [{begin}, {end}] hold {end - begin}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)
