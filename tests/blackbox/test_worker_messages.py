"""Every message the server sends its workers, and every kind of answer, through requests.

The server talks to each worker process over a socket (load, unload, infer,
generate, stream, stats, cancel, preload; answered by ready, ok, error, chunk,
end). These tests send the requests that make the server send each of them and
check what comes back, so that the messages can be retyped without a change a
user could see:

    message                    test
    READY (a worker started)   every test (the server is ready); test_a_worker_that_dies_is_replaced
    LOAD, its OK reply         test_load_and_unload_through_the_repository
    UNLOAD                     test_load_and_unload_through_the_repository
    INFER: JSON, binary, gRPC  test_infer_round_trips_tensors_exactly
    INFER, several read at     test_requests_that_arrive_together_get_their_own_answers
      once (one merged call)
    GENERATE                   test_generate_completion_chat_and_embeddings
    STREAM: CHUNK..., END      test_stream_chunks_arrive_in_order_and_end
    STREAM: ERROR              test_stream_errors_before_and_after_the_first_chunk
    CANCEL                     test_a_client_that_leaves_cancels_the_stream
    STATS                      test_runtime_stats_are_the_workers_counters
    PRELOAD                    test_a_deployed_transformers_model_is_preloaded
    a worker's death: in an    test_a_worker_that_dies_is_replaced,
      INFER, a LOAD, a STREAM    test_a_worker_that_dies_in_a_load_or_a_stream

ERROR replies for an input the model refuses, a model that raises and a load
that fails are in test_error_table.py, with their status codes.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.blackbox.conftest import Server, toy_spec, wait_until


def v2_body(array: np.ndarray, **parameters: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": list(array.shape), "datatype": "FP32",
                        "data": array.ravel().tolist()}], "parameters": parameters}


def infer(server: Server, model: str, array: np.ndarray, **parameters: Any) -> Any:
    return server.http.post(f"/v2/models/{model}/infer", json=v2_body(array, **parameters),
                            headers=server.infer)


def sse(server: Server, path: str, body: dict[str, Any]) -> tuple[int, list[Any]]:
    """A streamed OpenAI request: the status and the events (JSON, or the final "[DONE]")."""
    with server.http.stream("POST", path, json=body, headers=server.infer) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.json()]
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    return 200, [e if e == "[DONE]" else json.loads(e) for e in events]


def test_load_and_unload_through_the_repository(server: Server, origins: Path):
    marks = origins.parent / "marks-load"
    server.deploy(toy_spec(origins, "msg-load", size=123456, marks=marks))
    assert server.wait_state("msg-load", "Unloaded")["loads"] == 0

    r = server.http.post("/v2/repository/models/msg-load/load", headers=server.control)
    assert (r.status_code, r.json()) == (200, {})
    status = server.model("msg-load")
    # The worker's LOAD reply carries the size the runtime reports and its metadata.
    assert (status["state"], status["size_bytes"], status["loads"]) == ("Ready", 123456, 1)
    assert len(status["workers"]) == 1
    meta = server.http.get("/v2/models/msg-load", headers=server.infer).json()
    assert meta == {"name": "msg-load", "versions": ["default"], "platform": "blackbox-toy",
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                    "outputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]}
    ready = server.http.get("/v2/models/msg-load/ready", headers=server.infer)
    assert (ready.status_code, ready.json()) == (200, {"name": "msg-load", "ready": True})
    holder = status["workers"][0]
    held = {w["id"]: w["models"] for w in server.workers()}
    assert "msg-load" in held[holder]

    r = server.http.post("/v2/repository/models/msg-load/unload", headers=server.control)
    assert (r.status_code, r.json()) == (200, {})
    assert server.model("msg-load")["state"] == "Unloaded"
    ready = server.http.get("/v2/models/msg-load/ready", headers=server.infer)
    assert (ready.status_code, ready.json()) == (400, {"name": "msg-load", "ready": False})
    assert "msg-load" not in {m for w in server.workers() for m in w["models"]}
    assert len(list(marks.glob("unload-*"))) == 1  # the runtime's unload ran in the worker

    # The next request loads it again.
    assert infer(server, "msg-load", np.ones((1, 4), np.float32)).status_code == 200
    assert server.model("msg-load")["loads"] == 2
    assert len(list(marks.glob("load-*"))) == 2


def test_infer_round_trips_tensors_exactly(server: Server, origins: Path):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    server.deploy(toy_spec(origins, "msg-echo"))
    small = np.arange(8, dtype=np.float32).reshape(2, 4) / 4  # exact in JSON
    r = infer(server, "msg-echo", small)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "msg-echo"
    assert body["outputs"] == [{"name": "x", "datatype": "FP32", "shape": [2, 4],
                                "data": small.ravel().tolist()}]
    assert isinstance(body["parameters"]["pid"], int)

    # 256 KiB in (travels out of band to the worker), 2 MiB back (a large frame).
    big = np.random.default_rng(0).random((16384, 4), dtype=np.float32)
    client = th.InferenceServerClient(server.url.removeprefix("http://"))
    x = th.InferInput("x", list(big.shape), "FP32")
    x.set_data_from_numpy(big, binary_data=True)
    out = client.infer("msg-echo", [x], headers=server.infer, parameters={"repeat": 8},
                       outputs=[th.InferRequestedOutput("x", binary_data=True)])
    assert np.array_equal(out.as_numpy("x"), np.concatenate([big] * 8))

    g = tg.InferInput("x", list(big.shape), "FP32")
    g.set_data_from_numpy(big)
    out = server.grpc().infer("msg-echo", [g], headers=server.infer, parameters={"repeat": 2})
    assert np.array_equal(out.as_numpy("x"), np.concatenate([big] * 2))


def test_requests_that_arrive_together_get_their_own_answers(server: Server):
    rows = np.random.default_rng(1).random((24, 64), dtype=np.float32)

    def predict(row: np.ndarray) -> list[int]:
        r = infer(server, "digits", row.reshape(1, 64))
        assert r.status_code == 200, r.text
        return r.json()["outputs"][0]["data"]

    alone = [predict(row) for row in rows]
    assert len({a[0] for a in alone}) > 1  # the rows are not all the same class
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(predict, rows))
    assert together == alone


def test_generate_completion_chat_and_embeddings(server: Server, origins: Path):
    server.deploy(toy_spec(origins, "msg-gen"))
    r = server.http.post("/v1/completions", headers=server.infer,
                         json={"model": "msg-gen", "prompt": "one two three"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"] == [{"index": 0, "text": "three two one", "finish_reason": "stop",
                                "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert (body["object"], body["model"]) == ("text_completion", "msg-gen")

    r = server.http.post("/v1/chat/completions", headers=server.infer, json={
        "model": "msg-gen", "messages": [{"role": "user", "content": "hello there"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "there hello"}

    r = server.http.post("/v1/embeddings", headers=server.infer,
                         json={"model": "msg-gen", "input": ["a b", "c"]})
    assert r.status_code == 200, r.text
    assert [d["embedding"] for d in r.json()["data"]] == [[3.0, 2.0], [1.0, 1.0]]


def test_stream_chunks_arrive_in_order_and_end(server: Server, origins: Path):
    server.deploy(toy_spec(origins, "msg-stream"))
    status, events = sse(server, "/v1/completions",
                         {"model": "msg-stream", "prompt": "a b c", "stream": True})
    assert status == 200
    assert events[-1] == "[DONE]"
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert texts == ["c ", "b ", "a ", ""]
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, None, None, "stop"]

    status, events = sse(server, "/v1/chat/completions", {
        "model": "msg-stream", "stream": True,
        "messages": [{"role": "user", "content": "x y"}]})
    assert status == 200 and events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "y "}, {"content": "x "},
                      {}]


def test_stream_errors_before_and_after_the_first_chunk(server: Server, origins: Path):
    server.deploy(toy_spec(origins, "msg-stream-err"))
    status, events = sse(server, "/v1/completions",
                         {"model": "msg-stream-err", "prompt": "refuse this", "stream": True})
    assert status == 400
    assert events[0]["error"]["type"] == "invalid_request_error"
    assert "refuses prompts" in events[0]["error"]["message"]

    status, events = sse(server, "/v1/completions",
                         {"model": "msg-stream-err", "prompt": "break it now", "stream": True})
    assert status == 200  # the first chunk went out before the model broke
    assert events[0]["choices"][0]["text"] == "now "
    assert events[1]["error"]["type"] == "server_error"
    assert "the toy broke mid-stream" in events[1]["error"]["message"]
    assert events[-1] == "[DONE]"


def test_a_client_that_leaves_cancels_the_stream(server: Server, origins: Path):
    marks = origins.parent / "marks-cancel"
    server.deploy(toy_spec(origins, "msg-cancel", marks=marks))
    prompt = "slow " + " ".join(f"w{i}" for i in range(400))  # 20 s if nobody stops it
    started = time.monotonic()
    with server.http.stream("POST", "/v1/completions", headers=server.infer,
                            json={"model": "msg-cancel", "prompt": prompt, "stream": True}) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"] == "w399 "
    wait_until(lambda: list(marks.glob("cancelled-*")), 10, "the worker to close the stream")
    assert time.monotonic() - started < 15
    r = server.http.post("/v1/completions", headers=server.infer,
                         json={"model": "msg-cancel", "prompt": "still here"})
    assert r.json()["choices"][0]["text"] == "here still"


def test_runtime_stats_are_the_workers_counters(server: Server, origins: Path):
    server.deploy(toy_spec(origins, "msg-stats"))
    r = server.http.get("/api/v1/models/msg-stats/stats", headers=server.control)
    assert (r.status_code, r.json()) == (200, {"loaded": False, "stats": {}, "copies": []})
    for _ in range(3):
        assert infer(server, "msg-stats", np.zeros((1, 4), np.float32)).status_code == 200
    r = server.http.get("/api/v1/models/msg-stats/stats", headers=server.control)
    assert r.status_code == 200
    worker = server.model("msg-stats")["workers"][0]
    assert r.json() == {"loaded": True, "stats": {"predictions": 3.0}, "copies": [
        {"version": "default", "worker": worker, "stats": {"predictions": 3.0}}]}


def test_a_deployed_transformers_model_is_preloaded(server: Server, origins: Path):
    """A transformers model declared at run time makes the server send every worker a
    PRELOAD: the workers import torch before the model's first request."""
    before = {w["id"]: w["rss_bytes"] for w in server.workers()}
    server.deploy({"name": "msg-chat", "source": str(origins / "tiny-chat")})
    server.wait_state("msg-chat", "Unloaded")
    # torch and transformers take over 100 MiB in each worker that imported them.
    wait_until(lambda: all(w["rss_bytes"] - before.get(w["id"], 0) > 100 * 2**20
                           for w in server.workers() if w["alive"]), 60,
               "the workers to import the framework")
    asked = time.time()
    r = server.http.post("/v1/completions", headers=server.infer,
                         json={"model": "msg-chat", "prompt": "def", "max_tokens": 4})
    assert r.status_code == 200, r.text
    tokens = r.json()["usage"]["completion_tokens"]
    assert 1 <= tokens <= 4
    stats = server.http.get("/api/v1/models/msg-chat/stats", headers=server.control).json()
    s = stats["stats"]
    assert s["imports_started_at"] < asked < s["load_started_at"]
    assert s["imports_done_at"] <= s["load_started_at"]
    assert s["generated_tokens"] == tokens
    assert "preloading runtime" not in server.log()


def test_a_worker_that_dies_is_replaced(server: Server, origins: Path):
    server.deploy(toy_spec(origins, "msg-crash"))
    ok = infer(server, "msg-crash", np.ones((1, 4), np.float32))
    assert ok.status_code == 200
    pid = ok.json()["parameters"]["pid"]
    alive = {w["pid"] for w in server.workers() if w["alive"]}
    assert pid in alive and len(alive) == 2

    r = infer(server, "msg-crash", np.ones((1, 4), np.float32), fail="crash")
    assert r.status_code == 500
    assert f"(pid {pid}) exited with status 7" in r.json()["error"]
    assert "not replayed" in r.json()["error"]
    wait_until(lambda: {w["pid"] for w in server.workers() if w["alive"]} - alive, 60,
               "a new worker")
    workers = server.workers()
    assert sum(w["alive"] for w in workers) == 2
    assert pid not in {w["pid"] for w in workers}
    assert server.model("msg-crash")["state"] == "Unloaded"  # it went with its worker
    again = infer(server, "msg-crash", np.ones((1, 4), np.float32))
    assert again.status_code == 200
    assert again.json()["parameters"]["pid"] != pid
    assert server.model("msg-crash")["loads"] == 2


def test_a_worker_that_dies_in_a_load_or_a_stream(server: Server, origins: Path):
    server.deploy(toy_spec(origins, "msg-die-loading", load_fail="exit"))
    r = server.http.post("/v2/repository/models/msg-die-loading/load", headers=server.control)
    assert r.status_code == 500
    # Tried on each worker (CACHEMESH_SERVE_LOAD_ATTEMPTS=2); each died under it.
    assert r.json()["error"].count("exited with status 3 while loading the request") == 2
    model = server.model("msg-die-loading")
    assert model["state"] == "Failed" and "2 failed loads" in model["reason"]

    server.deploy(toy_spec(origins, "msg-die-streaming"))
    wait_until(lambda: sum(w["alive"] for w in server.workers()) == 2, 60, "two workers")
    status, events = sse(server, "/v1/completions",
                         {"model": "msg-die-streaming", "prompt": "die now", "stream": True})
    assert status == 500
    assert events[0]["error"]["type"] == "server_error"
    assert "exited with status 9 while handling the request" in events[0]["error"]["message"]
    wait_until(lambda: sum(w["alive"] for w in server.workers()) == 2, 60, "two workers")
    status, events = sse(server, "/v1/completions",
                         {"model": "msg-die-streaming", "prompt": "alive again", "stream": True})
    assert status == 200 and events[-1] == "[DONE]"


@pytest.fixture(autouse=True)
def _server_survives(server: Server):
    yield
    assert server.proc.poll() is None, server.log()
