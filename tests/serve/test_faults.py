"""Real worker crashes: os._exit, a segfault, an out-of-memory under RLIMIT_AS."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from tests.serve.conftest import RunningServer, serve_settings, toy_model

BODY = orjson.dumps({"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": [1]}]})


def infer(server: RunningServer, model: str):
    return server.client.post(f"/v2/models/{model}/infer", content=BODY)


def count(log: Path, what: str) -> int:
    return len(list(log.glob(f"{what}-*"))) if log.exists() else 0


def wait_workers(server: RunningServer, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while sum(w.alive for w in server.service.workers) < n:
        assert time.monotonic() < deadline, "dead workers were not replaced"
        time.sleep(0.05)


@pytest.mark.slow
def test_crashing_loads_retry_on_other_workers_then_mark_failed(tmp_path: Path):
    log = tmp_path / "log"
    specs = [toy_model(tmp_path / "m", "segv", crash_on_load="segv", log=log / "segv"),
             toy_model(tmp_path / "m", "exits", crash_on_load="exit", log=log / "exits"),
             toy_model(tmp_path / "m", "killed", crash_on_load="kill", log=log / "killed"),
             toy_model(tmp_path / "m", "raises", crash_on_load="raise", log=log / "raises"),
             toy_model(tmp_path / "m", "fine", log=log / "fine")]
    settings = serve_settings(tmp_path / "home", workers=2, failed_ttl_s=1.5)
    with RunningServer(settings, specs) as s:
        assert infer(s, "fine").status_code == 200
        pids = {w.pid for w in s.service.workers}
        for name, fragment in [("segv", "SIGSEGV"), ("exits", "exited with status 3"),
                               ("killed", "SIGKILL (killed; out of memory?)"),
                               ("raises", "RuntimeError: the model refused to load")]:
            r = infer(s, name)
            assert r.status_code == 500, r.text
            assert "could not be loaded" in r.json()["error"] and fragment in r.json()["error"]
            assert count(log / name, "load") == 3  # three attempts, then marked failed
            status = s.client.get(f"/api/v1/models/{name}").json()
            assert status["state"] == "Failed" and fragment in status["reason"]
            # while marked failed: 503 with Retry-After, and no new load
            r = infer(s, name)
            assert r.status_code == 503 and "marked failed" in r.json()["error"]
            assert int(r.headers["retry-after"]) >= 1
            assert count(log / name, "load") == 3
        # every crash (3 segfaults, 3 exits, 3 kills) took one worker down; each was replaced
        wait_workers(s, 2)
        assert {w.pid for w in s.service.workers} != pids
        # the other model keeps serving (reloaded if its worker died)
        assert infer(s, "fine").status_code == 200
        # the mark expires: the next request tries again (and fails again, 3 more loads)
        time.sleep(1.6)
        assert s.client.get("/api/v1/models/raises").json()["state"] == "Unloaded"
        assert infer(s, "raises").status_code == 500
        assert count(log / "raises", "load") == 6
        metrics = s.client.get("/metrics").text
        assert 'cachemesh_load_failures_total{model="segv"} 3.0' in metrics
        assert "cachemesh_worker_restarts_total 9.0" in metrics


@pytest.mark.slow
def test_a_crash_while_predicting_is_a_5xx_not_replayed(tmp_path: Path):
    log = tmp_path / "log"
    specs = [toy_model(tmp_path / "m", "boom", crash_on_predict="segv", log=log / "boom"),
             toy_model(tmp_path / "m", "ok", eager=True)]
    settings = serve_settings(tmp_path / "home", workers=2)
    with RunningServer(settings, specs) as s:
        s.wait_ready()
        r = infer(s, "boom")
        assert r.status_code == 500
        assert "SIGSEGV" in r.json()["error"] and "not replayed" in r.json()["error"]
        assert count(log / "boom", "predict") == 1  # once: never replayed on another worker
        wait_workers(s, 2)
        for _ in range(5):
            assert infer(s, "ok").status_code == 200
        assert s.client.get("/v2/health/ready").status_code == 200


@pytest.mark.slow
def test_out_of_memory_under_the_per_worker_limit(tmp_path: Path):
    specs = [toy_model(tmp_path / "m", "hog", crash_on_load="oom"),
             toy_model(tmp_path / "m", "small")]
    settings = serve_settings(tmp_path / "home", workers=1, worker_memory_limit=2 * 1024**3)
    with RunningServer(settings, specs) as s:
        r = infer(s, "hog")
        assert r.status_code == 500 and "MemoryError" in r.json()["error"]
        assert infer(s, "small").status_code == 200
