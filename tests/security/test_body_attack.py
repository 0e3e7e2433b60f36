"""A large JSON body must not stall the server nor blow up its memory (issue 22, item 6).

The attack: a body of nested ``[[0],[0],...]`` under the body limit. orjson made a
Python list of every ``[0]`` (30 bytes of memory a body byte) and held the event
loop while it did, so health probes waited seconds. Now such arrays are read by
numpy off the event loop, and every large body holds an estimate of its parse
memory in one budget: past it 503 + Retry-After, over all of it 413.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import orjson
import psutil

from tests.faults.conftest import ServeProcess, home, servers, toy_model_dir
from tests.serve.conftest import RunningServer, serve_settings, toy_model

__all__ = ["home", "servers"]  # the fault campaign's fixtures: a real server process

MiB = 1024**2


def nested_body(mib: float, tail: bytes = b"") -> bytes:
    """About ``mib`` MiB of ``[[0],[0],...]`` as one FP32 tensor; ``tail``: more fields."""
    n = int(mib * MiB) // 4
    return (b'{"inputs":[{"name":"x","shape":[%d,1],"datatype":"FP32","data":[' % n
            + b",".join([b"[0]"] * n) + b"]}]" + tail + b"}")


def test_a_nested_body_neither_stalls_the_server_nor_grows_it(home: Path, servers: list,
                                                              tmp_path: Path):
    model = toy_model_dir(tmp_path, "sink")
    server = ServeProcess(home, [f"sink={model},runtime=custom,class=toy:Echo,eager=true"],
                          env={"CACHEMESH_SERVE_GRPC_PORT": "0"})  # 8033 may be taken
    servers.append(server)
    server.wait_live()
    process = psutil.Process(server.proc.pid)
    # The toy refuses the request once the tensor has reached it: no large answer.
    body = nested_body(16, b',"parameters":{"fail":"input"}')
    base = process.memory_info().rss
    peak, latencies, done = base, [], threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not done.is_set():
                started = time.monotonic()
                assert c.get("/v2/health/live").status_code == 200
                latencies.append(time.monotonic() - started)
                time.sleep(0.02)

    def sample() -> None:  # apart from the probes: those wait while the server stalls
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.01)

    threads = [threading.Thread(target=probe), threading.Thread(target=sample)]
    for t in threads:
        t.start()
    try:
        answer = server.client.post("/v2/models/sink/infer", content=body, timeout=300)
    finally:
        done.set()
        for t in threads:
            t.join(60)
    assert answer.status_code == 400, answer.text[:300]
    assert answer.json() == {"error": "the toy rejects this request"}
    growth = peak - base
    # Before: 527 MiB for this 16 MiB body (33 bytes a body byte), probes waited 3.5 s.
    # Now about 6.6: the body received (twice: chunks, joined), parsed (3.5), the
    # tensor and its copy to the worker.
    assert growth < 12 * len(body), f"the server grew by {growth / MiB:.0f} MiB"
    assert max(latencies) < 1.5, f"a health probe waited {max(latencies):.2f} s"
    print(f"growth {growth / MiB:.0f} MiB, slowest probe {max(latencies):.3f} s")


def test_the_parse_budget_answers_503_then_413(tmp_path: Path):
    root = tmp_path / "models"
    settings = serve_settings(tmp_path / "home", max_body=8 * MiB, parse_memory=24 * MiB)
    with RunningServer(settings, [toy_model(root, "echo", eager=True)]) as server:
        server.wait_ready()
        budget = server.server.config.app.state.parse_budget
        body = nested_body(2)  # about 16 MiB of the budget while it is parsed
        with budget.hold(10 * MiB):  # another large request being parsed
            busy = server.client.post("/v2/models/echo/infer", content=body)
        assert busy.status_code == 503, busy.text
        assert busy.headers["retry-after"] == "1"
        assert "parsing other large requests" in busy.json()["error"]
        assert budget.used == 0
        ok = server.client.post("/v2/models/echo/infer", content=body)
        assert ok.status_code == 200, ok.text[:300]
        # Strings are orjson's: ~256 bytes a value, over the whole budget for 4 MiB.
        strings = orjson.dumps({"inputs": [{"name": "x", "shape": [1024 * 1024],
                                            "datatype": "BYTES", "data": ["abc"] * 1024**2}]})
        big = server.client.post("/v2/models/echo/infer", content=strings)
        assert big.status_code == 413, big.text
        assert "CACHEMESH_SERVE_PARSE_MEMORY" in big.json()["error"]
        assert budget.used == 0
        assert server.client.get("/v2/health/ready").status_code == 200
        # Small requests never touch the budget.
        with budget.hold(24 * MiB):
            small = server.client.post("/v2/models/echo/infer", json={"inputs": [
                {"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]})
        assert small.status_code == 200
