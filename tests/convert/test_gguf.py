"""GGUF input of ``cachemesh convert``: tiny models round-tripped, the real SmolLM2, bad files.

A tiny model written as llama.cpp would write it (gguf_models.py) must come back
with the same logits and the same tokenization; the real SmolLM2 GGUF must come
out as a Hugging Face folder that transformers reads; files that are not sound
GGUFs must be refused with a clear message, leaving no job and no result.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from cachemesh.caches import Caches
from cachemesh.convert import BUCKET, Conversions, gguf_model, make_options, read_manifest
from cachemesh.jobs import SUCCEEDED, Jobs
from cachemesh.load import load_pretrained
from cachemesh.runtimes.decoding import sample_tokens
from tests.convert.gguf_models import Converted, smollm2, tiny_model, write_gguf
from tests.convert.test_service import cli

__all__ = ["smollm2"]  # the session fixture, shared here

TEXTS = ["the quick brown fox", "caf\u00e9 \u4e16\u754c \U0001f642 42 shards", "a model cache"]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def round_trip(caches: Caches, path: Path, **options):
    result = Conversions(caches).convert(str(path), make_options("safetensors", **options))
    return result, load_pretrained(result.view)


@pytest.mark.parametrize("qtype, tolerance", [("F32", 1e-5), ("F16", 2e-3), ("Q8_0", 6e-2)])
def test_a_tiny_llama_comes_back_with_its_logits_and_tokens(caches, tmp_path, llama, qtype,
                                                            tolerance):
    from transformers import AutoTokenizer

    model, tokenizer = llama
    path = write_gguf(tmp_path / f"tiny.{qtype}.gguf", model, tokenizer, qtype=qtype)
    result, converted = round_trip(caches, path)
    ids = tokenizer(TEXTS[0])["input_ids"]
    want, got = logits(model, ids), logits(converted, ids)
    assert (got - want).abs().max() <= tolerance * want.abs().max(), (got - want).abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    rebuilt = AutoTokenizer.from_pretrained(result.view)
    for text in TEXTS:
        assert rebuilt(text)["input_ids"] == tokenizer(text)["input_ids"], text
        assert rebuilt.decode(rebuilt(text)["input_ids"]) == text
    assert rebuilt.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True) == "<|user|> hi\n<|assistant|> "
    manifest = read_manifest(result.view)
    assert manifest["runtime"]["engine"] == "transformers"
    assert manifest["runtime"]["gguf_types"][qtype] > 0
    assert manifest["model"]["architectures"] == ["LlamaForCausalLM"]


def test_the_q_k_rows_must_be_put_back(caches, tmp_path, llama, monkeypatch):
    """The round trip above fails without undoing llama.cpp's q/k order."""
    model, tokenizer = llama
    path = write_gguf(tmp_path / "tiny.gguf", model, tokenizer)
    monkeypatch.setattr(gguf_model, "unpermute_rows", lambda w, heads: w)
    _, converted = round_trip(caches, path)
    ids = tokenizer(TEXTS[0])["input_ids"]
    want = logits(model, ids)
    assert (logits(converted, ids) - want).abs().max() > 0.2 * want.abs().max()


def test_a_tiny_qwen2_with_tied_embeddings(caches, tmp_path):
    """Qwen2's GGUF keeps HF's q/k order and has q/k/v biases; tied: no output.weight."""
    model, tokenizer = tiny_model("qwen2", tie=True)
    path = write_gguf(tmp_path / "qwen.gguf", model, tokenizer)
    ids = tokenizer(TEXTS[2])["input_ids"]
    want = logits(model, ids)
    for dtype, tolerance in ((None, 1e-5), ("bfloat16", 6e-2)):
        result, converted = round_trip(caches, path, dtype=dtype)
        assert (logits(converted, ids) - want).abs().max() <= tolerance * want.abs().max()
        config = json.loads((result.view / "config.json").read_text())
        assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
        assert config.get("dtype", config.get("torch_dtype")) == (dtype or "float32")
        assert converted.dtype == getattr(torch, dtype or "float32")
    assert result.cache.startswith("safetensors-bfloat16-")


@pytest.mark.parametrize("pre, digits", [("default", ["\u012012345"]), ("smollm", list("12345")),
                                         ("llama-bpe", ["123", "45"]),
                                         ("qwen2", list("12345"))])
def test_the_tokenizer_follows_the_metadata(caches, tmp_path, llama, pre, digits):
    """tokenizer.ggml.pre picks how text is split before BPE; add_bos_token adds BOS."""
    from transformers import AutoTokenizer

    model, tokenizer = llama
    path = write_gguf(tmp_path / f"{pre}.gguf", model, tokenizer, pre=pre, add_bos=True)
    result = Conversions(caches).convert(str(path), make_options("safetensors"))
    rebuilt = AutoTokenizer.from_pretrained(result.view)
    split = rebuilt.backend_tokenizer.pre_tokenizer.pre_tokenize_str("x 12345")
    assert [piece for piece, _ in split][-len(digits):] == digits
    assert [piece for piece, _ in split][:1] == ["x"]
    ids = rebuilt("the quick brown fox")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[1:] == tokenizer("the quick brown fox")[
        "input_ids"]
    assert rebuilt.decode(ids, skip_special_tokens=True) == "the quick brown fox"


def test_to_ct2_from_a_gguf_goes_through_the_hugging_face_folder(caches, tmp_path, llama):
    import ctranslate2

    model, tokenizer = llama
    path = write_gguf(tmp_path / "tiny.gguf", model, tokenizer)
    result = Conversions(caches).convert(str(path), make_options("ct2"))
    assert read_manifest(result.view)["runtime"]["engine"] == "ctranslate2"
    jobs = Jobs(caches.store).list()
    assert [j.status for j in jobs] == [SUCCEEDED, SUCCEEDED]
    targets = sorted(j.spec["target"] for j in jobs)
    assert targets == ["ct2", "safetensors"]
    # The Hugging Face folder is a result of its own, and the ct2 model's input.
    hf = [c for c in caches.list() if c.bucket == BUCKET and c.name.startswith("safetensors-")]
    assert len(hf) == 1 and result.input_cache == hf[0].name

    prompt = tokenizer(TEXTS[0])["input_ids"]
    want = list(sample_tokens(model, prompt, max_new_tokens=6,
                              eos_ids=frozenset({tokenizer.eos_token_id})))
    if want[-1] == tokenizer.eos_token_id:
        want.pop()  # CTranslate2 leaves the end token out
    generator = ctranslate2.Generator(str(result.view))
    out = generator.generate_batch([tokenizer.convert_ids_to_tokens(prompt)], max_length=6,
                                   sampling_topk=1, include_prompt_in_result=False)
    assert out[0].sequences_ids[0] == want

    again = Conversions(caches).convert(str(path), make_options("ct2"))
    assert again.cached and again.view == result.view and len(Jobs(caches.store).list()) == 2


# -- files that must be refused ------------------------------------------------------------

def _refused(clean_env: Path, args: list[str], message: str) -> None:
    proc = cli("convert", *args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert message in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert not (clean_env / "buckets" / BUCKET).exists()
    assert json.loads(cli("jobs", "ls", "--json").stdout) == []


def test_a_file_that_is_not_a_gguf_is_refused(clean_env, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b'{"this": "is json, not a GGUF file"}')
    _refused(clean_env, [str(bad), "--to", "safetensors"], "is not a GGUF file: it starts with")


def test_a_truncated_gguf_is_refused(clean_env, tmp_path, llama):
    path = write_gguf(tmp_path / "whole.gguf", *llama)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-5000])
    _refused(clean_env, [str(cut), "--to", "safetensors"], "truncated")
    header_only = tmp_path / "head.gguf"
    header_only.write_bytes(path.read_bytes()[:64])
    _refused(clean_env, [str(header_only), "--to", "ct2"], "truncated or corrupt")


def test_an_unsupported_quantization_type_is_refused(clean_env, tmp_path, llama):
    path = write_gguf(tmp_path / "q81.gguf", *llama, types={"blk.0.attn_v.weight": "Q8_1"})
    _refused(clean_env, [str(path), "--to", "safetensors"],
             "1 tensor(s) of type Q8_1 (e.g. blk.0.attn_v.weight); cachemesh dequantizes F32,")


def test_what_cachemesh_cannot_convert_yet_is_refused(clean_env, tmp_path, llama):
    path = write_gguf(tmp_path / "gpt2.gguf", *llama, arch="gpt2")
    _refused(clean_env, [str(path), "--to", "safetensors"],
             "architecture 'gpt2' is not one cachemesh converts (it converts: llama, qwen2)")
    path = write_gguf(tmp_path / "odd.gguf", *llama, pre="odd-pre")
    _refused(clean_env, [str(path), "--to", "safetensors"],
             "tokenizer.ggml.pre 'odd-pre' is not a pre-tokenizer cachemesh knows")


def test_metadata_that_disagrees_with_the_tensors_fails_the_job(clean_env, tmp_path, llama):
    """Found once the job runs (check() reads no tensor shapes): a Failed job with its
    log, and no result."""
    path = write_gguf(tmp_path / "liar.gguf", *llama, ffn=128)
    proc = cli("convert", str(path), "--to", "safetensors")
    message = "tensor blk.0.ffn_gate.weight has shape [96, 64]; the model described by its" \
              " metadata needs [128, 64]"
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    [job] = json.loads(cli("jobs", "ls", "--json").stdout)
    assert job["status"] == "Failed" and message in job["error"]
    logs = json.loads(cli("jobs", "logs", job["id"], "--json").stdout)["logs"]
    assert any("liar.gguf: llama, 2 layers" in line["message"] for line in logs)
    caches = json.loads(cli("cache", "ls", "--json").stdout)
    assert [c["bucket"] for c in caches] == ["default"]  # the input; no result
    assert not list((clean_env / "tmp" / "convert").glob("*"))


def test_other_inputs_gguf_conversion_refuses(clean_env, tmp_path, llama, make_tree):
    (tmp_path / "one").mkdir()
    path = write_gguf(tmp_path / "one" / "a.gguf", *llama)
    _refused(clean_env, [str(path), "--to", "safetensors", "--quantization", "int8"],
             "takes no --quantization: --tp shards keep the checkpoint's dtype, and a GGUF input"
             " takes --dtype")
    _refused(clean_env, [str(path), "--to", "safetensors", "--dtype", "int4"],
             "--dtype must be one of float32, bfloat16, float16")
    (tmp_path / "one" / "b.gguf").write_bytes(path.read_bytes())
    _refused(clean_env, [str(tmp_path / "one"), "--to", "safetensors"], "holds 2 GGUF files")
    plain = make_tree("hf", {"config.json": b'{"model_type": "llama"}',
                             "model.safetensors": b"\0" * 16})
    _refused(clean_env, [str(plain), "--to", "safetensors", "--dtype", "bfloat16"],
             "--dtype sets the type of a GGUF input's dequantized weights")


# -- the real model --------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_converts_to_a_hugging_face_folder(smollm2: Converted):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    view = smollm2.view
    names = {p.name for p in view.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "cachemesh-convert.json"} <= names
    config = AutoConfig.from_pretrained(view)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings and config.vocab_size == 49152
    with torch.device("meta"):
        expected = set(LlamaForCausalLM(config).state_dict()) - {"lm_head.weight"}
    with safe_open(str(view / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == expected
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"

    tokenizer = AutoTokenizer.from_pretrained(view)
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert tokenizer("<|im_start|>user")["input_ids"][0] == 1  # one token, never split
    assert len(tokenizer("2024")["input_ids"]) == 4  # SmolLM splits digits one by one
    for text in TEXTS:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    tok_config = json.loads((view / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_config and tok_config["eos_token"] == "<|im_end|>"
    assert json.loads((view / "generation_config.json").read_text())["eos_token_id"] == 2
    manifest = read_manifest(view)
    assert manifest["runtime"]["gguf_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert manifest["model"]["gguf_file"] == smollm2.gguf.name

    # Converting again is a lookup: no job, no work.
    started = time.monotonic()
    again = Conversions(Caches(smollm2.settings)).convert(str(smollm2.gguf),
                                                          make_options("safetensors"))
    assert again.cached and again.job is None and again.view == view
    assert time.monotonic() - started < smollm2.seconds / 2
