"""Serving a model straight from a hub source (``--model chatty=hf://org/name``).

The Hugging Face Hub emulator holds the tiny chat model; its blob origin (where
the weights are redirected) holds the weights back until every OpenAI request
has arrived and waits, so they all arrive while the model is still being pulled.
They must all succeed, and the origin must serve its weights exactly once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import threading
import time
from pathlib import Path

import openai
import pytest

from cachemesh.serve.core.registry import parse_model_option
from tests.emulators.hf_hub import HfHubEmulator
from tests.runtimes.llms import TinyLLMs, tiny_llms
from tests.serve.conftest import RunningServer, serve_settings

__all__ = ["tiny_llms"]

CLIENTS = 12


@pytest.mark.slow
def test_concurrent_first_requests_cost_the_origin_one_copy(
        hf_env: HfHubEmulator, repo_id: str, tiny_llms: TinyLLMs, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch):
    files = {p.relative_to(tiny_llms.chat).as_posix(): p.read_bytes()
             for p in tiny_llms.chat.rglob("*") if p.is_file()}
    hf_env.commit(repo_id, files)
    weights = files["model.safetensors"]
    sha = hashlib.sha256(weights).hexdigest()
    served_before = hf_env.blob_origin.served[sha]

    slow, release = threading.Event(), threading.Event()
    original = hf_env.blob_origin.handle

    def slow_handle(*args, **kwargs):
        slow.set()
        release.wait(60)  # the weights come once every request is waiting for them
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_env.blob_origin, "handle", slow_handle)
    settings = serve_settings(tmp_path / "home", workers=1)
    settings = dataclasses.replace(settings, environ={
        **settings.environ, "HF_ENDPOINT": hf_env.url, "HF_HOME": str(tmp_path / "hf-home")})
    spec = parse_model_option(f"chatty=hf://{repo_id}")  # as `cachemesh serve --model` reads it

    with RunningServer(settings, [spec]) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                               timeout=120)
        start = threading.Barrier(CLIENTS)

        def ask(i: int) -> str:
            start.wait()
            if i % 2:
                r = client.completions.create(model="chatty", prompt="the quick brown",
                                              max_tokens=6, temperature=0)
                return r.choices[0].text
            chunks = client.chat.completions.create(
                model="chatty", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                temperature=0, stream=True)
            return "chat:" + "".join(c.choices[0].delta.content or "" for c in chunks
                                     if c.choices)

        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            try:
                futures = [pool.submit(ask, i) for i in range(CLIENTS)]
                deadline = time.monotonic() + 60
                while server.service.inflight < CLIENTS and time.monotonic() < deadline:
                    time.sleep(0.05)
                state = server.client.get("/api/v1/models/chatty").json()["state"]
                assert server.service.inflight == CLIENTS and state == "Pulling"  # not cached
            finally:
                release.set()
            answers = [f.result() for f in futures]
        assert slow.is_set()  # the weights came from the blob origin, held back until now
        client.close()
        # Every request succeeded, and identical requests got identical (greedy) answers.
        assert len(set(answers[1::2])) == 1 and len(set(answers[0::2])) == 1
        status = server.client.get("/api/v1/models/chatty").json()
        assert status["state"] == "Ready" and status["runtime"] == "transformers"
        assert status["loads"] == 1

    # The origin served one copy of the weights, whatever the number of first requests.
    assert hf_env.blob_origin.served[sha] - served_before == len(weights)
    assert hf_env.resolves[(repo_id, "model.safetensors")] == 1
