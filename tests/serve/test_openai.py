"""The OpenAI endpoints, through the real ``openai`` client, against a real server.

One server for the module (uvicorn on loopback, one worker process) serves tiny
models built on the spot: a Llama with a chat template (``chatty``), one
without (``plain``), a BERT embedder, and two LoRA adapters whose base comes
from a third cache.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from cachemesh.caches import Caches
from cachemesh.serve.core.registry import ModelSpec
from tests.runtimes.llms import TinyLLMs, tiny_llms
from tests.serve.conftest import RunningServer, serve_settings

__all__ = ["tiny_llms"]  # the session fixture, shared here

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory: pytest.TempPathFactory, tiny_llms: TinyLLMs
               ) -> Iterator[RunningServer]:
    base = f"file://{tiny_llms.chat}"
    specs = [
        ModelSpec(name="chatty", source=str(tiny_llms.chat)),  # runtime detected
        ModelSpec(name="plain", source=str(tiny_llms.plain), runtime="transformers"),
        ModelSpec(name="embedder", source=str(tiny_llms.embedder)),
        ModelSpec(name="lora-a", source=str(tiny_llms.adapters[0]), parameters={"base": base}),
        ModelSpec(name="lora-b", source=str(tiny_llms.adapters[1]), parameters={"base": base}),
    ]
    settings = serve_settings(tmp_path_factory.mktemp("llm-home"), workers=1)
    with RunningServer(settings, specs) as server:
        server.wait_ready()
        yield server


@pytest.fixture
def client(llm_server: RunningServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=llm_server.url + "/v1", api_key="unused", max_retries=0,
                      timeout=120)
    yield c
    c.close()


def model_stats(server: RunningServer, name: str) -> dict[str, float]:
    """The runtime's own counters, from the worker that holds the model."""
    body = server.client.get(f"/api/v1/models/{name}/stats").json()
    assert body["loaded"], f"{name} is not loaded"
    return body["stats"]


def worker_of(server: RunningServer, name: str) -> int:
    (copy,) = server.client.get(f"/api/v1/models/{name}/stats").json()["copies"]
    return copy["worker"]


def test_models_are_listed(client: openai.OpenAI):
    ids = {m.id for m in client.models.list()}
    assert {"chatty", "plain", "embedder", "lora-a", "lora-b"} <= ids
    assert client.models.retrieve("chatty").id == "chatty"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_completion_is_greedy_and_counts_its_tokens(client: openai.OpenAI):
    first = client.completions.create(model="chatty", prompt=PROMPT, max_tokens=8, temperature=0)
    again = client.completions.create(model="chatty", prompt=PROMPT, max_tokens=8, temperature=0)
    assert first.choices[0].text == again.choices[0].text != ""
    assert first.choices[0].finish_reason == "length"
    assert first.usage.completion_tokens == 8 and first.usage.prompt_tokens > 0
    # A stop string cuts the text before it, and the finish reason says so.
    text = first.choices[0].text
    stop = text[3:5]
    if stop.strip():
        cut = client.completions.create(model="chatty", prompt=PROMPT, max_tokens=8,
                                        temperature=0, stop=[stop])
        assert cut.choices[0].text == text[:text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client: openai.OpenAI):
    a = client.completions.create(model="chatty", prompt=PROMPT, max_tokens=10, temperature=1.5,
                                  seed=11)
    b = client.completions.create(model="chatty", prompt=PROMPT, max_tokens=10, temperature=1.5,
                                  seed=11)
    assert a.choices[0].text == b.choices[0].text


def test_chat_and_streaming_chat_agree(client: openai.OpenAI):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="chatty", messages=messages, max_tokens=12,
                                           temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(
        model="chatty", messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == whole.choices[0].message.content
    assert sum(1 for d in deltas if d) > 1  # it streamed, not one lump
    finals = [c.choices[0].finish_reason for c in chunks
              if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_streaming_completion(client: openai.OpenAI):
    whole = client.completions.create(model="chatty", prompt=PROMPT, max_tokens=6, temperature=0)
    parts = list(client.completions.create(model="chatty", prompt=PROMPT, max_tokens=6,
                                           temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == "length"


def test_embeddings_float_and_base64(client: openai.OpenAI):
    texts = ["the quick brown fox", "a model cache"]
    as_b64 = client.embeddings.create(model="embedder", input=texts)  # the client asks base64
    as_float = client.embeddings.create(model="embedder", input=texts, encoding_format="float")
    a = np.array([d.embedding for d in as_b64.data])
    b = np.array([d.embedding for d in as_float.data])
    assert a.shape == (2, 32)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(a[0], a[1])
    assert as_float.usage.prompt_tokens > 0
    one = client.embeddings.create(model="embedder", input="a model cache",
                                   encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, b[1], rtol=1e-5)


def test_chat_without_a_template_is_a_clear_400(client: openai.OpenAI):
    messages = [{"role": "user", "content": "hello"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="plain", messages=messages, max_tokens=4)
    assert "chat template" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="plain", messages=messages, max_tokens=4,
                                       stream=True)
    assert "chat template" in str(err.value)
    # Completions on the same model work.
    assert client.completions.create(model="plain", prompt=PROMPT, max_tokens=3).usage


def test_bad_requests_are_4xx(client: openai.OpenAI, llm_server: RunningServer):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="does not generate"):
        client.completions.create(model="embedder", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        client.chat.completions.create(model="chatty", max_tokens=2,
                                       messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.completions.create(model="chatty", prompt=PROMPT, max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="chatty", prompt=PROMPT, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="tokens"):
        client.completions.create(model="chatty", prompt="fox " * 5000, max_tokens=2)
    c = llm_server.client
    for body in (b"{", b"[]", b'{"model": "chatty"}', b'{"model": "chatty", "prompt": [1, 2]}',
                 b'{"model": "chatty", "prompt": "\\ud800"}'):
        r = c.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    for body in (b'{"model": "chatty", "messages": [{"role": "user", "content": "\\ud800"}]}',
                 b'{"model": "chatty", "messages": [{"role": "\\udfff", "content": "hi"}]}',
                 b'{"model": "chatty", "messages": [{"role": "user", "content": [{"type":'
                 b' "text", "text": "\\ud800"}]}]}',
                 b'{"model": "chatty", "messages": []}'):
        r = c.post("/v1/chat/completions", content=body,
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (body, r.text)


def test_a_disconnected_stream_stops_generating(llm_server: RunningServer):
    """The client reads a few chunks of a long generation and goes away: the worker
    stops within a few tokens instead of generating all 3000."""
    loaded = llm_server.client.get("/api/v1/models/chatty/stats").json()["loaded"]
    before = model_stats(llm_server, "chatty") if loaded else {
        "generated_tokens": 0, "cancelled_streams": 0}
    body = {"model": "chatty", "prompt": PROMPT, "max_tokens": 3000, "temperature": 0,
            "stream": True}
    with httpx.Client(base_url=llm_server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    json.loads(line[6:])
                    events += 1
                if events >= 3:
                    break
    # The count stops moving well short of 3000.
    deadline = time.monotonic() + 30
    last = -1.0
    while time.monotonic() < deadline:
        stats = model_stats(llm_server, "chatty")
        if stats["generated_tokens"] == last and stats["cancelled_streams"] > before[
                "cancelled_streams"]:
            break
        last = stats["generated_tokens"]
        time.sleep(0.3)
    generated = stats["generated_tokens"] - before["generated_tokens"]
    assert stats["cancelled_streams"] == before["cancelled_streams"] + 1
    assert 3 <= generated < 1000, generated
    # The model still answers.
    r = httpx.post(llm_server.url + "/v1/completions", timeout=60,
                   json={"model": "chatty", "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200


def test_adapters_from_their_own_caches_share_one_base(client: openai.OpenAI,
                                                       llm_server: RunningServer):
    def greedy(model: str) -> str:
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=8,
                                         temperature=0).choices[0].text

    base, a, b = greedy("chatty"), greedy("lora-a"), greedy("lora-b")
    assert len({base, a, b}) == 3  # each adapter changes the output
    # Interleaved requests to both adapters each keep their own answer.
    with openai.OpenAI(base_url=llm_server.url + "/v1", api_key="x", max_retries=0) as c2:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(lambda m: c2.completions.create(
                model=m, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text, m)
                for m in ["lora-a", "lora-b"] * 3]
            assert [f.result() for f in futures] == [a, b] * 3
    # One worker holds both adapters and built their base once.
    assert worker_of(llm_server, "lora-a") == worker_of(llm_server, "lora-b")
    assert model_stats(llm_server, "lora-b")["base_loads"] == 1
    # The base came through a cache of its own, apart from the adapters' caches.
    caches = {c.name: c.source for c in Caches(llm_server.settings).list()}
    assert caches["lora-a"] != caches["lora-b"]
    assert any(src.startswith("file://") and src.endswith("/chat")
               for name, src in caches.items() if name not in ("chatty",)), caches
    # Unloading one adapter leaves the other (and the base) working.
    assert llm_server.client.post("/v2/repository/models/lora-a/unload").status_code == 200
    assert greedy("lora-b") == b
    assert model_stats(llm_server, "lora-b")["base_loads"] == 1
    assert greedy("lora-a") == a  # loads again over the same base


def test_runtime_stats_over_the_control_api(llm_server: RunningServer):
    c = llm_server.client
    c.post("/v1/completions", json={"model": "chatty", "prompt": PROMPT, "max_tokens": 2})
    r = c.get("/api/v1/models/chatty/stats")
    assert r.status_code == 200
    body = r.json()
    assert body["loaded"] is True
    assert body["stats"]["generated_tokens"] >= 2
    assert body["stats"]["weights_s"] > 0 and "imports_s" in body["stats"]
    assert c.get("/api/v1/models/nope/stats").status_code == 404


@pytest.mark.slow
def test_the_framework_is_imported_before_the_first_request(tmp_path, tiny_llms: TinyLLMs):
    """A declared transformers model makes the workers import torch and transformers
    at once (Runtime.preload_at_start): the first request finds them imported."""
    settings = serve_settings(tmp_path / "home", workers=1)
    with RunningServer(settings, [ModelSpec(name="chatty", source=str(tiny_llms.chat))]) as s:
        s.wait_ready()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            (worker,) = s.client.get("/api/v1/models").json()["memory"]["workers"]
            if worker["rss_bytes"] > worker["base_bytes"] + 150 * 1024**2:
                break  # torch is in
            time.sleep(0.2)
        else:
            raise AssertionError(f"the worker never imported its framework: {worker}")
        assert s.client.get("/api/v1/models/chatty").json()["state"] == "Unloaded"
        asked = time.time()
        r = s.client.post("/v1/completions", json={"model": "chatty", "prompt": PROMPT,
                                                  "max_tokens": 1})
        assert r.status_code == 200
        stats = s.client.get("/api/v1/models/chatty/stats").json()["stats"]
        # The imports began before the request (they may still have been running).
        assert stats["imports_started_at"] < asked < stats["load_started_at"]
        assert stats["imports_started_at"] < stats["imports_done_at"] <= stats["load_started_at"]


def test_an_adapters_base_is_a_source_under_the_same_rules(llm_server: RunningServer,
                                                            tiny_llms: TinyLLMs):
    """base= is pulled by the worker: a deploy checks it as it checks the source (here,
    a path into the store itself is refused before anything is kept)."""
    c = llm_server.client
    spec = {"name": "sneaky", "source": str(tiny_llms.adapters[0]),
            "parameters": {"base": str(llm_server.settings.home / "blobs")}}
    r = c.post("/api/v1/models", json=spec)
    assert r.status_code == 400, r.text
    assert c.get("/api/v1/models/sneaky").status_code == 404


def metric(server: RunningServer, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when the series does not exist yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(server.client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return sample.value
    return 0.0


def test_metrics_count_openai_traffic_under_vllm_names(client: openai.OpenAI,
                                                        llm_server: RunningServer):
    before = {
        "ok": metric(llm_server, "cachemesh_requests_total", model="chatty", outcome="ok"),
        "latency": metric(llm_server, "cachemesh_request_duration_seconds_count", model="chatty"),
        "prompt": metric(llm_server, "vllm:prompt_tokens_total", model_name="chatty"),
        "generated": metric(llm_server, "vllm:generation_tokens_total", model_name="chatty"),
        "ttft": metric(llm_server, "vllm:time_to_first_token_seconds_count",
                       model_name="chatty"),
        "tpot": metric(llm_server, "vllm:time_per_output_token_seconds_count",
                       model_name="chatty"),
    }
    done = client.completions.create(model="chatty", prompt=PROMPT, max_tokens=5, temperature=0)
    chunks = list(client.chat.completions.create(
        model="chatty", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert metric(llm_server, "cachemesh_requests_total", model="chatty",
                  outcome="ok") == before["ok"] + 2
    assert metric(llm_server, "cachemesh_request_duration_seconds_count",
                  model="chatty") == before["latency"] + 2
    assert metric(llm_server, "vllm:prompt_tokens_total", model_name="chatty") == (
        before["prompt"] + done.usage.prompt_tokens + usage.prompt_tokens)
    assert metric(llm_server, "vllm:generation_tokens_total", model_name="chatty") == (
        before["generated"] + done.usage.completion_tokens + usage.completion_tokens)
    # time to first token and per output token: the streamed request only
    assert metric(llm_server, "vllm:time_to_first_token_seconds_count",
                  model_name="chatty") == before["ttft"] + 1
    assert metric(llm_server, "vllm:time_per_output_token_seconds_count",
                  model_name="chatty") == before["tpot"] + 1
    assert metric(llm_server, "vllm:num_requests_running", model_name="chatty") == 0
    assert metric(llm_server, "vllm:num_requests_waiting", model_name="chatty") == 0
    # an embedding request counts as a request, not as generated tokens
    generated = metric(llm_server, "vllm:generation_tokens_total", model_name="embedder")
    client.embeddings.create(model="embedder", input="hello")
    assert metric(llm_server, "cachemesh_requests_total", model="embedder", outcome="ok") >= 1
    assert metric(llm_server, "vllm:generation_tokens_total", model_name="embedder") == generated
