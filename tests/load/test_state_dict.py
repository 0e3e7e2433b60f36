"""load_state_dict on the CPU: bit-exact against safetensors, views not copies, every read path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import cachemesh
from cachemesh.errors import InvalidInputError, LoadError
from cachemesh.load import load_state_dict

from .conftest import all_dtype_tensors, assert_same, evict, tensor_bytes, write_raw


def reference(path: Path) -> dict[str, torch.Tensor]:
    # Cloned, so that the file is not left mapped (a mapped page cannot be evicted).
    return {k: v.clone() for k, v in load_file(path).items()}


def test_every_dtype_bit_exact(st_file) -> None:
    path = st_file(all_dtype_tensors(), metadata={"format": "pt"})
    sd = load_state_dict(path)
    assert_same(sd, reference(path))
    assert sd.metadata == {"format": "pt"}
    assert sd.stats.copied == 0
    assert sd.stats.tensors == len(sd)
    assert sd.stats.tensor_bytes == sum(t.numel() * t.element_size() for t in sd.values())


def test_float4_is_packed_two_to_an_element(st_file) -> None:
    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("this torch has no float4_e2m1fn_x2")
    packed = torch.randint(0, 256, (3, 4), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    path = st_file({"w": packed})
    sd = load_state_dict(path)
    assert sd["w"].dtype == torch.float4_e2m1fn_x2 and sd["w"].shape == (3, 4)
    assert tensor_bytes(sd["w"]) == tensor_bytes(packed)


def test_float6_has_no_torch_dtype(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / "f6.safetensors",
        {"w": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}},
        bytes(3),
    )
    with pytest.raises(LoadError, match="F6_E2M3.*torch"):
        load_state_dict(path)


@pytest.mark.parametrize("direct_io", [None, True, False])
@pytest.mark.parametrize(("threads", "chunk_bytes"), [(1, None), (3, 4096), (8, 12288)])
def test_read_paths_agree(st_file, direct_io, threads, chunk_bytes) -> None:
    path = st_file(all_dtype_tensors())
    ref = reference(path)
    evict(path)  # cold: the auto mode must read directly
    sd = load_state_dict(path, threads=threads, chunk_bytes=chunk_bytes, direct_io=direct_io)
    assert_same(sd, ref)
    s = sd.stats
    assert s.bytes_read >= s.tensor_bytes
    if direct_io is False:
        assert s.direct_bytes == 0 and s.page_cache_bytes == 0
    if direct_io is True:
        assert s.direct_bytes == s.bytes_read


def _direct_io_works(path: Path) -> bool:
    evict(path)
    return load_state_dict(path).stats.direct_bytes > 0


def test_auto_mode_copies_cached_pages_and_reads_the_rest_directly(st_file) -> None:
    path = st_file({"w": torch.randn(2048, 1024)})  # 8 MiB
    ref = reference(path)
    if not _direct_io_works(path):
        pytest.skip("no O_DIRECT or no page-cache residency here")
    evict(path)
    with open(path, "rb") as f:  # bring 2 MiB in the middle back into the page cache
        f.seek(3 << 20)
        f.read(2 << 20)
    sd = load_state_dict(path, chunk_bytes=4 << 20)
    assert_same(sd, ref)
    assert sd.stats.page_cache_bytes >= 2 << 20
    assert sd.stats.direct_bytes >= 5 << 20


def test_stray_evicted_pages_are_read_through_the_page_cache(st_file) -> None:
    path = st_file({"w": torch.randn(2048, 1024)})
    ref = reference(path)
    if not _direct_io_works(path):
        pytest.skip("no O_DIRECT or no page-cache residency here")
    path.read_bytes()  # all cached
    fd = os.open(path, os.O_RDONLY)
    try:
        for page in range(10, 2000, 97):  # evict single pages here and there
            os.posix_fadvise(fd, page * 4096, 4096, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    sd = load_state_dict(path)
    assert_same(sd, ref)
    assert sd.stats.direct_bytes == 0
    assert sd.stats.page_cache_bytes + sd.stats.buffered_bytes == sd.stats.bytes_read


def test_tensors_are_views_with_storages_of_their_own(st_file) -> None:
    path = st_file({"a": torch.arange(1000, dtype=torch.int32), "b": torch.ones(10, 10)})
    sd = load_state_dict(path)
    for t in sd.values():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    # Views of one buffer: writing one tensor leaves the other alone.
    sd["a"].zero_()
    assert sd["b"].sum().item() == 100.0
    # The buffer outlives the dict while a tensor holds it.
    b = sd["b"]
    del sd
    assert b.sum().item() == 100.0


def test_dtype_casts_floating_tensors_only(st_file) -> None:
    tensors = {
        "f": torch.randn(4, 4),
        "h": torch.randn(3).half(),
        "i": torch.arange(5),
        "q": torch.randn(6).to(torch.float8_e4m3fn),
    }
    sd = load_state_dict(st_file(tensors), dtype="bfloat16")
    assert sd["f"].dtype == torch.bfloat16 and torch.equal(sd["f"], tensors["f"].bfloat16())
    assert sd["h"].dtype == torch.bfloat16
    assert sd["i"].dtype == torch.int64 and sd["q"].dtype == torch.float8_e4m3fn
    assert sd.stats.cast == 2
    with pytest.raises(InvalidInputError):
        load_state_dict(st_file(tensors), dtype="floaty")


def test_misaligned_tensor_is_copied_and_counted(tmp_path: Path) -> None:
    # "b" starts at data offset 3: not a multiple of 4, so it cannot be a float32 view.
    values = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    header = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "F32", "shape": [3], "data_offsets": [3, 15]},
        "c": {"dtype": "I16", "shape": [2], "data_offsets": [16, 20]},
    }
    data = (
        b"\x01\x02\x03"
        + tensor_bytes(values)
        + b"\0"
        + tensor_bytes(torch.tensor([7, -7], dtype=torch.int16))
    )
    path = write_raw(tmp_path / "odd.safetensors", header, data)
    sd = load_state_dict(path)
    assert sd["a"].tolist() == [1, 2, 3]
    assert torch.equal(sd["b"], values)
    assert sd["c"].tolist() == [7, -7]
    assert sd.stats.copied == 1 and sd.stats.copied_names == ["b"]
    assert sd["b"].data_ptr() % 4 == 0


@pytest.mark.parametrize("extra", [1, 4, 5])
def test_misaligned_header_keeps_aligned_tensors_as_views(tmp_path: Path, extra: int) -> None:
    # A header whose length is not a multiple of 8 puts the data section off
    # alignment; the buffer then starts at the data section, so no copies.
    values = torch.arange(6, dtype=torch.float64)
    header = {"d": {"dtype": "F64", "shape": [6], "data_offsets": [0, 48]}}
    path = write_raw(tmp_path / "shifted.safetensors", header, tensor_bytes(values), extra=extra)
    for direct_io in (None, True, False):
        sd = load_state_dict(path, direct_io=direct_io)
        assert torch.equal(sd["d"], values)
        assert sd.stats.copied == 0
        assert sd["d"].data_ptr() % 8 == 0


def test_file_truncated_after_its_header_was_read(st_file) -> None:
    from cachemesh.load import read_checkpoint

    path = st_file({"w": torch.randn(1000)})
    ckpt = read_checkpoint(path)
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(LoadError, match="truncated"):
        load_state_dict(ckpt)


def test_truncated_file_is_refused_before_reading(st_file) -> None:
    path = st_file({"w": torch.randn(1000)})
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(LoadError, match=f"{path.name}: file is truncated: tensor 'w'"):
        load_state_dict(path)


def test_top_level_names_and_lazy_torch(st_file) -> None:
    path = st_file({"w": torch.ones(2)})
    assert cachemesh.load_state_dict(path)["w"].tolist() == [1.0, 1.0]
    for name in ("load_state_dict", "iter_tensors", "load_pretrained"):
        assert name in cachemesh.__all__
    code = "import sys, cachemesh; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bad_arguments(st_file) -> None:
    path = st_file({"w": torch.ones(2)})
    with pytest.raises(LoadError, match="threads"):
        load_state_dict(path, threads=-1)
    with (
        pytest.raises(LoadError, match="CUDA is not available")
        if not torch.cuda.is_available()
        else pytest.raises(RuntimeError)
    ):
        load_state_dict(path, device="cuda:99" if torch.cuda.is_available() else "cuda")


# ---------------------------------------------------------------- property test

DTYPES = [
    "F64",
    "F32",
    "F16",
    "BF16",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "BOOL",
    "U16",
    "U32",
    "U64",
    "F8_E4M3",
    "F8_E5M2",
]
TORCH = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

tensor_spec = st.tuples(
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 9), min_size=0, max_size=3),
    st.integers(0, 9),  # gap before the tensor, in bytes: anything from aligned to odd
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    specs=st.lists(tensor_spec, min_size=1, max_size=8),
    header_extra=st.integers(0, 9),
    chunk_pages=st.integers(1, 3),
    direct_io=st.sampled_from([None, True, False]),
    seed=st.integers(0, 2**16),
)
def test_random_files_load_bit_exact(
    tmp_path: Path, specs, header_extra, chunk_pages, direct_io, seed
) -> None:
    gen = torch.Generator().manual_seed(seed)
    header: dict[str, object] = {}
    data = bytearray()
    expected: dict[str, torch.Tensor] = {}
    misaligned = set()
    for i, (dtype, shape, gap) in enumerate(specs):
        data += bytes(gap)
        t = TORCH[dtype]
        numel = 1
        for d in shape:
            numel *= d
        raw = torch.randint(0, 256, (numel * t.itemsize,), dtype=torch.uint8, generator=gen)
        if t == torch.bool:
            raw &= 1
        begin = len(data)
        data += raw.numpy().tobytes()
        name = f"t{i}"
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, len(data)]}
        expected[name] = raw.view(t).reshape(shape) if numel else torch.empty(shape, dtype=t)
        if numel and begin % t.itemsize:
            misaligned.add(name)
    path = write_raw(tmp_path / f"r{seed}.safetensors", header, bytes(data), extra=header_extra)
    sd = load_state_dict(path, chunk_bytes=chunk_pages * 4096, direct_io=direct_io, threads=3)
    assert_same(sd, expected)
    assert set(sd.stats.copied_names) == misaligned
    for name, t in sd.items():
        if t.numel():
            assert t.data_ptr() % t.element_size() == 0, name
