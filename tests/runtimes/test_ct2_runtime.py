"""The ctranslate2 runtime against the generation contract (runtimes/generation.py).

The reference is the source model in transformers: a float32 conversion
generates the same greedy tokens (tests/convert/test_ct2.py), so the runtime's
text must be the tokenizer's decoding of transformers' greedy tokens, streamed
or not. The V2 path runs through a real server on loopback.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from cachemesh.errors import InferenceInputError, ModelLoadError
from cachemesh.runtimes import ModelSettings, resolve, runtime_class
from cachemesh.serve.core.registry import ModelSpec
from tests.convert.models import PROMPTS
from tests.runtimes.conftest import Converted
from tests.serve.conftest import RunningServer, serve_settings

pytest.importorskip("ctranslate2")
torch = pytest.importorskip("torch")

NEW = 12


def hf_greedy(converted: Converted, ids: list[int], new: int = NEW) -> list[int]:
    """transformers' greedy continuation of ``ids``, up to and without the EOS token."""
    eos = converted.extra.eos_token_id
    with torch.no_grad():
        out = converted.model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False,
                                       eos_token_id=eos, pad_token_id=0)
    tokens = out[0, len(ids):].tolist()
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def text_of(converted: Converted, tokens: list[int]) -> str:
    return converted.extra.decode(tokens, skip_special_tokens=True)


def collect(runtime, payload: dict) -> tuple[str, list[dict]]:
    chunks = list(runtime.stream(payload))
    return "".join(c["text"] for c in chunks), chunks


def test_the_converted_directory_is_detected(ct2_llama: Converted):
    resolved = resolve(ct2_llama.view)
    assert resolved.runtime == "ctranslate2", resolved.reason
    assert runtime_class("ctranslate2").detect(ct2_llama.origin) == 0  # a transformers checkpoint
    for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (ct2_llama.view / name).is_file(), f"the conversion lost {name}"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_text_is_transformers_text_streamed_or_not(loaded_ct2, ct2_llama: Converted,
                                                           prompt: str):
    ids = ct2_llama.extra(prompt)["input_ids"]
    want = hf_greedy(ct2_llama, ids)
    payload = {"kind": "completion", "prompt": prompt, "max_tokens": NEW, "temperature": 0}
    ended = len(want) < NEW  # an end token came first; it counts as a completion token
    result = loaded_ct2.generate(payload)
    assert result == {
        "text": text_of(ct2_llama, want),
        "finish_reason": "stop" if ended else "length",
        "prompt_tokens": len(ids),
        "completion_tokens": len(want) + ended,
    }
    text, chunks = collect(loaded_ct2, payload)
    assert text == result["text"]
    first, *deltas, last = chunks
    assert first == {"text": ""}  # accepted: sent before the first token
    assert all(set(c) == {"text"} and c["text"] for c in deltas)
    assert last == {"text": "", "finish_reason": result["finish_reason"],
                    "prompt_tokens": len(ids), "completion_tokens": len(want) + ended}


def test_max_tokens_and_finish_reason(loaded_ct2, ct2_llama: Converted):
    prompt = PROMPTS[0]
    ids = ct2_llama.extra(prompt)["input_ids"]
    want = hf_greedy(ct2_llama, ids, new=3)
    result = loaded_ct2.generate({"kind": "completion", "prompt": prompt, "max_tokens": 3,
                                  "temperature": 0.0})
    assert result["completion_tokens"] == 3
    assert result["text"] == text_of(ct2_llama, want)
    assert result["finish_reason"] == ("length" if len(want) == 3 else "stop")
    # No max_tokens: OpenAI's default of 16.
    default = loaded_ct2.generate({"kind": "completion", "prompt": prompt, "temperature": 0})
    assert default["text"] == text_of(ct2_llama, hf_greedy(ct2_llama, ids, new=16))
    assert default["completion_tokens"] == 16


def test_end_tokens_of_generation_config_end_the_text(ct2_llama: Converted, tmp_path: Path):
    prompt = PROMPTS[0]
    ids = ct2_llama.extra(prompt)["input_ids"]
    want = hf_greedy(ct2_llama, ids)
    end = want[4]
    assert end not in want[:4]
    # Another end token beside </s>, as Llama 3's generation_config.json lists several.
    copy = tmp_path / "ends"
    shutil.copytree(ct2_llama.view, copy)
    config = orjson.loads((copy / "generation_config.json").read_bytes())
    config["eos_token_id"] = [ct2_llama.extra.eos_token_id, end]
    (copy / "generation_config.json").write_bytes(orjson.dumps(config))
    runtime = runtime_class("ctranslate2")(ModelSettings(name="ends", path=copy))
    runtime.load()
    try:
        payload = {"kind": "completion", "prompt": prompt, "max_tokens": NEW, "temperature": 0}
        result = runtime.generate(payload)
        assert result == {"text": text_of(ct2_llama, want[:4]), "finish_reason": "stop",
                          "prompt_tokens": len(ids), "completion_tokens": 5}
        assert collect(runtime, payload)[1][-1]["completion_tokens"] == 5
    finally:
        runtime.unload()


def test_stop_strings_end_the_text_before_them(loaded_ct2, ct2_llama: Converted):
    prompt = PROMPTS[1]
    full = loaded_ct2.generate({"kind": "completion", "prompt": prompt, "max_tokens": NEW,
                                "temperature": 0})
    text = full["text"]
    assert len(text) >= 6, text
    stop = text[3:6]  # in the middle: the text must end right before its first occurrence
    payload = {"kind": "completion", "prompt": prompt, "max_tokens": NEW, "temperature": 0,
               "stop": ["never appears \u2603", stop]}
    result = loaded_ct2.generate(payload)
    assert result["text"] == text[:text.index(stop)]
    assert result["finish_reason"] == "stop"
    assert result["completion_tokens"] < full["completion_tokens"]
    streamed, chunks = collect(loaded_ct2, payload)
    assert streamed == result["text"]
    assert chunks[-1]["finish_reason"] == "stop"
    assert chunks[-1]["completion_tokens"] == result["completion_tokens"]


def test_chat_renders_the_template(loaded_ct2, ct2_llama: Converted):
    messages = [{"role": "user", "content": "the quick brown fox"}]
    rendered = ct2_llama.extra.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=True)
    assert rendered.endswith("assistant:")
    ids = ct2_llama.extra(rendered, add_special_tokens=False)["input_ids"]
    want = hf_greedy(ct2_llama, ids)
    result = loaded_ct2.generate({"kind": "chat", "messages": messages, "max_tokens": NEW,
                                  "temperature": 0})
    assert result["prompt_tokens"] == len(ids)
    assert result["text"] == text_of(ct2_llama, want)
    streamed, _ = collect(loaded_ct2, {"kind": "chat", "messages": messages, "max_tokens": NEW,
                                       "temperature": 0})
    assert streamed == result["text"]


def test_chat_without_a_template_is_the_requests_fault(ct2_llama: Converted, tmp_path: Path):
    bare = tmp_path / "bare"
    shutil.copytree(ct2_llama.view, bare)
    (bare / "chat_template.jinja").unlink()
    config = orjson.loads((bare / "tokenizer_config.json").read_bytes())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_bytes(orjson.dumps(config))
    runtime = runtime_class("ctranslate2")(ModelSettings(name="bare", path=bare))
    runtime.load()
    try:
        with pytest.raises(InferenceInputError, match="no chat template"):
            runtime.generate({"kind": "chat", "messages": [{"role": "user", "content": "hi"}]})
        with pytest.raises(InferenceInputError, match="no chat template"):
            runtime.stream({"kind": "chat", "messages": [{"role": "user", "content": "hi"}]})
        assert runtime.generate({"kind": "completion", "prompt": "a", "max_tokens": 2})[
            "completion_tokens"] <= 2
    finally:
        runtime.unload()


def test_sampling_follows_temperature_and_top_p(loaded_ct2):
    payload = {"kind": "completion", "prompt": PROMPTS[2], "max_tokens": 8, "temperature": 1.5,
               "top_p": 0.9, "seed": 3}
    texts = set()
    for _ in range(4):
        result = loaded_ct2.generate(payload)
        assert 1 <= result["completion_tokens"] <= 8
        texts.add(result["text"])
    # A random tiny model is close to uniform over ~300 tokens: four samples of 8 tokens
    # that all agree would mean it did not sample.
    assert len(texts) > 1
    # top_p this small keeps only the most probable token: sampling becomes greedy.
    greedy = loaded_ct2.generate({**payload, "temperature": 0})
    assert loaded_ct2.generate({**payload, "top_p": 1e-6})["text"] == greedy["text"]


@pytest.mark.parametrize("payload, message", [
    ({"kind": "translate", "prompt": "a"}, "kind must be one of"),
    ({"kind": "completion"}, "needs prompt"),
    ({"kind": "completion", "prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"kind": "completion", "prompt": "a", "max_tokens": True}, "max_tokens"),
    ({"kind": "completion", "prompt": "a", "temperature": 2.5}, "temperature"),
    ({"kind": "completion", "prompt": "a", "top_p": 0}, "top_p"),
    ({"kind": "completion", "prompt": "a", "stop": [""]}, "stop"),
    ({"kind": "completion", "prompt": "a", "stop": 3}, "stop"),
    ({"kind": "completion", "prompt": "a", "seed": "x"}, "seed"),
    ({"kind": "chat", "messages": []}, "messages"),
    ({"kind": "chat", "messages": [{"role": "user"}]}, "messages\\[0\\]"),
    ({"kind": "embedding", "input": ["a"]}, "does not compute embeddings"),
])
def test_bad_requests_are_refused_before_any_chunk(loaded_ct2, payload, message):
    with pytest.raises(InferenceInputError, match=message):
        loaded_ct2.generate(payload)
    with pytest.raises(InferenceInputError, match=message):
        loaded_ct2.stream(payload)  # raised by the call, not by the first next()


def test_context_length_limits_prompt_and_completion(ct2_llama: Converted):
    runtime = runtime_class("ctranslate2")(
        ModelSettings(name="short", path=ct2_llama.view, parameters={"context_length": "10"}))
    runtime.load()
    try:
        prompt = PROMPTS[0]  # 7 tokens
        n = len(ct2_llama.extra(prompt)["input_ids"])
        assert n < 10
        result = runtime.generate({"kind": "completion", "prompt": prompt, "max_tokens": 50,
                                   "temperature": 0})
        assert result["completion_tokens"] <= 10 - n
        with pytest.raises(InferenceInputError, match="takes at most 10 tokens"):
            runtime.generate({"kind": "completion", "prompt": prompt * 3})
    finally:
        runtime.unload()
    # The conversion recorded the source's limit (max_position_embeddings of the config).
    loaded = runtime_class("ctranslate2")(ModelSettings(name="m", path=ct2_llama.view))
    loaded.load()
    try:
        assert loaded.context_length == ct2_llama.model.config.max_position_embeddings
    finally:
        loaded.unload()


def test_closing_a_stream_stops_generation(ct2_llama: Converted):
    # Greedy from this prompt runs thousands of tokens without an end token (about 2 ms
    # each here): closing after the first chunk must stop CTranslate2, not wait for it.
    runtime = runtime_class("ctranslate2")(
        ModelSettings(name="long", path=ct2_llama.view, parameters={"context_length": 10**6}))
    runtime.load()
    try:
        stream = runtime.stream({"kind": "completion", "prompt": PROMPTS[0],
                                 "max_tokens": 100_000, "temperature": 0})
        assert next(stream) == {"text": ""}
        first = next(stream)
        assert first["text"] and "finish_reason" not in first
        assert runtime.generator.num_active_batches == 1
        started = time.monotonic()
        stream.close()
        assert time.monotonic() - started < 2
        # CTranslate2 retires the batch just after the result it waited on is set.
        while runtime.generator.num_active_batches and time.monotonic() - started < 3:
            time.sleep(0.01)
        assert runtime.generator.num_active_batches == 0
        # and the model still answers
        assert runtime.generate({"kind": "completion", "prompt": "a", "max_tokens": 2})
        stats = runtime.stats()
        assert stats["cancelled_streams"] == 1
        assert 3 <= stats["generated_tokens"] < 1000
    finally:
        runtime.unload()


def test_a_translator_or_a_directory_without_tokenizer_fails_to_load(ct2_llama: Converted,
                                                                     tmp_path: Path):
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("model.bin", "config.json", "vocabulary.json"):
        shutil.copy(ct2_llama.view / name, bare / name)
    assert resolve(bare).runtime == "ctranslate2"  # CTranslate2's own converter output
    runtime = runtime_class("ctranslate2")(ModelSettings(name="x", path=bare))
    with pytest.raises(ModelLoadError, match="tokenizer"):
        runtime.load()
    (bare / "cachemesh-convert.json").write_text(
        '{"runtime": {"engine": "ctranslate2", "class": "Translator"}}')
    with pytest.raises(ModelLoadError, match="Translator"):
        runtime_class("ctranslate2")(ModelSettings(name="x", path=bare)).load()


# -- through a real server: KServe V2, and OpenAI -------------------------------------------


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory: pytest.TempPathFactory,
               ct2_llama: Converted) -> Iterator[RunningServer]:
    spec = ModelSpec(name="llama", source=str(ct2_llama.view), eager=True)
    with RunningServer(serve_settings(tmp_path_factory.mktemp("home")), [spec]) as server:
        server.wait_ready()
        yield server


@pytest.mark.slow
def test_v2_text_input_through_a_server(llm_server: RunningServer, loaded_ct2):
    server = llm_server
    meta = server.client.get("/v2/models/llama").json()
    assert meta["platform"] == "ctranslate2"
    # The model's measured size is the model's (weights, tokenizer, CTranslate2's buffers:
    # about 4 MB here), not the frameworks it imports (torch alone is 200 MB).
    size = server.client.get("/api/v1/models/llama").json()["size_bytes"]
    assert 0 < size < 50 * 2**20, size
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [2],
                        "data": PROMPTS[:2]}],
            "parameters": {"max_tokens": 5, "temperature": 0}}
    r = server.client.post("/v2/models/llama/infer", content=orjson.dumps(body))
    assert r.status_code == 200, r.text
    [out] = r.json()["outputs"]
    assert out["name"] == "text_output" and out["shape"] == [2]
    assert out["data"] == [
        loaded_ct2.generate({"kind": "completion", "prompt": p, "max_tokens": 5,
                             "temperature": 0})["text"] for p in PROMPTS[:2]]
    body["inputs"][0]["datatype"] = "FP32"
    body["inputs"][0]["data"] = [1.0, 2.0]
    r = server.client.post("/v2/models/llama/infer", content=orjson.dumps(body))
    assert r.status_code == 400 and "BYTES input" in r.text


@pytest.mark.slow
def test_openai_client_end_to_end(llm_server: RunningServer, loaded_ct2):
    """The OpenAI endpoints (serve/adapters/openai.py) serve this runtime unchanged."""
    pytest.importorskip("cachemesh.serve.adapters.openai",
                        reason="the OpenAI endpoints have not landed")
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{llm_server.url}/v1", api_key="unused", max_retries=0)
    assert "llama" in [m.id for m in client.models.list()]

    prompt = PROMPTS[0]
    want = loaded_ct2.generate({"kind": "completion", "prompt": prompt, "max_tokens": 8,
                                "temperature": 0})
    answer = client.completions.create(model="llama", prompt=prompt, max_tokens=8,
                                       temperature=0)
    assert answer.choices[0].text == want["text"]
    assert answer.choices[0].finish_reason == want["finish_reason"]
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == \
        (want["prompt_tokens"], want["completion_tokens"])
    stream = client.completions.create(model="llama", prompt=prompt, max_tokens=8,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == want["text"]

    messages = [{"role": "user", "content": "the quick brown fox"}]
    want = loaded_ct2.generate({"kind": "chat", "messages": messages, "max_tokens": 8,
                                "temperature": 0})
    chat = client.chat.completions.create(model="llama", messages=messages, max_tokens=8,
                                          temperature=0)
    assert chat.choices[0].message.content == want["text"]
    assert chat.usage.completion_tokens == want["completion_tokens"]
    stream = client.chat.completions.create(model="llama", messages=messages, max_tokens=8,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        want["text"]
    assert len(want["text"]) >= 4, want
    stop = want["text"][2:4]
    cut = client.chat.completions.create(model="llama", messages=messages, max_tokens=8,
                                         temperature=0, stop=[stop])
    assert cut.choices[0].message.content == want["text"][:want["text"].index(stop)]
    assert cut.choices[0].finish_reason == "stop"
