"""Reads started ahead of a load (load/prefetch.py), and the load that adopts them."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from cachemesh.load import iter_tensors, load_state_dict, prefetch
from cachemesh.load.pretrained import parameters_on_meta

from .conftest import assert_same

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _no_leftovers():
    yield
    prefetch.discard_all()


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A llama whose embeddings are 16 MB each: large enough to be seen in RSS, and
    past load_pretrained's threshold for making torch.empty on the meta device."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=16384, hidden_size=256, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("wide") / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    from tests.convert.models import train_tokenizer

    train_tokenizer().save_pretrained(path)
    return path


def test_a_stream_adopts_the_prefetch_and_yields_the_same_tensors(tiny_models) -> None:
    path = tiny_models["llama-sharded"]
    reference = load_state_dict(path)
    started = prefetch.start(path)
    assert started is not None and prefetch.waiting() == [started]
    assert prefetch.start(path) is None  # one prefetch per checkpoint
    with iter_tensors(path) as stream:
        got = dict(stream)
    assert stream.stats.prefetched
    assert prefetch.waiting() == []
    assert_same(got, reference)
    # The next load reads by itself.
    with iter_tensors(path) as again:
        assert_same(dict(again), reference)
    assert not again.stats.prefetched


def test_explicit_read_options_do_not_adopt(tiny_models) -> None:
    path = tiny_models["llama"]
    prefetch.start(path)
    with iter_tensors(path, direct_io=False) as stream:
        dict(stream)
    assert not stream.stats.prefetched
    assert len(prefetch.waiting()) == 1


def test_an_unclaimed_prefetch_is_dropped_after_its_ttl(tiny_models) -> None:
    started = prefetch.start(tiny_models["llama"], ttl_s=0.05)
    assert started is not None
    deadline = time.monotonic() + 5
    while prefetch.waiting() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert prefetch.waiting() == []
    assert started.buffers == []  # its memory went back


def test_nothing_to_prefetch_without_safetensors(tmp_path) -> None:
    (tmp_path / "model.joblib").write_bytes(b"x")
    assert prefetch.start(tmp_path) is None
    assert prefetch.start(tmp_path / "missing") is None


def test_resident_bytes_cover_the_read_checkpoint(wide_llama) -> None:
    started = prefetch.start(wide_llama)
    for _, future in started.pending:
        future.result()
    nbytes = started.checkpoint.nbytes
    assert nbytes * 0.95 <= started.resident_bytes() <= nbytes + 2 * 1024 * 1024


def test_worker_counts_the_adopted_prefetch_in_the_model_size(wide_llama) -> None:
    """The prefetched bytes are in the worker's RSS before the load: they are still
    the model's size, not the worker's base."""
    from cachemesh.runtimes.base import ModelSettings
    from cachemesh.serve.workers.messages import Load, Preload
    from cachemesh.serve.workers.worker import Worker, read_weights_ahead

    a, b = socket.socketpair()
    try:
        worker = Worker(a)
        worker.preload(Preload("transformers"))
        read_weights_ahead([str(wide_llama)])
        for _, future in prefetch.waiting()[0].pending:
            future.result()  # all of it in the RSS before the load starts
        reply = worker.load(Load("m", "transformers",
                                 ModelSettings("m", wide_llama, parameters={"task": "generate"})))
        model = worker.models["m"]
        assert prefetch.waiting() == []
        nbytes = sum(p.numel() * p.element_size() for p in model.model.parameters())
        assert reply.size >= 0.9 * nbytes
    finally:
        a.close()
        b.close()


def test_large_empty_tensors_are_made_on_meta_only_while_building() -> None:
    seen: dict[str, torch.Tensor] = {}

    def other_thread() -> None:
        seen["other"] = torch.empty(1024, 1024)

    with parameters_on_meta():
        large, small = torch.empty(1024, 1024), torch.empty(4)
        on_device = torch.empty(1024, 1024, device="cpu")
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert large.is_meta
    assert not small.is_meta and not on_device.is_meta and not seen["other"].is_meta
    assert not torch.empty(1024, 1024).is_meta


def test_wide_model_loads_as_from_pretrained(wide_llama) -> None:
    from cachemesh.load import load_pretrained

    ref = transformers.AutoModelForCausalLM.from_pretrained(wide_llama)
    ours = load_pretrained(wide_llama)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert not any(p.is_meta for p in ours.parameters())
