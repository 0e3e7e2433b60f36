"""Extra copies of hot models, end to end: they appear under load on another worker,
share requests by requests in flight, go after a cool-down, are evicted first, and
keep a model serving when the worker holding another copy dies."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve.conftest import RunningServer, serve_settings
from tests.serve.test_faults import wait_workers
from tests.serve.test_mesh import Shot, failures, hammer, model, shoot, version, wait_until

MB = 1024 * 1024


def copies(server: RunningServer, name: str = "m", label: str = "v1") -> list[dict[str, Any]]:
    return [c for c in model(server, name)["versions"][label]["status"]["copies"]
            if c["state"] == "Ready"]


class Load:
    """A client loop in a thread of its own, for tests that look at the server meanwhile."""

    def __init__(self, server: RunningServer, path: str, concurrency: int = 4) -> None:
        import threading

        self.shots: list[Shot] = []
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        started = threading.Event()

        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            started.set()
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
                await hammer(c, path, self._stop, self.shots, concurrency)

        self.thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self.thread.start()
        started.wait(10)

    def stop(self) -> list[Shot]:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(60)
        return self.shots

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():
            self.stop()


@pytest.mark.slow
def test_a_hot_model_gets_a_copy_balanced_by_requests_in_flight_then_loses_it(tmp_path: Path):
    doc = {"versions": {"v1": version(tmp_path, "v1", delay=0.03)}, "eager": True,
           "scaling": {"copy_rate": 5, "cooldown_s": 1}}
    with RunningServer(serve_settings(tmp_path / "home", workers=2), []) as s:
        assert s.client.put("/api/v1/models/m", json=doc).status_code == 201
        wait_until(lambda: model(s)["state"] == "Ready")
        assert len(copies(s)) == 1
        with Load(s, "/v2/models/m/infer") as load:
            two = wait_until(lambda: len(copies(s)) == 2 and copies(s), timeout=30)
            assert sorted(c["worker"] for c in two) == [1, 2]  # never two on one worker
            assert sum(c["extra"] for c in two) == 1
            scaling = model(s)["versions"]["v1"]["status"]["scaling"]
            assert "requests/s is more than 5/s" in scaling
            mark = len(load.shots)
            time.sleep(3)
            shots = load.stop()[mark:]
        assert failures(shots) == [] and len(shots) > 40
        by_pid = Counter(x.pid for x in shots)
        share = min(by_pid.values()) / len(shots)
        print(f"\ntwo copies, 4 clients: {dict(by_pid)} ({share:.0%} on the less used copy)")
        assert len(by_pid) == 2 and share > 0.3
        # the load is gone: after the rate window and the cool-down, one copy is enough
        started = time.monotonic()
        wait_until(lambda: len(copies(s)) == 1, timeout=30)
        print(f"extra copy gone {time.monotonic() - started:.1f}s after the load stopped")
        assert "1 copy is enough" in model(s)["versions"]["v1"]["status"]["scaling"]
        shot = asyncio.run(_one(s))
        assert shot.status == 200 and shot.tag == "v1"


async def _one(s: RunningServer) -> Shot:
    async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
        return await shoot(c, "/v2/models/m/infer")


@pytest.mark.slow
def test_extra_copies_are_the_first_to_go_when_memory_is_needed(tmp_path: Path):
    # Each model holds 40 MiB; the budget has room for three and a bit.
    def doc(tag: str, rate: float) -> dict[str, Any]:
        return {"versions": {"v1": version(tmp_path, tag, ballast_mb=40)},
                "scaling": {"copy_rate": rate, "cooldown_s": 600}}

    v = version(tmp_path, "probe")
    disk = sum(p.stat().st_size for p in Path(v["source"]).iterdir())
    settings = serve_settings(tmp_path / "home", workers=2, memory_factor=40 * MB / disk)
    with RunningServer(settings, []) as s:
        for name, rate in (("cold", 0), ("hot", 2), ("new", 0)):
            assert s.client.put(f"/api/v1/models/{name}", json=doc(name, rate)).status_code == 201
        wait_until(lambda: all(model(s, n)["state"] == "Unloaded" for n in ("cold", "hot", "new")))
        s.service.budget = sum(w.base_rss for w in s.service.workers) + int(3.8 * 40 * MB)
        assert asyncio.run(_infer(s, "cold")) == 200  # the least recently used from now on
        with Load(s, "/v2/models/hot/infer", concurrency=2):
            wait_until(lambda: len(copies(s, "hot")) == 2, timeout=30)
        assert model(s, "cold")["state"] == "Ready"
        assert asyncio.run(_infer(s, "new")) == 200  # needs room: the extra copy of hot goes
        assert len(copies(s, "hot")) == 1
        assert model(s, "cold")["state"] == "Ready" and model(s, "new")["state"] == "Ready"
        # the copy says why it is where it is: the placement policy's reasons
        placed = copies(s, "new")[0]["placed"]
        assert "evict hot@v1#" in placed and "(extra copy" in placed, placed
        assert "not full: slot" in placed and "cold" not in placed, placed
        metrics = s.client.get("/metrics").text
        assert 'cachemesh_evictions_total{model="hot"} 1.0' in metrics
        assert 'cachemesh_evictions_total{model="cold"}' not in metrics
        mem = s.client.get("/api/v1/models").json()["memory"]
        assert mem["held_bytes"] <= s.service.budget


async def _infer(s: RunningServer, name: str) -> int:
    async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
        return (await shoot(c, f"/v2/models/{name}/infer")).status


@pytest.mark.slow
def test_failover_when_the_worker_holding_a_copy_dies(tmp_path: Path):
    doc = {"versions": {"v1": version(tmp_path, "v1", delay=0.02)}, "eager": True,
           "scaling": {"copy_rate": 5, "cooldown_s": 600}}
    with RunningServer(serve_settings(tmp_path / "home", workers=2), []) as s:
        assert s.client.put("/api/v1/models/m", json=doc).status_code == 201
        wait_until(lambda: model(s)["state"] == "Ready")
        with Load(s, "/v2/models/m/infer") as load:
            two = wait_until(lambda: len(copies(s)) == 2 and copies(s), timeout=30)
            first = next(c["worker"] for c in two if not c["extra"])  # the first copy's
            victim = next(w for w in s.service.workers if w.id == first)
            pids = {w.pid for w in s.service.workers}
            killed_at = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)
            time.sleep(2)
            # the dead worker is replaced, and the copy comes back on the new one
            wait_workers(s, 2)
            assert {w.pid for w in s.service.workers} != pids
            wait_until(lambda: len(copies(s)) == 2, timeout=30)
            # the copy that survived is the first one now; the new one is the extra
            other = next(c["worker"] for c in two if c["extra"])
            assert {(c["worker"] == other, c["extra"]) for c in copies(s)} == {
                (True, False), (False, True)}
            shots = load.stop()
        after = [x for x in shots if x.start > killed_at]
        lost = failures(shots)
        print(f"\nfailover: {len(shots)} requests, {len(after)} after the kill, {len(lost)} failed"
              f" (in flight on the killed worker)")
        # only what was in flight on the killed worker fails (at most one per client),
        # with a 500 that says so; everything else is answered by the other copy
        assert len(lost) <= 4 and all(x.status == 500 and "SIGKILL" in (x.error or "")
                                      for x in lost)
        assert len([x for x in after if x.status == 200]) > 20
        assert all(x.status == 200 for x in shots if x.start > killed_at + 1.0)
        assert 'cachemesh_worker_restarts_total 1.0' in s.client.get("/metrics").text


def test_serve_flags_set_the_copy_thresholds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """--copy-rate, --max-copies and --copy-cooldown reach the server's settings; a
    model's own scaling (here from --model) overrides them; bad values exit 2."""
    from click.testing import CliRunner

    from cachemesh.cli import main
    from cachemesh.serve.core.copies import CopyPolicy
    from cachemesh.serve.core.documents import doc_from_spec

    seen: dict[str, Any] = {}
    def run(settings, specs, on_started=None, launched=(), ports=None) -> None:
        seen.update(cfg=settings.serve, specs=specs)
        ports.http.close()
        for worker in launched:  # started ahead by the command: let them go
            worker.sock.close()
            worker.proc.wait(30)

    monkeypatch.setattr("cachemesh.serve.adapters.server.run", run)
    env = {"CACHEMESH_HOME": str(tmp_path / "home")}
    r = CliRunner().invoke(main, ["serve", "--port", "0", "--grpc-port", "0",
                                  "--copy-rate", "7.5", "--max-copies", "3",
                                  "--copy-cooldown", "12", "--model", "a=/models/a",
                                  "--model", "b=/models/b,copy_rate=2,cooldown_s=0"], env=env)
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert (cfg.copy_rate, cfg.max_copies, cfg.copy_cooldown_s) == (7.5, 3, 12.0)
    a, b = (CopyPolicy.of(cfg, doc_from_spec(s).scaling) for s in seen["specs"])
    assert a == CopyPolicy(7.5, 3, 12.0) and b == CopyPolicy(2.0, 3, 0.0)
    for bad in (["--copy-rate", "-1"], ["--max-copies", "0"], ["--copy-cooldown", "x"]):
        r = CliRunner().invoke(main, ["serve", *bad], env=env)
        assert r.exit_code == 2, (bad, r.output)


def test_a_copy_that_measures_less_than_half_its_files_is_counted_as_predicted(tmp_path: Path):
    """A load whose RSS barely grows (here: 8 MiB of weights it never reads; in life,
    a reload into memory its worker freed before) must not look free to placement."""
    v = version(tmp_path, "v1")
    (Path(v["source"]) / "weights.bin").write_bytes(b"\0" * (8 * MB))
    with RunningServer(serve_settings(tmp_path / "home", workers=1), []) as s:
        doc = {"versions": {"v1": v}, "eager": True}
        assert s.client.put("/api/v1/models/m", json=doc).status_code == 201
        wait_until(lambda: model(s)["state"] == "Ready")
        st = model(s)["versions"]["v1"]["status"]
        assert st["size_bytes"] == st["predicted_bytes"] > 8 * MB, st
        assert st["copies"][0]["size_bytes"] == st["predicted_bytes"]
