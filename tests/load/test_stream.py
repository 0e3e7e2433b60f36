"""iter_tensors: file order, tensors out before the file has landed, early stop, errors."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from cachemesh.errors import LoadError
from cachemesh.load import iter_tensors, load_state_dict, reader

from .conftest import tensor_bytes, write_raw

PAGE = 4096


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_yields_in_file_order_not_name_order(tmp_path: Path) -> None:
    header = {
        "z_first": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
        "a_last": {"dtype": "U8", "shape": [1], "data_offsets": [3, 4]},
        "m_middle": {"dtype": "U8", "shape": [0], "data_offsets": [2, 2]},
    }
    path = write_raw(tmp_path / "o.safetensors", header, b"\x05\x06\x00\x07")
    assert [(n, t.tolist()) for n, t in iter_tensors(path)] == [
        ("z_first", [5, 6]),
        ("m_middle", []),
        ("a_last", [7]),
    ]


def test_tensors_flow_out_while_later_chunks_are_still_reading(st_file, monkeypatch) -> None:
    tensors = {f"w{i:02d}": torch.full((PAGE // 4,), float(i)) for i in range(12)}
    path = st_file(tensors)
    gate = threading.Event()
    original = reader.FileReader.read

    def slow_after_the_first_chunks(self, start, end, dst):
        if start >= 4 * PAGE:
            gate.wait(10)
        return original(self, start, end, dst)

    monkeypatch.setattr(reader.FileReader, "read", slow_after_the_first_chunks)
    began = time.monotonic()
    with iter_tensors(path, chunk_bytes=PAGE, threads=3) as stream:
        name, first = next(stream)
        waited = time.monotonic() - began
        assert not gate.is_set()
        assert name == "w00" and first.tolist() == tensors["w00"].tolist()
        assert waited < 5  # did not wait for the gated chunks
        gate.set()
        rest = dict(stream)
    assert sorted(rest) == [f"w{i:02d}" for i in range(1, 12)]
    for name, t in rest.items():
        assert torch.equal(t, tensors[name])
    assert stream.stats.tensors == 12


def test_close_early_cancels_and_releases_descriptors(st_file) -> None:
    path = st_file({f"w{i}": torch.randn(4096) for i in range(16)})
    before = open_fds()
    stream = iter_tensors(path, chunk_bytes=PAGE, threads=2)
    next(stream)
    stream.close()
    stream.close()  # idempotent
    assert open_fds() == before
    with pytest.raises(StopIteration):
        next(stream)


def test_a_failed_read_surfaces_as_load_error_and_cleans_up(st_file, monkeypatch) -> None:
    path = st_file({f"w{i}": torch.randn(4096) for i in range(8)})
    original = reader.FileReader.read

    def failing(self, start, end, dst):
        if start >= 6 * PAGE:
            raise LoadError(f"{self.path}: simulated I/O error")
        return original(self, start, end, dst)

    monkeypatch.setattr(reader.FileReader, "read", failing)
    before = open_fds()
    with pytest.raises(LoadError, match="simulated I/O error"):
        load_state_dict(path, chunk_bytes=PAGE)
    assert open_fds() == before


def test_stats_are_complete_after_exhaustion(st_file) -> None:
    tensors = {"a": torch.randn(300, 300), "b": torch.arange(10)}
    path = st_file(tensors)
    stream = iter_tensors(path, dtype=torch.float16)
    out = dict(stream)
    s = stream.stats
    assert s.files == 1 and s.tensors == 2
    assert s.tensor_bytes == 300 * 300 * 4 + 80
    assert s.cast == 1 and out["a"].dtype == torch.float16
    assert s.seconds > 0 and s.gb_per_s > 0


def test_many_files_stream_in_index_order(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    for i in range(5):
        save_file({f"f{i}.w": torch.full((2000,), float(i))}, tmp_path / f"part{i}.safetensors")
    names = [n for n, _ in iter_tensors(tmp_path, chunk_bytes=PAGE, threads=4)]
    assert names == [f"f{i}.w" for i in range(5)]


def test_files_with_only_empty_tensors(tmp_path: Path) -> None:
    header = {"e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}}
    path = write_raw(tmp_path / "empty.safetensors", header, b"")
    ((name, t),) = list(iter_tensors(path))
    assert name == "e" and t.shape == (0, 3) and t.dtype == torch.float32


def test_other_devices_go_through_the_cpu_path(st_file) -> None:
    t = torch.randn(10)
    ((_, out),) = list(iter_tensors(st_file({"w": t}), device="meta"))
    assert out.is_meta and out.shape == (10,)
    assert tensor_bytes(t) == tensor_bytes(load_state_dict(st_file({"w": t}), device="cpu")["w"])
