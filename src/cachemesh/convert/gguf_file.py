"""Reading GGUF files: checked on open, tensors dequantized one at a time.

GGUF is llama.cpp's single-file model format (ggml's ``docs/gguf.md``; the
``gguf`` package reads it for us)::

    "GGUF" (magic)  uint32 version  uint64 tensor count  uint64 metadata count
    metadata        typed key/values: general.architecture, llama.block_count,
                    tokenizer.ggml.tokens, tokenizer.chat_template, …
    tensor infos    name, dims (innermost first: ne0 is a row's length), ggml type,
                    offset into the data section
    padding, then the tensors' bytes, each aligned (general.alignment, 32 by default)

:func:`open_gguf` refuses a file that is not one (wrong magic), is cut short
(a tensor's bytes run past the end of the file) or is otherwise unreadable,
with an :class:`~cachemesh.errors.InvalidInputError` naming the file, before
anything is converted. :meth:`GGUFFile.unsupported` lists tensors whose type
is not one cachemesh dequantizes.

Dequantized types: the ones transformers' own GGUF loader takes
(``SUPPORTED_TYPES``), through the ``gguf`` package's numpy dequantizer. Other
ggml types (Q8_1, Q8_K, the ternary TQ1_0/TQ2_0, MXFP4, integer tensors) are
refused rather than guessed at.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader

from ..errors import InvalidInputError

MAGIC = b"GGUF"
# What transformers' GGUF loader dequantizes (its documentation's list), in ggml's order.
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL",
)
# What the gguf package's reader raises on bytes that are not what the header says.
_READ_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError)


class _Reader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map.

    The reader slices its map once or twice per metadata value: some 250,000
    slices for a 49k-token vocabulary. On ``numpy.memmap`` each slice goes through
    the subclass's Python hooks; on a plain view of the same mapping it does not,
    and opening SmolLM2's file takes a quarter of the time. The bytes are the same
    (the view keeps the map alive)."""

    @property  # type: ignore[override]
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain = value.view(np.ndarray)


class GGUFFile:
    """An open GGUF file: its metadata and tensor infos (the bytes stay on disk, mapped)."""

    def __init__(self, path: Path, reader: Any) -> None:
        self.path = path
        self._reader = reader
        self.tensors: dict[str, Any] = {t.name: t for t in reader.tensors}

    # -- metadata ------------------------------------------------------------------

    def has(self, key: str) -> bool:
        return key in self._reader.fields

    def count(self, key: str) -> int:
        """How many items an array field holds (0 if absent), without reading them."""
        field = self._reader.fields.get(key)
        return 0 if field is None else len(field.data)

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value (str, int, float, bool or a list of them); ``default`` if absent."""
        field = self._reader.fields.get(key)
        if field is None:
            return default
        try:
            value = field.contents()
        except _READ_ERRORS as exc:
            raise InvalidInputError(f"{self.path}: metadata {key} is unreadable: {exc}") from None
        return default if value is None else value

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise InvalidInputError(f"{self.path}: the GGUF metadata has no {key}")
        return value

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.get(key, default)
        if value is None:
            raise InvalidInputError(f"{self.path}: the GGUF metadata has no {key}")
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise InvalidInputError(f"{self.path}: metadata {key} is {value!r}, not a count")
        return int(value)

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    # -- tensors -------------------------------------------------------------------

    def type_of(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def type_counts(self) -> dict[str, int]:
        """How many tensors of each ggml type the file holds."""
        return dict(sorted(Counter(self.type_of(n) for n in self.tensors).items()))

    def unsupported(self) -> dict[str, str]:
        """Tensor name -> ggml type, for every tensor of a type not in SUPPORTED_TYPES."""
        return {n: self.type_of(n) for n in self.tensors if self.type_of(n) not in SUPPORTED_TYPES}

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in torch's order (outermost first: [out, in] for a linear)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def nbytes(self, name: str) -> int:
        return int(self.tensors[name].n_bytes)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32, shaped as :meth:`shape` says (a new, writable array)."""
        from gguf import dequantize

        tensor = self.tensors[name]
        kind = tensor.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise InvalidInputError(f"{self.path}: tensor {name} is {kind}, which cachemesh does"
                                    f" not dequantize (it takes {', '.join(SUPPORTED_TYPES)})")
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, *_READ_ERRORS) as exc:
            raise InvalidInputError(f"{self.path}: cannot dequantize tensor {name} ({kind}):"
                                    f" {exc}") from None
        shape = self.shape(name)
        # np.array copies: the mapped file is read-only, and torch wants writable memory.
        return np.array(values, dtype=np.float32).reshape(shape)


def open_gguf(path: Path) -> GGUFFile:
    """Open and check a GGUF file; InvalidInputError (naming it) if it is not a sound one."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head != MAGIC:
        raise InvalidInputError(
            f"{path} is not a GGUF file: it starts with {head!r}, not {MAGIC!r}")
    try:
        reader = _Reader(path)
    except _READ_ERRORS as exc:
        raise InvalidInputError(
            f"{path} is not a readable GGUF file ({size} bytes; truncated or corrupt?):"
            f" {type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    gguf = GGUFFile(path, reader)
    for name, tensor in gguf.tensors.items():
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise InvalidInputError(
                f"{path} is truncated: tensor {name} ends at byte {end}, the file has {size}")
    return gguf
