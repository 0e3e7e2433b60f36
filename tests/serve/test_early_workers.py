"""Workers started before the server's web stack (``cachemesh serve``): they import
the frameworks of the local models they are told about, before any request."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cachemesh.serve.core.registry import parse_model_option
from cachemesh.serve.workers.workers import launch, local_models


def test_local_models_are_the_local_directories(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    specs = [parse_model_option(f"a={tmp_path / 'a'},runtime=transformers"),
             parse_model_option(f"b=file://{tmp_path / 'b'}"),
             parse_model_option("c=hf://org/name"),
             parse_model_option(f"d={tmp_path / 'missing'}")]
    assert local_models(specs) == [
        {"path": str(tmp_path / "a"), "runtime": "transformers"},
        {"path": str(tmp_path / "b"), "runtime": ""}]


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def test_a_warm_worker_imports_torch_before_any_request(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    cold = launch(memory_limit=None, threads=1)
    warm = launch(memory_limit=None, threads=1, warm=[{"path": str(tmp_path / "llama")}])
    try:
        deadline = time.monotonic() + 60
        while "libtorch" not in _maps(warm.proc.pid):
            assert warm.proc.poll() is None, "the warm worker exited"
            assert time.monotonic() < deadline, "the warm worker never imported torch"
            time.sleep(0.05)
        # Told nothing, a worker imports no framework by itself.
        assert "libtorch" not in _maps(cold.proc.pid)
    finally:
        for w in (cold, warm):
            w.sock.close()  # the worker exits on EOF
            w.proc.wait(30)
