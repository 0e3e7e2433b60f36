"""Header parsing and validation: every lie a file can tell is a LoadError naming the file."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from cachemesh.errors import LoadError
from cachemesh.load import DTYPES, read_header

from .conftest import write_raw


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_reads_tensors_in_file_order_with_absolute_offsets(tmp_path: Path) -> None:
    header = {
        "__metadata__": {"format": "pt"},
        "b": entry("F32", [2], 8, 16),
        "a": entry("I64", [1], 0, 8),
    }
    path = write_raw(tmp_path / "x.safetensors", header, bytes(16))
    h = read_header(path)
    assert [t.name for t in h.tensors] == ["a", "b"]
    assert h.metadata == {"format": "pt"}
    assert h.tensors[0].start == h.data_start == 8 + h.header_size
    assert h.tensors[1].end == h.data_end == h.file_size
    assert h.nbytes == 16


def test_official_writer_output_parses(st_file) -> None:
    path = st_file({"w": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16)})
    h = read_header(path)
    assert {t.name: (t.dtype, t.shape) for t in h.tensors} == {
        "w": ("F32", (3, 4)),
        "b": ("BF16", (5,)),
    }


def test_dtype_table_sizes() -> None:
    for name, spec in DTYPES.items():
        if spec.torch_name and hasattr(torch, spec.torch_name):
            dtype = getattr(torch, spec.torch_name)
            assert dtype.itemsize * 8 == spec.bits * spec.per_element, name


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "too short"),
        (b"\x01\x02\x03", "too short"),
        (struct.pack("<Q", 200_000_000) + b"{}", "exceeds"),
        (struct.pack("<Q", 64) + b"{}", "past the end"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid UTF-8 JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (struct.pack("<Q", 3) + b"{1}", "not valid UTF-8 JSON"),
    ],
)
def test_broken_headers(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(LoadError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"a": entry("F99", [1], 0, 4)}, "unknown dtype 'F99'"),
        ({"a": {"shape": [1], "data_offsets": [0, 4]}}, "missing or invalid dtype"),
        ({"a": entry("F32", [-1], 0, 4)}, "shape must be"),
        ({"a": entry("F32", [True], 0, 4)}, "shape must be"),
        ({"a": entry("F32", "1", 0, 4)}, "shape must be"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "data_offsets must be"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, "data_offsets must be"),
        ({"a": entry("F32", [2], 0, 4)}, "header lies about offsets"),
        ({"a": entry("F32", [1], 0, 8)}, "header lies about offsets"),
        ({"a": entry("F4", [3], 0, 2)}, "header lies about offsets"),
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, "overlap"),
        ({"a": entry("F32", [4], 0, 16)}, "file is truncated"),
        ({"a": entry("F32", [1], 0, 4), "__metadata__": {"k": 1}}, "__metadata__"),
        ({"a": 3}, "not an object"),
    ],
)
def test_lying_headers(tmp_path: Path, header: dict, message: str) -> None:
    path = write_raw(tmp_path / "liar.safetensors", header, bytes(12))
    with pytest.raises(LoadError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    one = b'{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    raw = b'{"a":' + one + b',"a":' + one + b"}"
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0")
    with pytest.raises(LoadError, match="duplicate key 'a'"):
        read_header(path)


def test_empty_tensors_may_share_offsets_and_gaps_are_tolerated(tmp_path: Path) -> None:
    header = {
        "e1": entry("F32", [0], 4, 4),
        "a": entry("F32", [1], 0, 4),
        "e2": entry("BF16", [0, 3], 4, 4),
        "b": entry("U8", [2], 10, 12),  # a gap of 6 bytes before it
    }
    path = write_raw(tmp_path / "ok.safetensors", header, bytes(16))  # and 4 trailing bytes
    h = read_header(path)
    assert [t.name for t in h.tensors] == ["a", "e1", "e2", "b"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="cannot read"):
        read_header(tmp_path / "nope.safetensors")
