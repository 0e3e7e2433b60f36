"""Tensor-parallel pre-splitting, checked by a simulated tensor-parallel forward pass.

For layer 0 of a tiny random Llama (with grouped-query attention), GPT-2 and
BLOOM model, the attention block and the MLP block are computed over the N
rank directories the splitter wrote, the way N GPUs would: each rank runs its
column-split matmuls on its own heads / hidden slice, then its row-split
matmul gives a partial output; the partials are summed (the all-reduce) and a
row-parallel bias is added once. The sum must match the unsharded
transformers module's output, captured with forward hooks during a real
forward pass of the whole model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from cachemesh.caches import Caches
from cachemesh.convert import Conversions, make_options, read_manifest
from cachemesh.convert import tp as tpmod

ATOL = 1e-5


def load_rank(view, rank: int) -> dict[str, torch.Tensor]:
    out = {}
    rank_dir = view / f"rank-{rank}"
    for file in sorted(rank_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            assert f.metadata()["tp_rank"] == str(rank)
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def capture(model, attn, mlp, ids: torch.Tensor) -> dict[str, tuple]:
    """Inputs (args, kwargs) and outputs of two submodules during model(ids)."""
    seen: dict[str, tuple] = {}

    def hook(name):
        def fn(module, args, kwargs, output):
            seen[name] = (args, kwargs, output)
        return fn

    handles = [attn.register_forward_hook(hook("attn"), with_kwargs=True),
               mlp.register_forward_hook(hook("mlp"), with_kwargs=True)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def causal(t: int) -> torch.Tensor:
    return torch.full((t, t), float("-inf")).triu(1)


def attention(q, k, v, scale, bias=None):
    """q, k, v: [batch, heads, seq, dim]; softmax over keys with a causal mask."""
    scores = q @ k.transpose(-1, -2) * scale + causal(q.shape[-2])
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, dim=-1) @ v


def merge(x):  # [b, h, t, d] -> [b, t, h*d]
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def heads(x, n, d):  # [b, t, n*d] -> [b, n, t, d]
    b, t, _ = x.shape
    return x.view(b, t, n, d).transpose(1, 2)


# -- Llama ------------------------------------------------------------------------

def llama_rank_attention(w, p, x, cos, sin, cfg, n):
    d = cfg.hidden_size // cfg.num_attention_heads
    nh, nkv = cfg.num_attention_heads // n, cfg.num_key_value_heads // n
    q = heads(F.linear(x, w[p + "q_proj.weight"]), nh, d)
    k = heads(F.linear(x, w[p + "k_proj.weight"]), nkv, d)
    v = heads(F.linear(x, w[p + "v_proj.weight"]), nkv, d)

    def rope(t):
        half = t.shape[-1] // 2
        rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
        return t * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)

    q, k = rope(q), rope(k)
    group = nh // nkv
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.linear(merge(attention(q, k, v, d ** -0.5)), w[p + "o_proj.weight"])


def llama_rank_mlp(w, p, x):
    h = F.silu(F.linear(x, w[p + "gate_proj.weight"])) * F.linear(x, w[p + "up_proj.weight"])
    return F.linear(h, w[p + "down_proj.weight"])


def check_llama(model, ranks, ids, n):
    cfg = model.config
    layer = model.model.layers[0]
    seen = capture(model, layer.self_attn, layer.mlp, ids)
    args, kwargs, out = seen["attn"]
    x = kwargs.get("hidden_states", args[0] if args else None)
    cos, sin = kwargs["position_embeddings"]
    attn = sum(llama_rank_attention(w, "model.layers.0.self_attn.", x, cos, sin, cfg, n)
               for w in ranks)
    torch.testing.assert_close(attn, out[0], atol=ATOL, rtol=1e-4)
    args, kwargs, out = seen["mlp"]
    x = args[0]
    mlp = sum(llama_rank_mlp(w, "model.layers.0.mlp.", x) for w in ranks)
    torch.testing.assert_close(mlp, out, atol=ATOL, rtol=1e-4)


# -- GPT-2 (Conv1D: x @ W + b, W is [in, out]; c_attn packs [q | k | v]) ----------

def gpt2_rank_attention(w, p, x, cfg, n):
    nh, d = cfg.n_head // n, cfg.n_embd // cfg.n_head
    qkv = x @ w[p + "c_attn.weight"] + w[p + "c_attn.bias"]
    q, k, v = (heads(t, nh, d) for t in qkv.split(nh * d, dim=-1))
    return merge(attention(q, k, v, d ** -0.5)) @ w[p + "c_proj.weight"]


def gpt2_rank_mlp(w, p, x):
    h = F.gelu(x @ w[p + "c_fc.weight"] + w[p + "c_fc.bias"], approximate="tanh")
    return h @ w[p + "c_proj.weight"]


def check_gpt2(model, ranks, ids, n):
    cfg = model.config
    block = model.transformer.h[0]
    seen = capture(model, block.attn, block.mlp, ids)
    p = "transformer.h.0."
    args, kwargs, out = seen["attn"]
    x = kwargs.get("hidden_states", args[0] if args else None)
    attn = sum(gpt2_rank_attention(w, p + "attn.", x, cfg, n) for w in ranks)
    attn = attn + ranks[0][p + "attn.c_proj.bias"]  # row bias: once, after the sum
    torch.testing.assert_close(attn, out[0], atol=ATOL, rtol=1e-4)
    args, kwargs, out = seen["mlp"]
    x = kwargs.get("hidden_states", args[0] if args else None)
    mlp = sum(gpt2_rank_mlp(w, p + "mlp.", x) for w in ranks) + ranks[0][p + "mlp.c_proj.bias"]
    torch.testing.assert_close(mlp, out, atol=ATOL, rtol=1e-4)


# -- BLOOM (fused query_key_value laid out per head; ALiBi; residual added inside) --

def bloom_rank_attention(w, p, x, alibi, rank, cfg, n):
    nh, d = cfg.n_head // n, cfg.hidden_size // cfg.n_head
    b, t, _ = x.shape
    fused = F.linear(x, w[p + "query_key_value.weight"], w[p + "query_key_value.bias"])
    fused = fused.view(b, t, nh, 3, d)
    q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
    # ALiBi slopes of this rank's heads only.
    bias = alibi.view(b, cfg.n_head, 1, -1)[:, rank * nh:(rank + 1) * nh]
    return F.linear(merge(attention(q, k, v, 1 / math.sqrt(d), bias)), w[p + "dense.weight"])


def bloom_rank_mlp(w, p, x):
    h = F.gelu(F.linear(x, w[p + "dense_h_to_4h.weight"], w[p + "dense_h_to_4h.bias"]),
               approximate="tanh")
    return F.linear(h, w[p + "dense_4h_to_h.weight"])


def check_bloom(model, ranks, ids, n):
    cfg = model.config
    block = model.transformer.h[0]
    seen = capture(model, block.self_attention, block.mlp, ids)
    p = "transformer.h.0."
    args, kwargs, out = seen["attn"]
    names = ["hidden_states", "residual", "alibi"]
    given = {**dict(zip(names, args, strict=False)), **kwargs}
    x, residual, alibi = given["hidden_states"], given["residual"], given["alibi"]
    attn = sum(bloom_rank_attention(w, p + "self_attention.", x, alibi, r, cfg, n)
               for r, w in enumerate(ranks))
    attn = attn + ranks[0][p + "self_attention.dense.bias"] + residual
    torch.testing.assert_close(attn, out[0], atol=ATOL, rtol=1e-4)
    args, kwargs, out = seen["mlp"]
    given = {**dict(zip(["hidden_states", "residual"], args, strict=False)), **kwargs}
    mlp = sum(bloom_rank_mlp(w, p + "mlp.", given["hidden_states"]) for w in ranks)
    mlp = mlp + ranks[0][p + "mlp.dense_4h_to_h.bias"] + given["residual"]
    torch.testing.assert_close(mlp, out, atol=ATOL, rtol=1e-4)


CHECKS = {"llama": check_llama, "gpt2": check_gpt2, "bloom": check_bloom}


@pytest.mark.parametrize("arch, n", [("llama", 2), ("gpt2", 2), ("gpt2", 4), ("bloom", 2),
                                     ("bloom", 4)])
def test_sharded_layer_matches_the_unsharded_model(caches: Caches, request, arch, n):
    origin, model, _ = request.getfixturevalue(arch)
    result = Conversions(caches).convert(str(origin), make_options("safetensors", tp=n))
    manifest = read_manifest(result.view)
    plan = manifest["runtime"]["tensors"]
    assert manifest["runtime"]["tp_size"] == n
    ranks = [load_rank(result.view, r) for r in range(n)]
    full = model.state_dict()

    for name, split in plan.items():
        for w in ranks:
            assert name in w
            if split["split"] == "replicate":
                assert torch.equal(w[name], full[name]), name
            else:
                shape = list(full[name].shape)
                shape[split["dim"]] //= n
                assert list(w[name].shape) == shape, name
        if split["split"] != "replicate":
            # The ranks' slices together hold exactly the original's bytes.
            total = sum(w[name].numel() for w in ranks)
            assert total == full[name].numel()
    # Rank directories are self-contained and hold only their own tensors.
    for r in range(n):
        files = sorted(p.name for p in (result.view / f"rank-{r}").iterdir())
        assert "config.json" in files and "tokenizer.json" in files
        assert files.count("model.safetensors") == 1

    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 12, 60]])
    CHECKS[arch](model, ranks, ids, n)


def test_llama_column_and_row_roles(caches: Caches, llama):
    origin, _, _ = llama
    result = Conversions(caches).convert(str(origin), make_options("safetensors", tp=2))
    plan = read_manifest(result.view)["runtime"]["tensors"]
    p = "model.layers.0."
    assert plan[p + "self_attn.q_proj.weight"] == {"split": "column", "dim": 0}
    assert plan[p + "self_attn.o_proj.weight"] == {"split": "row", "dim": 1}
    assert plan[p + "mlp.down_proj.weight"] == {"split": "row", "dim": 1}
    assert plan[p + "input_layernorm.weight"] == {"split": "replicate"}
    assert plan["model.embed_tokens.weight"] == {"split": "replicate"}


def test_large_ranks_are_written_in_indexed_shards(caches: Caches, gpt2, monkeypatch):
    origin, _, _ = gpt2
    monkeypatch.setattr(tpmod, "SHARD_BYTES", 64 * 1024)
    result = Conversions(caches).convert(str(origin), make_options("safetensors", tp=2))
    rank0 = result.view / "rank-0"
    index = json.loads((rank0 / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((rank0 / s).is_file() for s in shards)
    assert not (rank0 / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(load_rank(result.view, 0))
