"""The CUDA path: pinned staging buffers, asynchronous copies, events. Skipped without a GPU.

Run on a GPU machine with: ``python -m pytest tests/load/test_cuda.py -m gpu -v``
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cachemesh.load import iter_tensors, load_pretrained, load_state_dict

from .conftest import all_dtype_tensors, assert_same, evict, tensor_bytes, write_raw

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("direct_io", [None, False])
def test_every_dtype_lands_on_the_gpu_bit_exact(st_file, direct_io) -> None:
    path = st_file(all_dtype_tensors())
    cpu = load_state_dict(path)
    evict(path)
    gpu = load_state_dict(path, device="cuda", direct_io=direct_io)
    for t in gpu.values():
        assert t.device.type == "cuda"
    assert_same(gpu, cpu)
    assert gpu.stats.copied == 0


def test_staging_buffers_are_reused_many_times(st_file) -> None:
    # 4 KiB chunks through threads + 2 = 4 staging buffers: each reused ~100 times.
    tensors = {f"w{i}": torch.randn(1000 + i) for i in range(100)}
    path = st_file(tensors)
    out = dict(iter_tensors(path, device="cuda", chunk_bytes=4096, threads=2))
    torch.cuda.synchronize()
    assert_same(out, tensors)


def test_tensors_are_ready_on_the_consumers_stream(st_file) -> None:
    tensors = {f"w{i}": torch.full((256 * 1024,), float(i)) for i in range(8)}
    path = st_file(tensors)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        # No host synchronisation: the stream's wait on the copy events must suffice.
        sums = {name: t.sum() for name, t in iter_tensors(path, device="cuda", chunk_bytes=1 << 20)}
    side.synchronize()
    for i in range(8):
        assert sums[f"w{i}"].item() == float(i) * 256 * 1024


def test_misaligned_and_cast_on_the_gpu(tmp_path: Path) -> None:
    values = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    header = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "F32", "shape": [3], "data_offsets": [3, 15]},
    }
    path = write_raw(tmp_path / "odd.safetensors", header, b"\x01\x02\x03" + tensor_bytes(values))
    sd = load_state_dict(path, device="cuda:0", dtype=torch.bfloat16)
    assert sd.stats.copied == 1 and sd.stats.cast == 1
    assert sd["b"].dtype == torch.bfloat16 and torch.equal(sd["b"].cpu(), values.bfloat16())
    assert sd["a"].cpu().tolist() == [1, 2, 3]


def test_load_pretrained_on_the_gpu(tiny_models) -> None:
    import transformers

    path = tiny_models["llama"]
    ours = load_pretrained(path, device="cuda")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).to("cuda")
    for (name, a), (_, b) in zip(
        sorted(ours.state_dict().items()), sorted(ref.state_dict().items()), strict=True
    ):
        assert a.device.type == "cuda", name
        assert torch.equal(a, b), name
    ids = torch.arange(12, device="cuda").reshape(2, 6)
    with torch.no_grad():
        assert torch.allclose(
            ours(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=0
        )
