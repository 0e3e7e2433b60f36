"""The transformers runtime in-process: the same tokens as transformers' own generate,
weights through cachemesh's loader, adapters, classification, bad payloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cachemesh.errors import InferenceInputError
from cachemesh.runtimes import resolve
from cachemesh.runtimes.base import ModelSettings
from cachemesh.runtimes.transformers import TransformersRuntime
from cachemesh.runtimes.types import InferenceRequest, Tensor
from tests.runtimes.llms import TinyLLMs, tiny_llms

__all__ = ["tiny_llms"]

PROMPT = "the quick brown fox"


def runtime(path: Path, name: str = "m", **params: str) -> TransformersRuntime:
    r = TransformersRuntime(ModelSettings(name, path, parameters=params))
    r.load()
    return r


def reference_tokens(model, tokenizer, n: int) -> list[int]:
    import torch

    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_generation_matches_transformers_generate(tiny_llms: TinyLLMs, monkeypatch):
    from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedModel

    reference = LlamaForCausalLM.from_pretrained(tiny_llms.chat).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llms.chat)
    expected = tokenizer.decode(reference_tokens(reference, tokenizer, 20),
                                skip_special_tokens=True)

    def refuse(*args, **kwargs):
        raise AssertionError("the runtime must load weights through cachemesh, not from_pretrained")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    r = runtime(tiny_llms.chat)
    result = r.generate({"kind": "completion", "prompt": PROMPT, "max_tokens": 20,
                         "temperature": 0})
    assert result["text"] == expected
    assert result["completion_tokens"] == 20 and result["finish_reason"] == "length"
    chunks = list(r.stream({"kind": "completion", "prompt": PROMPT, "max_tokens": 20,
                            "temperature": 0}))
    assert chunks[0] == {"text": ""}
    assert "".join(c["text"] for c in chunks) == expected
    assert chunks[-1]["finish_reason"] == "length"
    assert r.stats()["generated_tokens"] == 40


def test_closing_a_stream_stops_generation(tiny_llms: TinyLLMs):
    r = runtime(tiny_llms.chat)
    stream = r.stream({"kind": "completion", "prompt": PROMPT, "max_tokens": 500,
                       "temperature": 0})
    for _ in range(4):
        next(stream)
    stream.close()
    assert r.stats()["cancelled_streams"] == 1
    assert r.stats()["generated_tokens"] < 20


def test_adapter_matches_peft_and_shares_the_base(tiny_llms: TinyLLMs):
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cachemesh.runtimes import adapters

    tokenizer = AutoTokenizer.from_pretrained(tiny_llms.chat)
    expected = []
    for adapter in tiny_llms.adapters:
        base = LlamaForCausalLM.from_pretrained(tiny_llms.chat).eval()
        model = PeftModel.from_pretrained(base, adapter).eval()
        with torch.no_grad():
            expected.append(tokenizer.decode(reference_tokens(model, tokenizer, 10),
                                             skip_special_tokens=True))
    assert expected[0] != expected[1]
    before = adapters.base_loads
    a = runtime(tiny_llms.adapters[0], "a", base=str(tiny_llms.chat))
    b = runtime(tiny_llms.adapters[1], "b", base=str(tiny_llms.chat))
    assert adapters.base_loads == before + 1
    ask = {"kind": "completion", "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    assert [a.generate(ask)["text"], b.generate(ask)["text"], a.generate(ask)["text"]] == [
        expected[0], expected[1], expected[0]]
    a.unload()
    assert b.generate(ask)["text"] == expected[1]
    b.unload()
    assert adapters._bases == {}


def test_an_adapter_without_a_base_says_so(tiny_llms: TinyLLMs, tmp_path: Path):
    import shutil

    copy = shutil.copytree(tiny_llms.adapters[0], tmp_path / "adapter")
    (copy / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(Exception, match="base="):
        runtime(copy)


def test_runtime_is_detected_for_models_and_adapters(tiny_llms: TinyLLMs):
    assert resolve(tiny_llms.chat).runtime == "transformers"
    assert resolve(tiny_llms.adapters[0]).runtime == "transformers"
    assert resolve(tiny_llms.embedder).runtime == "transformers"


def test_classifier_and_embedder_over_v2(tiny_llms: TinyLLMs):
    texts = np.array([b"the quick brown fox", b"a model cache"], dtype=object)
    request = InferenceRequest([Tensor.of("text", texts)])
    cls = runtime(tiny_llms.classifier)
    labels, scores = cls.predict(request).outputs
    assert labels.data.tolist()[0] in (b"neg", b"neutral", b"pos")
    assert scores.shape == (2, 3)
    np.testing.assert_allclose(scores.data.sum(1), 1.0, rtol=1e-5)
    with pytest.raises(InferenceInputError, match="does not generate"):
        cls.generate({"kind": "completion", "prompt": "x"})
    emb = runtime(tiny_llms.embedder)
    (vectors,) = emb.predict(request).outputs
    assert vectors.name == "embedding" and vectors.shape == (2, 32)
    gen = runtime(tiny_llms.chat)
    (out,) = gen.predict(InferenceRequest([Tensor.of("text_input", texts)],
                                          parameters={"max_tokens": 3, "temperature": 0})).outputs
    assert out.shape == (2,) and all(isinstance(t, bytes) for t in out.data)


@pytest.mark.parametrize("payload,match", [
    ({"kind": "poem"}, "kind"),
    ({"kind": "completion"}, "prompt"),
    ({"kind": "completion", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"kind": "completion", "prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"kind": "completion", "prompt": "x", "temperature": -1}, "temperature"),
    ({"kind": "completion", "prompt": "x", "top_p": 0}, "top_p"),
    ({"kind": "completion", "prompt": "x", "stop": [1]}, "stop"),
    ({"kind": "completion", "prompt": "x", "seed": "7"}, "seed"),
    ({"kind": "chat", "messages": []}, "messages"),
    ({"kind": "chat", "messages": [{"role": "user"}]}, "content"),
    ({"kind": "embedding", "input": "not a list"}, "input"),
])
def test_bad_payloads_are_input_errors(tiny_llms: TinyLLMs, payload, match):
    r = _shared_runtime(tiny_llms)
    with pytest.raises(InferenceInputError, match=match):
        if payload["kind"] == "embedding":
            r.generate(payload)
        else:
            list(r.stream(payload))


_RUNTIMES: dict[Path, TransformersRuntime] = {}


def _shared_runtime(tiny_llms: TinyLLMs) -> TransformersRuntime:
    if tiny_llms.chat not in _RUNTIMES:
        _RUNTIMES[tiny_llms.chat] = runtime(tiny_llms.chat)
    return _RUNTIMES[tiny_llms.chat]


def test_the_first_requests_warn_of_nothing(tiny_llms: TinyLLMs, capfd: pytest.CaptureFixture):
    """The server's console shows no library deprecation on the first request (the
    key/value cache passed under the name the installed transformers takes); a
    real warning would still show: nothing is filtered."""
    import warnings

    r = runtime(tiny_llms.chat)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r.generate({"kind": "completion", "prompt": PROMPT, "max_tokens": 4})
        list(r.stream({"kind": "chat", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 4}))
    assert [str(w.message) for w in caught] == []
    assert "deprecated" not in capfd.readouterr().err
    r.unload()
