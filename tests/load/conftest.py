"""Fixtures for the loader: a safetensors writer that can also lie, and tiny models.

``write_raw`` writes files byte by byte from a header dict, so tests can make
the malformed and misaligned files that the official writer never produces.
Everything is generated under tmp dirs; the transformers models are built once
per session.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import torch


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (flushing them first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def header_bytes(header: Mapping[str, object], pad_to: int | None = 8, extra: int = 0) -> bytes:
    """JSON header, space-padded to a multiple of ``pad_to`` (None: none), plus ``extra`` spaces."""
    raw = json.dumps(header).encode()
    if pad_to:
        raw += b" " * (-len(raw) % pad_to)
    return raw + b" " * extra


def write_raw(path: Path, header: Mapping[str, object], data: bytes, **pad: int | None) -> Path:
    raw = header_bytes(header, **pad)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_same(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes (bit-exact, NaNs included)."""
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype, name
        assert x.shape == y.shape, name
        assert tensor_bytes(x.cpu()) == tensor_bytes(y.cpu()), name


@pytest.fixture
def st_file(tmp_path: Path) -> Callable[..., Path]:
    """Write tensors with the official writer; returns the file's path."""
    from safetensors.torch import save_file

    def make(
        tensors: Mapping[str, torch.Tensor], name: str = "model.safetensors", **kw: object
    ) -> Path:
        path = tmp_path / name
        save_file(dict(tensors), path, **kw)
        return path

    return make


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    """One tensor of every dtype torch and safetensors share, with awkward shapes."""
    gen = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    names = [
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
        "uint16",
        "uint32",
        "uint64",
        "complex64",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    ]
    for i, name in enumerate(names):
        dtype = getattr(torch, name, None)
        if dtype is None:
            continue
        raw = torch.randint(
            0, 256, (7 * (i + 1) * dtype.itemsize * 3,), dtype=torch.uint8, generator=gen
        )
        if dtype == torch.bool:
            raw &= 1  # only 0 and 1 are bools
        out[f"t.{name}"] = raw.view(dtype).reshape(7 * (i + 1), 3)
    out["scalar"] = torch.tensor(2.5, dtype=torch.float32)
    out["empty"] = torch.empty(0, 4, dtype=torch.bfloat16)
    out["big"] = torch.randn(1500, 1001, generator=gen)  # several chunks of 4 KiB
    return out


# ---------------------------------------------------------------- tiny transformers models


def _tiny_models() -> dict[str, tuple[object, type]]:
    import transformers as T

    llama = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return {
        "llama": (T.LlamaConfig(**llama), T.LlamaForCausalLM),
        "llama-tied": (T.LlamaConfig(**llama, tie_word_embeddings=True), T.LlamaForCausalLM),
        "gpt2": (
            T.GPT2Config(
                vocab_size=96,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
            ),
            T.GPT2LMHeadModel,
        ),
        "bert": (
            T.BertConfig(
                vocab_size=96,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=64,
            ),
            T.BertForMaskedLM,
        ),
    }


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Tiny randomly initialised models saved with save_pretrained, one directory each."""
    import transformers

    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("tiny-models")
    out: dict[str, Path] = {}
    for name, (config, cls) in _tiny_models().items():
        torch.manual_seed(0)
        model = cls(config)
        path = root / name
        model.save_pretrained(path)
        out[name] = path
    # A sharded copy of llama: the index and several files.
    torch.manual_seed(0)
    config, cls = _tiny_models()["llama"]
    cls(config).save_pretrained(root / "llama-sharded", max_shard_size="20KB")
    out["llama-sharded"] = root / "llama-sharded"
    yield out
