"""CTranslate2 conversion: the converted model generates what transformers generates.

float32 (no --quantization) must give exactly the same greedy tokens. int8 is
compared loosely, on the next-token logits of every prompt position: their
cosine similarity with the float model's must exceed 0.99 and the float model's
argmax must be among int8's top 5. (Greedy tokens of an int8 model may differ:
a tiny random model has near-ties that quantization noise can flip.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachemesh.caches import Caches
from cachemesh.convert import Conversions, make_options, read_manifest

from .models import PROMPTS

ctranslate2 = pytest.importorskip("ctranslate2")
NEW_TOKENS = 12


def hf_greedy(model, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, pad_token_id=0)
    return out[0, len(ids):].tolist()


def ct2_greedy(generator, tokenizer, prompt: str) -> list[int]:
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"])
    [result] = generator.generate_batch([tokens], max_length=NEW_TOKENS, min_length=NEW_TOKENS,
                                        sampling_topk=1, include_prompt_in_result=False)
    return result.sequences_ids[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_float32_conversion_generates_the_same_greedy_tokens(caches: Caches, request, arch):
    origin, model, tokenizer = request.getfixturevalue(arch)
    result = Conversions(caches).convert(str(origin), make_options("ct2"))
    manifest = read_manifest(result.view)
    assert manifest["runtime"]["class"] == "Generator"
    assert manifest["model"]["model_type"] == arch
    assert {"model.bin", "config.json", "vocabulary.json", "tokenizer.json"} <= \
        set(manifest["runtime"]["files"])
    generator = ctranslate2.Generator(str(result.view), device="cpu")
    for prompt in PROMPTS:
        assert ct2_greedy(generator, tokenizer, prompt) == hf_greedy(model, tokenizer, prompt), \
            prompt


def _logits_ct2(generator, tokens: list[str]) -> np.ndarray:
    return np.asarray(generator.forward_batch([tokens]))[0]


def test_int8_conversion_stays_close_to_the_float_model(caches: Caches, llama):
    origin, model, tokenizer = llama
    conversions = Conversions(caches)
    int8 = conversions.convert(str(origin), make_options("ct2", quantization="int8"))
    assert read_manifest(int8.view)["options"] == {"quantization": "int8"}
    generator = ctranslate2.Generator(str(int8.view), device="cpu", compute_type="int8")
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()
        got = _logits_ct2(generator, tokenizer.convert_ids_to_tokens(ids))
        assert got.shape == want.shape
        norms = np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1)
        cosine = (got * want).sum(-1) / norms
        assert cosine.min() > 0.99, (prompt, cosine)
        top5 = np.argsort(-got, axis=-1)[:, :5]
        assert all(w in t for w, t in zip(want.argmax(-1), top5, strict=True)), prompt
    # Quantized weights are smaller than the float32 ones.
    f32 = conversions.convert(str(origin), make_options("ct2"))
    assert (int8.view / "model.bin").stat().st_size < 0.6 * (f32.view / "model.bin").stat().st_size
