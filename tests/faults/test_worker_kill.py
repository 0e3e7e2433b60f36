"""A worker SIGKILLed from outside (the OOM killer, an operator) while it holds requests.

tests/serve/test_faults.py covers a model that crashes its own worker; here the
worker is healthy and busy, and something else kills it. Every request it held
fails at once with a 5xx naming the signal (none hangs, none is replayed), the
server replaces the worker, both models load again on demand, and after a
restart the store verifies and nothing is left "in use".
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.faults.conftest import (
    ServeProcess,
    assert_verify_ok,
    cli,
    infer,
    toy_model_dir,
    toy_option,
    wait_for,
)


def _infer_in_thread(server: ServeProcess, model: str, out: dict) -> threading.Thread:
    def run() -> None:
        started = time.monotonic()
        try:
            out["response"] = infer(server, model, timeout=60)
        except httpx.HTTPError as exc:
            out["response"] = exc
        out["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.slow
def test_worker_sigkilled_mid_request(home: Path, tmp_path: Path, servers, figures: dict):
    log = tmp_path / "log"
    slow = toy_model_dir(tmp_path / "origin", "slow")
    quick = toy_model_dir(tmp_path / "origin", "quick")
    server = ServeProcess(home, [
        toy_option("slow", slow, delay=1.5, eager="true", log=log / "slow"),
        toy_option("quick", quick, eager="true", log=log / "quick")])
    servers.append(server)
    server.wait_live()
    wait_for(lambda: server.client.get("/v2/health/ready").status_code == 200, 60, "ready")
    assert infer(server, "quick").status_code == 200

    held_slow: dict = {}
    held_quick: dict = {}
    a = _infer_in_thread(server, "slow", held_slow)
    wait_for(lambda: any((log / "slow").glob("predict-*")), 30, "the slow prediction")
    # One worker: this request waits behind the slow one, inside the same worker.
    b = _infer_in_thread(server, "quick", held_quick)
    time.sleep(0.2)
    pid = int(next((log / "slow").glob("predict-*")).name.split("-")[1])
    assert pid in {w.pid for w in server.workers()}
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    a.join(30)
    b.join(30)
    figures["held_requests_failed_after_s"] = time.monotonic() - killed

    for held in (held_slow, held_quick):
        r = held["response"]
        assert isinstance(r, httpx.Response), r  # an answer, not a dropped connection
        assert r.status_code == 500, r.text
        assert "SIGKILL" in r.json()["error"], r.text
        assert held["seconds"] < 1.5 + 5  # failed when the worker died, not at a timeout
    assert "not replayed" in held_slow["response"].json()["error"]

    # A fresh worker takes over; both models load again on their next request.
    wait_for(lambda: len(server.workers()) == 1 and pid not in {w.pid for w in server.workers()},
             30, "a replacement worker")
    figures["replacement_worker_after_s"] = time.monotonic() - killed
    reload = time.monotonic()
    assert infer(server, "quick").status_code == 200
    assert infer(server, "slow").status_code == 200
    figures["both_models_reloaded_in_s"] = time.monotonic() - reload
    assert len(list((log / "slow").glob("predict-*"))) == 2  # the killed one was not replayed
    assert len(list((log / "slow").glob("load-*"))) == 2
    metrics = server.client.get("/metrics").text
    assert "cachemesh_worker_restarts_total 1.0" in metrics
    assert server.client.get("/v2/health/ready").status_code == 200
    server.stop()

    assert_verify_ok(home)
    for name in ("slow", "quick"):  # no hold outlived the server
        out = cli(home, "cache", "rm", name)
        assert out.returncode == 0, out.stderr
    assert_verify_ok(home)
