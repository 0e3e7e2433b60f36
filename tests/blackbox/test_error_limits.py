"""The rows of error_table.py that need a server with tight limits, and a draining one.

``tight``: one worker, 2 requests in flight at most, one load at a time with one
waiting, 2 s per request, and a memory factor that predicts any model over 100 KiB
on disk larger than the budget. ``draining``: a server that got SIGTERM while a
request was in flight.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from tests.blackbox.conftest import Server, cm, environ, toy_spec, wait_until
from tests.blackbox.error_table import TABLE

# The scenarios this module checks, per surface (test_error_table.py checks that every
# surface of every row is checked somewhere).
REST = {"model-over-budget", "request-deadline", "too-many-in-flight", "load-queue-full",
        "draining"}
GRPC = set(REST)
CLI = {"model-over-budget"}


def expected(surface: str, scenario: str) -> Any:
    assert scenario in {"http": REST, "grpc": GRPC, "exit": CLI}[surface]
    return getattr(TABLE[scenario], surface)


def infer(server: Server, model: str, **parameters: Any) -> httpx.Response:
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
            "parameters": parameters}
    return server.http.post(f"/v2/models/{model}/infer", json=body, headers=server.infer)


def grpc_code(call: Callable[[], Any]) -> str:
    from tritonclient.utils import InferenceServerException

    try:
        call()
    except InferenceServerException as exc:
        return exc.status().removeprefix("StatusCode.")
    except grpc.RpcError as exc:
        return exc.code().name
    raise AssertionError("the call succeeded")


def grpc_infer(server: Server, model: str, **parameters: Any) -> str:
    import tritonclient.grpc as tg

    x = tg.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    return grpc_code(lambda: server.grpc().infer(model, [x], headers=server.infer,
                                                 parameters=parameters or None))


def grpc_load(server: Server, model: str) -> str:
    return grpc_code(lambda: server.grpc().load_model(model, headers=server.control))


def in_background(fn: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def serve(tmp: Path, origins: Path, *args: str, **env: str) -> Server:
    home = tmp / "home"
    return Server(home, "--workers", "1", "--copy-rate", "0", *args,
                  env=environ(home, CACHEMESH_SERVE_SOURCE_ROOTS=str(origins), **env))


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory, origins: Path) -> Iterator[Server]:
    server = serve(tmp_path_factory.mktemp("tight"), origins, "--memory", "256MiB",
                   CACHEMESH_SERVE_MEMORY_FACTOR="2048", CACHEMESH_SERVE_MAX_INFLIGHT="2",
                   CACHEMESH_SERVE_LOAD_CONCURRENCY="1", CACHEMESH_SERVE_LOAD_QUEUE="1",
                   CACHEMESH_SERVE_REQUEST_TIMEOUT="2")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_model_over_budget(tight: Server, origins: Path):
    tight.deploy(toy_spec(origins, "lim-big", disk_bytes=2**20))  # predicted 2 GiB
    r = tight.http.post("/v2/repository/models/lim-big/load", headers=tight.control)
    assert r.status_code == expected("http", "model-over-budget"), r.text
    assert "needs" in r.json()["error"] and "more than the memory budget" in r.json()["error"]
    assert grpc_load(tight, "lim-big") == expected("grpc", "model-over-budget")

    # A rollout to a version over the budget: refused, and the command says so.
    small = toy_spec(origins, "lim-roll")
    big = toy_spec(origins, "lim-roll-big", disk_bytes=2**20)
    env = {**tight.env, "CACHEMESH_URL": tight.url}
    versions = {"v1": {k: small[k] for k in ("source", "runtime", "parameters")}}
    doc = origins.parent / "lim-roll.json"
    doc.write_text(json.dumps({"name": "lim-roll", "versions": versions}))
    cm(env, "models", "apply", str(doc))
    versions["v2"] = {k: big[k] for k in ("source", "runtime", "parameters")}
    doc.write_text(json.dumps({"name": "lim-roll", "versions": versions,
                                             "traffic": {"v2": 100}}))
    proc = cm(env, "models", "apply", str(doc), check=False)
    assert proc.returncode == expected("exit", "model-over-budget"), proc.stderr
    assert proc.stderr.startswith("error: ") and "(HTTP 507)" in proc.stderr
    assert tight.model("lim-roll")["traffic"] == {"v1": 100}  # traffic stays as it was


def test_request_deadline(tight: Server, origins: Path):
    tight.deploy(toy_spec(origins, "lim-late"))
    assert tight.http.post("/v2/repository/models/lim-late/load",
                           headers=tight.control).status_code == 200
    answers: list[httpx.Response] = []
    slow = in_background(lambda: answers.append(infer(tight, "lim-late", delay=3.0)))
    wait_until(lambda: tight.model("lim-late")["inflight"] == 1, 10, "the slow request")
    # Queued behind the slow one in the worker, the gRPC call misses its deadline too.
    assert grpc_infer(tight, "lim-late") == expected("grpc", "request-deadline")
    slow.join()
    assert answers[0].status_code == expected("http", "request-deadline"), answers[0].text
    assert "did not answer within 2s" in answers[0].json()["error"]


def test_too_many_in_flight(tight: Server, origins: Path):
    tight.deploy(toy_spec(origins, "lim-busy"))
    assert infer(tight, "lim-busy").status_code == 200
    slow = [in_background(lambda: infer(tight, "lim-busy", delay=0.7)) for _ in range(2)]
    wait_until(lambda: tight.model("lim-busy")["inflight"] == 2, 10, "two requests in flight")
    r = infer(tight, "lim-busy")
    assert r.status_code == expected("http", "too-many-in-flight"), r.text
    assert r.headers["retry-after"] == "1"
    assert grpc_infer(tight, "lim-busy") == expected("grpc", "too-many-in-flight")
    for thread in slow:
        thread.join()
    assert infer(tight, "lim-busy").status_code == 200  # room again


def test_load_queue_full(tight: Server, origins: Path):
    for i in range(4):
        tight.deploy(toy_spec(origins, f"lim-q{i}", load_delay=1.5))
    for i in range(4):
        tight.wait_state(f"lim-q{i}", "Unloaded")
    loading = [in_background(lambda i=i: tight.http.post(
        f"/v2/repository/models/lim-q{i}/load", headers=tight.control)) for i in range(2)]
    # One loads, one waits: the queue (CACHEMESH_SERVE_LOAD_QUEUE=1) is full.
    wait_until(lambda: all(tight.model(f"lim-q{i}")["state"] == "Loading" for i in range(2)),
               10, "two loads")
    r = tight.http.post("/v2/repository/models/lim-q2/load", headers=tight.control)
    assert r.status_code == expected("http", "load-queue-full"), r.text
    assert r.headers["retry-after"] == "2"
    assert grpc_load(tight, "lim-q3") == expected("grpc", "load-queue-full")
    for thread in loading:
        thread.join()
    assert [tight.model(f"lim-q{i}")["state"] for i in range(4)] == [
        "Ready", "Ready", "Unloaded", "Unloaded"]


def test_draining(tmp_path: Path, origins: Path):
    server = serve(tmp_path, origins)
    try:
        server.deploy(toy_spec(origins, "lim-drain"))
        assert infer(server, "lim-drain").status_code == 200
        answers: list[httpx.Response] = []
        slow = in_background(lambda: answers.append(infer(server, "lim-drain", delay=2.0)))
        wait_until(lambda: server.model("lim-drain")["inflight"] == 1, 10, "the request")
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: server.http.get("/v2/health/ready").status_code == 503, 10,
                   "readiness to turn false")
        r = infer(server, "lim-drain")
        assert r.status_code == expected("http", "draining"), r.text
        assert r.json() == {"error": "the server is shutting down"}
        assert r.headers["retry-after"] == "1"
        assert grpc_infer(server, "lim-drain") == expected("grpc", "draining")
        slow.join()
        assert answers[0].status_code == 200  # what was in flight finished
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
