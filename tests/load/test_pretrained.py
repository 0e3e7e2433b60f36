"""load_pretrained gives the same model as from_pretrained, without random weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cachemesh.errors import LoadError
from cachemesh.load import load_pretrained
from cachemesh.load.pretrained import key_mapper, parameters_on_meta

transformers = pytest.importorskip("transformers")


def logits(model: torch.nn.Module, vocab: int = 96) -> torch.Tensor:
    ids = torch.arange(12).reshape(2, 6) % vocab
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["llama", "llama-tied", "gpt2", "bert", "llama-sharded"])
def test_same_logits_as_from_pretrained(tiny_models, name) -> None:
    path = tiny_models[name]
    ref = (
        transformers.AutoModelForCausalLM.from_pretrained(path)
        if name != "bert"
        else (transformers.BertForMaskedLM.from_pretrained(path))
    )
    ours = load_pretrained(path)
    assert type(ours) is type(ref)
    assert not ours.training
    assert torch.equal(logits(ours), logits(ref))
    # Every parameter and buffer is real and equal, the recomputed buffers included.
    ref_state = dict(ref.named_buffers()) | dict(ref.named_parameters())
    for key, value in list(ours.named_parameters()) + list(ours.named_buffers()):
        assert not value.is_meta, key
        assert torch.equal(value, ref_state[key]), key


def test_tied_weights_share_one_tensor(tiny_models) -> None:
    for name in ("llama-tied", "gpt2"):
        model = load_pretrained(tiny_models[name])
        assert model.lm_head.weight is model.get_input_embeddings().weight
    untied = load_pretrained(tiny_models["llama"])
    assert untied.lm_head.weight is not untied.get_input_embeddings().weight


def test_rotary_buffers_are_recomputed_not_left_on_meta(tiny_models) -> None:
    model = load_pretrained(tiny_models["llama"])
    inv_freq = model.model.rotary_emb.inv_freq
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    base = (
        config.rope_parameters["rope_theta"]
        if hasattr(config, "rope_parameters")
        else config.rope_theta
    )
    expected = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    assert torch.allclose(inv_freq, expected)


def test_auto_class_and_dtype(tiny_models) -> None:
    path = tiny_models["llama"]
    model = load_pretrained(path, transformers.AutoModelForCausalLM, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert torch.equal(logits(model), logits(ref))
    base = load_pretrained(path, "LlamaModel")
    assert type(base).__name__ == "LlamaModel"  # keys lose the "model." prefix
    ref_base = transformers.LlamaModel.from_pretrained(path)
    ids = torch.arange(6).reshape(1, 6)
    with torch.no_grad():
        assert torch.equal(
            base(input_ids=ids).last_hidden_state, ref_base(input_ids=ids).last_hidden_state
        )


def test_bf16_checkpoint_loads_in_its_own_dtype(tmp_path, tiny_models) -> None:
    path = tmp_path / "bf16"
    src = load_pretrained(tiny_models["gpt2"], dtype="bfloat16")
    src.save_pretrained(path)
    model = load_pretrained(path)
    assert model.dtype == torch.bfloat16
    ref = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert ref.dtype == torch.bfloat16
    assert torch.equal(logits(model), logits(ref))


def test_base_checkpoint_into_a_model_with_a_head_fails_loudly(tmp_path, tiny_models) -> None:
    # The head is not in the checkpoint: from_pretrained would initialise it at
    # random; a serving loader must not.
    base = transformers.LlamaModel.from_pretrained(tiny_models["llama"])
    base.save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="no weights for lm_head.weight"):
        load_pretrained(tmp_path / "base")


def test_wrong_shape_and_missing_config(tmp_path, tiny_models) -> None:
    path = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 48
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="has shape"):
        load_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(LoadError, match="model config"):
        load_pretrained(path)
    with pytest.raises(LoadError, match="model directory"):
        load_pretrained(path / "model.safetensors")


def test_parameters_on_meta_only_in_its_thread_and_block() -> None:
    import threading

    seen = {}

    def other_thread() -> None:
        seen["other"] = torch.nn.Linear(2, 2).weight.device.type

    with parameters_on_meta():
        layer = torch.nn.Linear(2, 2)
        layer.register_buffer("b", torch.ones(1))
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert layer.weight.is_meta and not layer.b.is_meta
    assert seen["other"] == "cpu"
    assert not torch.nn.Linear(2, 2).weight.is_meta


def test_key_mapper_adds_or_strips_the_prefix() -> None:
    expected = {"model.a": 0, "model.b": 0, "lm_head.weight": 0}
    add = key_mapper(["a", "b", "lm_head.weight"], expected, "model")
    assert [add(n) for n in ["a", "b", "lm_head.weight"]] == [
        "model.a",
        "model.b",
        "lm_head.weight",
    ]
    strip = key_mapper(["model.a", "model.b"], {"a": 0, "b": 0}, "model")
    assert strip("model.a") == "a"
    same = key_mapper(["model.a"], expected, "model")
    assert same("model.a") == "model.a"
