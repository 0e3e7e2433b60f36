"""GGUF in: a plain Hugging Face model folder out (``--to safetensors`` of a ``.gguf``).

Every tensor is dequantized (gguf_file.py says which ggml types) to float32 and
stored as ``--dtype`` (float32 by default, or bfloat16 / float16), renamed to
transformers' names, with the model's config, tokenizer (gguf_tokenizer.py) and
generation settings beside it::

    config.json               transformers' config for the architecture (LlamaConfig, …)
    model.safetensors         the weights (shards + index past 2 GiB: shards.py)
    tokenizer.json            the rebuilt tokenizer
    tokenizer_config.json     special tokens, BOS/EOS rules and the chat template
    generation_config.json    bos / eos (and end-of-turn) / pad token ids
    cachemesh-convert.json    the manifest; runtime.engine is "transformers"

Any runtime that reads Hugging Face folders loads it, and ``--to ct2`` (or
``--tp N``) from a GGUF goes through it: service.py converts the GGUF here
first, a cached result of its own, then converts that folder.

Rotary embeddings and the Q/K rows. transformers' Llama rotates each head's
vector by halves (dimension i pairs with i + d/2); ggml's default rope, used
for Llama-family GGUFs, pairs neighbours (2i with 2i + 1). llama.cpp's
converter therefore reorders the rows of ``q_proj`` and ``k_proj`` inside each
head so that its pairing computes the same rotation: within a head of d rows it
takes row ``h`` of the first half and row ``h`` of the second half and puts them
side by side (GGUF row ``2h`` is HF row ``h``, GGUF row ``2h + 1`` is HF row
``h + d/2``). :func:`unpermute_rows` puts them back. Architectures whose GGUF
uses ggml's NEOX rope (pairs by halves, as HF does: Qwen2) were not reordered,
and are not reordered back.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf as _gguf  # noqa: F401  (imported here so a missing package says "install [gguf]")

from ..errors import InvalidInputError
from .base import (
    GGUF_DTYPES,
    Converter,
    ConvertOptions,
    ModelFacts,
    ModelInput,
    dist_versions,
    gguf_file,
)
from .gguf_file import SUPPORTED_TYPES, GGUFFile, open_gguf
from .gguf_tokenizer import GGUFTokenizer, check_tokenizer, read_tokenizer

if TYPE_CHECKING:
    import numpy as np

    from ..jobs import JobRun

@dataclass(frozen=True)
class Architecture:
    """How one ``general.architecture`` maps to transformers."""

    model_type: str  # transformers' model_type
    model_class: str  # its causal-LM class, for config.architectures
    permuted_qk: bool  # llama.cpp reordered q/k rows for ggml's pairwise rope


ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", permuted_qk=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", permuted_qk=False),
}
# GGUF tensor names (llama.cpp's) -> transformers' names. Block tensors are
# "blk.{i}.{name}.{weight|bias}".
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)$")


def hf_name(name: str, layers: int) -> str | None:
    """The transformers name of a GGUF tensor; None for one with no counterpart."""
    found = _NAME.match(name)
    if found is None:
        return None
    block, base, kind = found.groups()
    if block is None:
        target = _TOP.get(base)
        return None if target is None else f"{target}.{kind}"
    if int(block) >= layers or base not in _BLOCK:
        return None
    return f"model.layers.{int(block)}.{_BLOCK[base]}.{kind}"


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (see the module docstring): within each head of
    d rows, interleaved pairs (h of the first half, h of the second) back to halves."""
    rows = w.shape[0]
    if rows % (2 * heads):
        raise InvalidInputError(f"a q/k tensor of {rows} rows does not split into {heads}"
                                " heads of an even size")
    d = rows // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class ModelShape:
    """The hyper-parameters read from ``{arch}.*`` metadata."""

    arch: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    context: int
    head_dim: int
    rms_eps: float
    rope_theta: float

    @classmethod
    def read(cls, gguf: GGUFFile) -> ModelShape:
        a = gguf.architecture
        heads = gguf.integer(f"{a}.attention.head_count")
        hidden = gguf.integer(f"{a}.embedding_length")
        if not heads or hidden % heads:
            raise InvalidInputError(f"{gguf.path}: {heads} attention heads do not divide the"
                                    f" embedding length {hidden}")
        head_dim = gguf.integer(f"{a}.attention.key_length", hidden // heads)
        rope_dims = gguf.integer(f"{a}.rope.dimension_count", head_dim)
        if rope_dims != head_dim:
            raise InvalidInputError(f"{gguf.path}: rotary embeddings over {rope_dims} of"
                                    f" {head_dim} head dimensions are not supported")
        scaling = gguf.get(f"{a}.rope.scaling.type")
        if scaling not in (None, "none"):
            raise InvalidInputError(f"{gguf.path}: rope scaling {scaling!r} is not supported")
        kv_heads = gguf.integer(f"{a}.attention.head_count_kv", heads)
        if not kv_heads or heads % kv_heads:
            raise InvalidInputError(f"{gguf.path}: {kv_heads} key/value heads do not divide"
                                    f" {heads} attention heads")
        eps = gguf.get(f"{a}.attention.layer_norm_rms_epsilon")
        theta = gguf.get(f"{a}.rope.freq_base", 10000.0)
        if not isinstance(eps, float) or not isinstance(theta, int | float):
            raise InvalidInputError(f"{gguf.path}: the GGUF metadata lacks {a}.attention."
                                    "layer_norm_rms_epsilon or has a bad rope.freq_base")
        return cls(arch=a, layers=gguf.integer(f"{a}.block_count"), hidden=hidden,
                   intermediate=gguf.integer(f"{a}.feed_forward_length"), heads=heads,
                   kv_heads=kv_heads, context=gguf.integer(f"{a}.context_length"),
                   head_dim=head_dim, rms_eps=eps, rope_theta=float(theta))


def inspect_gguf(gguf: GGUFFile) -> tuple[Architecture, ModelShape, dict[str, str]]:
    """Refuse what cannot be converted; else (architecture, shape, GGUF -> HF names)."""
    arch = ARCHITECTURES.get(gguf.architecture)
    if arch is None:
        raise InvalidInputError(
            f"{gguf.path}: architecture {gguf.architecture!r} is not one cachemesh converts"
            f" (it converts: {', '.join(sorted(ARCHITECTURES))})")
    shape = ModelShape.read(gguf)
    bad = gguf.unsupported()
    if bad:
        kinds = sorted(set(bad.values()))
        raise InvalidInputError(
            f"{gguf.path}: {len(bad)} tensor(s) of type {', '.join(kinds)} (e.g."
            f" {next(iter(bad))}); cachemesh dequantizes {', '.join(SUPPORTED_TYPES)}")
    names: dict[str, str] = {}
    unknown = []
    for name in gguf.tensors:
        target = hf_name(name, shape.layers)
        if target is None:
            unknown.append(name)
        else:
            names[name] = target
    if unknown:
        raise InvalidInputError(
            f"{gguf.path}: tensor(s) with no transformers counterpart: {', '.join(unknown[:5])}")
    if "model.embed_tokens.weight" not in names.values():
        raise InvalidInputError(f"{gguf.path} has no token_embd.weight")
    check_tokenizer(gguf)
    rows = gguf.shape("token_embd.weight")[0]
    if gguf.count("tokenizer.ggml.tokens") > rows:
        raise InvalidInputError(
            f"{gguf.path}: the tokenizer has {gguf.count('tokenizer.ggml.tokens')} tokens, the"
            f" embedding {rows} rows")
    return arch, shape, names


def hf_config(arch: Architecture, shape: ModelShape, vocab_size: int, tied: bool,
              bias: bool, tokens: GGUFTokenizer) -> Any:
    """transformers' config for the model (its class: its defaults, its format)."""
    from transformers import AutoConfig

    fields: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
        "max_position_embeddings": shape.context, "rms_norm_eps": shape.rms_eps,
        "rope_theta": shape.rope_theta, "tie_word_embeddings": tied,
        "bos_token_id": tokens.bos_id,
        "eos_token_id": tokens.eos_ids[0] if tokens.eos_ids else None,
        "pad_token_id": tokens.pad_id, "hidden_act": "silu",
    }
    if arch.model_type == "llama":
        fields.update(head_dim=shape.head_dim, attention_bias=bias, mlp_bias=False)
    config = AutoConfig.for_model(arch.model_type, **fields)
    config.architectures = [arch.model_class]
    return config


def check_shapes(gguf: GGUFFile, names: dict[str, str], config: Any) -> None:
    """Every tensor must be one the model has, of the shape it has, and none may be
    missing: the folder must load. Checked on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(config).state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    given = {hf: gguf_name for gguf_name, hf in names.items()}
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        raise InvalidInputError(f"{gguf.path}: tensors do not match a {config.model_type} model:"
                                f" missing {missing[:3]}, unexpected {extra[:3]}")
    for hf, tensor in expected.items():
        if tuple(tensor.shape) != gguf.shape(given[hf]):
            raise InvalidInputError(
                f"{gguf.path}: tensor {given[hf]} has shape {list(gguf.shape(given[hf]))}; the"
                f" model described by its metadata needs {list(tensor.shape)} ({hf})")


def transformers_major() -> int:
    from transformers import __version__

    return int(__version__.split(".")[0])


class GGUFConverter(Converter):
    target = "safetensors"
    name = "cachemesh-gguf"
    revision = 1

    def __init__(self) -> None:
        self._opened: GGUFFile | None = None  # check() opens it, convert() reuses it

    def _open(self, path: Path) -> GGUFFile:
        if self._opened is None or self._opened.path != path:
            self._opened = open_gguf(path)
        return self._opened

    def versions(self, model: ModelInput) -> dict[str, str]:
        # gguf dequantizes; torch casts and safetensors writes; tokenizers and
        # transformers write tokenizer.json and config.json.
        return dist_versions("gguf", "numpy", "torch", "safetensors", "tokenizers",
                             "transformers")

    def check_options(self, options: ConvertOptions) -> None:
        if options.quantization is not None:
            raise InvalidInputError("--to safetensors from a GGUF takes --dtype (float32,"
                                    " bfloat16, float16), not --quantization")
        if options.tp is not None:
            raise InvalidInputError("the GGUF step takes no --tp (service.py splits after it)")
        if options.dtype is not None and options.dtype not in GGUF_DTYPES:
            raise InvalidInputError(f"--dtype must be one of {', '.join(GGUF_DTYPES)}")

    def check(self, model: ModelInput, options: ConvertOptions) -> ModelFacts:
        path = gguf_file(model)
        if path is None:
            raise InvalidInputError(f"{model.source} holds no .gguf file")
        arch, shape, _ = inspect_gguf(self._open(model.view / path))
        return ModelFacts(model_type=arch.model_type, architectures=[arch.model_class],
                          task="text-generation",
                          extra={"gguf_file": path, "gguf_architecture": shape.arch})

    def convert(self, model: ModelInput, options: ConvertOptions, facts: ModelFacts,
                out: Path, run: JobRun) -> dict[str, Any]:
        import torch

        from .shards import ShardWriter

        dtype = options.dtype or "float32"
        gguf = self._open(model.view / facts.extra["gguf_file"])
        arch, shape, names = inspect_gguf(gguf)
        run.log(f"{gguf.path.name}: {shape.arch}, {shape.layers} layers, hidden {shape.hidden},"
                f" {shape.heads}/{shape.kv_heads} heads; tensor types {gguf.type_counts()}")
        run.progress(0.02, "rebuilding the tokenizer")
        tokens = read_tokenizer(gguf)
        for warning in tokens.warnings[:10]:
            run.warning(warning)
        vocab_size = gguf.shape("token_embd.weight")[0]
        tied = "lm_head.weight" not in names.values()
        bias = any(n.endswith("q_proj.bias") for n in names.values())
        config = hf_config(arch, shape, vocab_size, tied, bias, tokens)
        check_shapes(gguf, names, config)

        out.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(out)
        torch_dtype = getattr(torch, dtype)
        total = sum(gguf.nbytes(n) for n in names) or 1
        done = 0
        for name in sorted(names, key=lambda n: names[n]):
            values = gguf.dequantize(name)
            base = name.split(".")[-2]
            if arch.permuted_qk and base in ("attn_q", "attn_k"):
                values = unpermute_rows(values, shape.heads if base == "attn_q"
                                        else shape.kv_heads)
            writer.add(names[name], torch.from_numpy(values).to(torch_dtype).contiguous())
            done += gguf.nbytes(name)
            run.progress(0.05 + 0.85 * done / total, f"dequantizing ({dtype})")
        files = writer.close()

        run.progress(0.92, "writing config and tokenizer")
        data = config.to_diff_dict()  # what differs from the class's defaults, as saved
        data["dtype" if transformers_major() >= 5 else "torch_dtype"] = dtype
        _write_json(out / "config.json", data)
        tokens.tokenizer.save(str(out / "tokenizer.json"))
        _write_json(out / "tokenizer_config.json", tokens.tokenizer_config(shape.context))
        _write_json(out / "generation_config.json", tokens.generation_config())
        template = "with" if tokens.chat_template else "without"
        run.log(f"wrote {', '.join(files)} ({dtype}), config.json, tokenizer.json,"
                f" tokenizer_config.json ({template} a chat template), generation_config.json")
        return {
            "engine": "transformers",
            "dtype": dtype,
            "files": sorted(p.name for p in out.iterdir() if p.is_file()),
            "tokenizer": "tokenizer.json",
            "context_length": shape.context,
            "gguf_types": gguf.type_counts(),
        }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
