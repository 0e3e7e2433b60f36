"""``--to safetensors --tp N``: pre-split a checkpoint into N tensor-parallel shards.

Each rank of a tensor-parallel server then reads only its own directory, and
only its own bytes, instead of every rank reading the whole checkpoint and
slicing it in memory. The split follows the Megatron pattern by layer role:

- column-parallel (the first linear of attention and of the MLP: q, k, v,
  gate, up, fc): the output features are split, so each rank computes its
  own heads / its own slice of the hidden MLP activations; their biases split
  along with them;
- row-parallel (the linear after them: o_proj, down_proj, c_proj, dense):
  the input features are split; each rank yields a partial sum, the ranks'
  partials are summed (all-reduce), and the bias (full, on every rank) is
  added once, after the sum;
- everything else (norms, embeddings, lm_head) is replicated: a full copy on
  every rank. Vocabulary is not split.

Where the layout is not plain ``[out, in]``:

- GPT-2 uses ``Conv1D``, whose weight is ``[in, out]`` (transposed): column
  splits cut dim 1 and row splits dim 0. Its ``c_attn`` packs q, k, v one
  after the other along the output (``[q | k | v]``), so rank r takes its
  slice of each of the three blocks and concatenates them
  (``parts = 3`` below).
- BLOOM's fused ``query_key_value`` is laid out per head (``[head0: q k v,
  head1: q k v, …]``), so a contiguous slice of whole heads is already a
  rank's q, k and v: a plain column split, as long as heads divide evenly.
- Llama-style models with grouped-query attention split their key/value heads
  too, so ``num_key_value_heads`` must divide by N.

Output::

    rank-0/model.safetensors          rank 0's tensors only (metadata: tp_rank, tp_size)
    rank-0/config.json, tokenizer.json, …   copied to every rank (stored once: same bytes)
    rank-1/…
    cachemesh-convert.json            runtime.tensors: for every tensor its split
                                      ("column" / "row" / "replicate"), dim, parts,
                                      and reduce ("sum-then-add" for row biases)

Big ranks are written in shards of at most ``SHARD_BYTES`` with the usual
``model.safetensors.index.json``. Tensors are read with ``get_slice``, so
splitting reads each rank's slice and never loads a whole checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError
from .base import (
    TOKENIZER_FILES,
    Converter,
    ConvertOptions,
    ModelFacts,
    ModelInput,
    copy_side_files,
    dist_versions,
)
from .shards import ShardWriter

if TYPE_CHECKING:
    from ..jobs import JobRun

SHARD_BYTES = 2 * 1024**3  # read at each call (the tests lower it)
MAX_TP = 1024
COLUMN, ROW, REPLICATE = "column", "row", "replicate"


@dataclass(frozen=True)
class Split:
    kind: str  # column, row, replicate
    dim: int | None = None  # the dimension that is cut
    parts: int = 1  # packed blocks along dim (GPT-2 c_attn: q, k, v), each cut evenly
    add_after_reduce: bool = False  # a row-parallel bias: full on every rank, added once

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"split": self.kind}
        if self.dim is not None:
            out["dim"] = self.dim
        if self.parts != 1:
            out["parts"] = self.parts
        if self.add_after_reduce:
            out["reduce"] = "sum-then-add"
        return out


_REPLICATE = Split(REPLICATE)
_ROW_BIAS = Split(REPLICATE, add_after_reduce=True)


@dataclass(frozen=True)
class Layout:
    """How one architecture family splits: rules by tensor-name suffix, and
    which config sizes must divide by N."""

    family: str
    rules: tuple[tuple[str, Split], ...]
    divisible: tuple[tuple[str, tuple[str, ...]], ...]  # (what, config keys, first present)

    def split_of(self, name: str) -> Split | None:
        for pattern, split in self.rules:
            if re.search(pattern, name):
                return split
        return None


_LLAMA = Layout(
    family="llama",
    rules=(
        (r"self_attn\.[qkv]_proj\.(weight|bias)$", Split(COLUMN, 0)),
        (r"self_attn\.o_proj\.weight$", Split(ROW, 1)),
        (r"self_attn\.o_proj\.bias$", _ROW_BIAS),
        (r"mlp\.(gate|up)_proj\.(weight|bias)$", Split(COLUMN, 0)),
        (r"mlp\.down_proj\.weight$", Split(ROW, 1)),
        (r"mlp\.down_proj\.bias$", _ROW_BIAS),
        (r"(norm|layernorm)\.weight$|embed_tokens\.weight$|lm_head\.weight$|rotary_emb",
         _REPLICATE),
    ),
    divisible=(
        ("attention heads", ("num_attention_heads",)),
        ("key/value heads", ("num_key_value_heads", "num_attention_heads")),
        ("MLP intermediate size", ("intermediate_size",)),
    ),
)
_GPT2 = Layout(
    family="gpt2",
    rules=(
        # Conv1D: weight is [in, out].
        (r"attn\.c_attn\.weight$", Split(COLUMN, 1, parts=3)),
        (r"attn\.c_attn\.bias$", Split(COLUMN, 0, parts=3)),
        (r"attn\.c_proj\.weight$", Split(ROW, 0)),
        (r"attn\.c_proj\.bias$", _ROW_BIAS),
        (r"mlp\.c_fc\.weight$", Split(COLUMN, 1)),
        (r"mlp\.c_fc\.bias$", Split(COLUMN, 0)),
        (r"mlp\.c_proj\.weight$", Split(ROW, 0)),
        (r"mlp\.c_proj\.bias$", _ROW_BIAS),
        (r"ln_\w+\.(weight|bias)$|wte\.weight$|wpe\.weight$|lm_head\.weight$|attn\.(masked_)?bias$",
         _REPLICATE),
    ),
    divisible=(("attention heads", ("n_head",)), ("MLP inner size", ("n_inner", "*4n_embd"))),
)
_BLOOM = Layout(
    family="bloom",
    rules=(
        (r"self_attention\.query_key_value\.(weight|bias)$", Split(COLUMN, 0)),
        (r"self_attention\.dense\.weight$", Split(ROW, 1)),
        (r"self_attention\.dense\.bias$", _ROW_BIAS),
        (r"mlp\.dense_h_to_4h\.(weight|bias)$", Split(COLUMN, 0)),
        (r"mlp\.dense_4h_to_h\.weight$", Split(ROW, 1)),
        (r"mlp\.dense_4h_to_h\.bias$", _ROW_BIAS),
        ((r"layernorm\.(weight|bias)$|ln_f\.(weight|bias)$|word_embeddings\.weight$"
          r"|lm_head\.weight$"), _REPLICATE),
    ),
    divisible=(("attention heads", ("n_head", "num_attention_heads")),
               ("MLP inner size", ("*4hidden_size", "*4n_embed"))),
)
LAYOUTS: dict[str, Layout] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "gpt2": _GPT2,
    "bloom": _BLOOM,
}


def _config_size(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        if key.startswith("*4"):
            value = config.get(key[2:])
            if isinstance(value, int):
                return 4 * value
        elif isinstance(config.get(key), int):
            return config[key]
    return None


def weight_files(model: ModelInput) -> list[str]:
    """The safetensors files of the checkpoint (by its index when it has one)."""
    index = "model.safetensors.index.json"
    if index in model.files:
        try:
            weight_map = json.loads((model.view / index).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"{model.source}: unreadable {index}: {exc}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if f not in model.files]
        if missing:
            raise InvalidInputError(f"{model.source}: {index} names missing files {missing}")
        return files
    return sorted(p for p in model.files if p.endswith(".safetensors") and "/" not in p)


class TensorParallelSplitter(Converter):
    target = "safetensors"
    name = "cachemesh-tp-split"
    revision = 1

    def versions(self, model: ModelInput) -> dict[str, str]:
        return dist_versions("safetensors")

    def check_options(self, options: ConvertOptions) -> None:
        if options.quantization is not None:
            raise InvalidInputError("--to safetensors takes no --quantization: --tp shards keep"
                                    " the checkpoint's dtype, and a GGUF input takes --dtype")
        # No --tp: check() refuses a Hugging Face input; a GGUF input never reaches this
        # converter without one (service.py turns it into a Hugging Face folder).
        if options.tp is not None and not 1 <= options.tp <= MAX_TP:
            raise InvalidInputError(f"--tp must be between 1 and {MAX_TP}, got {options.tp}")

    def check(self, model: ModelInput, options: ConvertOptions) -> ModelFacts:
        if options.tp is None:
            raise InvalidInputError(
                f"--to safetensors of a Hugging Face model ({model.source}) needs --tp N (the"
                " number of ranks); without --tp it converts a GGUF file")
        config = model.require_config("safetensors")
        model_type = config.get("model_type")
        layout = LAYOUTS.get(model_type)  # type: ignore[arg-type]
        if layout is None:
            raise InvalidInputError(
                f"{model.source}: no tensor-parallel layout for model_type {model_type!r}"
                f" (supported: {', '.join(sorted(LAYOUTS))})"
            )
        n = options.tp
        assert n is not None
        for what, keys in layout.divisible:
            size = _config_size(config, keys)
            if size is None:
                raise InvalidInputError(f"{model.source}: config.json lacks {keys[0]} ({what})")
            if size % n:
                raise InvalidInputError(
                    f"--tp {n} does not divide the {what} of {model.source} ({size}); choose a"
                    f" divisor of {size}"
                )
        if not weight_files(model):
            raise InvalidInputError(
                f"{model.source}: --tp needs a safetensors checkpoint (no *.safetensors found)"
            )
        architectures = list(config.get("architectures") or [])
        return ModelFacts(model_type=model_type, architectures=architectures,
                          task=None, extra={"tp_family": layout.family})

    def convert(self, model: ModelInput, options: ConvertOptions, facts: ModelFacts,
                out: Path, run: JobRun) -> dict[str, Any]:
        from safetensors import safe_open

        n = options.tp
        assert n is not None
        layout = LAYOUTS[facts.model_type]  # type: ignore[index]
        files = weight_files(model)
        names: dict[str, str] = {}  # tensor -> file
        for file in files:
            with safe_open(str(model.view / file), framework="pt") as f:
                for name in f.keys():
                    names[name] = file
        plan: dict[str, Split] = {}
        unknown = []
        for name in sorted(names):
            split = layout.split_of(name)
            if split is None:
                unknown.append(name)
                split = _REPLICATE
            plan[name] = split
        if unknown:
            shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
            run.warning(f"{len(unknown)} tensor(s) match no {layout.family} rule and are"
                        f" replicated on every rank: {shown}")
        run.log(f"{len(plan)} tensors: {sum(s.kind == COLUMN for s in plan.values())} column,"
                f" {sum(s.kind == ROW for s in plan.values())} row,"
                f" {sum(s.kind == REPLICATE for s in plan.values())} replicated; {n} ranks")

        total = len(plan) * n
        done = 0
        rank_files: dict[str, list[str]] = {}
        for rank in range(n):
            rank_dir = out / f"rank-{rank}"
            writer = ShardWriter(rank_dir, limit=SHARD_BYTES,
                                 metadata={"tp_rank": str(rank), "tp_size": str(n)},
                                 index_metadata={"tp_rank": rank, "tp_size": n})
            for file in files:
                with safe_open(str(model.view / file), framework="pt") as f:
                    for name in sorted(k for k, v in names.items() if v == file):
                        writer.add(name, _slice(f, name, plan[name], rank, n))
                        done += 1
                        run.progress(0.95 * done / total, f"writing rank {rank} of {n}")
            rank_files[f"rank-{rank}"] = writer.close()
            copy_side_files(model.view, rank_dir, ("config.json", *TOKENIZER_FILES))
        return {
            "engine": "safetensors",
            "tp_size": n,
            "family": layout.family,
            "ranks": {rank: files for rank, files in rank_files.items()},
            "tensors": {name: split.to_dict() for name, split in plan.items()},
        }


def _slice(f: Any, name: str, split: Split, rank: int, n: int) -> Any:
    """Rank ``rank``'s part of one tensor, read without loading the rest."""
    if split.kind == REPLICATE:
        return f.get_tensor(name)
    import torch

    view = f.get_slice(name)
    shape = view.get_shape()
    dim = split.dim
    assert dim is not None
    if dim >= len(shape):
        raise InvalidInputError(f"tensor {name} has shape {shape}: no dim {dim} to split")
    length = shape[dim]
    if length % (split.parts * n):
        raise InvalidInputError(
            f"tensor {name} (shape {shape}) does not split into {n} ranks"
            + (f" of {split.parts} packed blocks" if split.parts > 1 else "")
        )
    block = length // split.parts
    step = block // n
    pieces = []
    for part in range(split.parts):
        start = part * block + rank * step
        index = tuple(slice(start, start + step) if d == dim else slice(None)
                      for d in range(len(shape)))
        pieces.append(view[index])
    tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)
    return tensor.contiguous()
