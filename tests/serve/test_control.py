"""The control API, run-time deployments that survive a restart, and `cachemesh serve`
as a user runs it: a subprocess, a config file, `cachemesh models`, and SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest

from cachemesh.caches import Caches
from cachemesh.serve.core.documents import DEFAULT_VERSION
from cachemesh.serve.core.registry import SqliteModelRegistry
from tests.serve.conftest import RunningServer, free_port, serve_settings, toy_model

BODY = orjson.dumps({"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": [1]}]})


def test_deploy_list_delete_and_survive_a_restart(tmp_path: Path, digits_dir: Path, digits_data):
    x, y = digits_data
    settings = serve_settings(tmp_path / "home")
    caches = Caches(settings)
    with RunningServer(settings, [], registry=SqliteModelRegistry(caches.db)) as s:
        r = s.client.post("/api/v1/models", json={"name": "svm", "source": str(digits_dir)})
        assert r.status_code == 201, r.text
        assert r.json()["origin"] == "api"
        body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32",
                            "data": x[0].tolist()}]}
        r = s.client.post("/v2/models/svm/infer", json=body)
        assert r.json()["outputs"][0]["data"] == [int(y[0])]
        status = s.client.get("/api/v1/models/svm").json()
        assert status["state"] == "Ready" and status["runtime"] == "sklearn"
        # the model's cache is held while it is loaded: gc and eviction leave it alone
        assert caches.get("svm").in_use
        # a source nobody understands, and a bad body, are 400; a clash is 409
        r = s.client.post("/api/v1/models", json={"name": "x", "source": "nope://x"})
        assert r.status_code == 400 and "unknown source scheme" in r.json()["error"]
        assert s.client.post("/api/v1/models", json={"name": "x"}).status_code == 400
        r = s.client.post("/api/v1/models", json={"name": "svm", "source": "/elsewhere"})
        assert r.status_code == 409
        r = s.client.post("/api/v1/models", json={"name": "../x", "source": "/a"})
        assert r.status_code == 400
    assert not caches.get("svm").in_use
    # a new server on the same store serves what was deployed at run time
    settings = serve_settings(tmp_path / "home")
    with RunningServer(settings, [], registry=SqliteModelRegistry(caches.db)) as s:
        names = [m["name"] for m in s.client.get("/api/v1/models").json()["models"]]
        assert names == ["svm"]
        assert s.client.post("/v2/models/svm/infer", json=body).status_code == 200
        assert s.client.delete("/api/v1/models/svm").status_code == 204
        assert s.client.get("/api/v1/models/svm").status_code == 404
        assert s.client.post("/v2/models/svm/infer", json=body).status_code == 404
    assert SqliteModelRegistry(caches.db).list() == []


def test_the_repository_extension_adds_and_removes_models_too(tmp_path: Path, digits_dir: Path):
    settings = serve_settings(tmp_path / "home")
    registry = SqliteModelRegistry(Caches(settings).db)
    with RunningServer(settings, [], registry=registry) as s:
        r = s.client.post("/v2/repository/models/svm/load", json={"parameters": {
            "source": str(digits_dir), "version": "2", "config": {"trusted": "true"}}})
        assert r.status_code == 200, r.text
        assert s.client.get("/v2/models/svm/versions/2/ready").status_code == 200
        assert [m.name for m in registry.list()] == ["svm"]  # kept across restarts
        r = s.client.post("/v2/repository/models/other/load", json={"parameters": {}})
        assert r.status_code == 404  # no source: only known models load
        r = s.client.post("/v2/repository/models/svm/unload", json={"parameters": {"remove": True}})
        assert r.status_code == 200
        assert s.client.get("/v2/models/svm").status_code == 404
        assert registry.list() == []


def test_concurrent_declarations_of_one_name_are_taken_one_at_a_time(tmp_path: Path):
    """The checks and registry writes of a deploy run off the event loop; two POSTs of
    one name at once must still give one model (201) and clashes (409), never two."""
    settings = serve_settings(tmp_path / "home")
    registry = SqliteModelRegistry(Caches(settings).db)
    specs = [toy_model(tmp_path / "origins", f"m{i}") for i in range(8)]
    with RunningServer(settings, [], registry=registry) as s:
        codes: list[int] = []
        gate = threading.Barrier(len(specs))

        def post(i: int) -> None:
            body = {"name": "one", "source": specs[i].source, "runtime": "custom",
                    "parameters": specs[i].parameters}
            with httpx.Client(base_url=s.url, timeout=30) as client:
                gate.wait()
                codes.append(client.post("/api/v1/models", json=body).status_code)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(specs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(codes) == [201] + [409] * (len(specs) - 1), codes
        kept = registry.list()
        assert [d.name for d in kept] == ["one"]
        served = s.client.get("/api/v1/models/one").json()
        assert served["versions"][DEFAULT_VERSION]["source"] == kept[0].versions[
            DEFAULT_VERSION].source
        r = s.client.post("/v2/models/one/infer", content=BODY,
                          headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text


def cm(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "CACHEMESH_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "cachemesh", *args], capture_output=True,
                          text=True, env=env, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"cachemesh {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


@pytest.mark.slow
def test_cachemesh_serve_subprocess_models_cli_and_sigterm_drain(tmp_path: Path, digits_dir: Path):
    home, port = tmp_path / "home", free_port()
    slow = toy_model(tmp_path / "m", "slow", delay=1.5)
    config = tmp_path / "models.yaml"
    config.write_text(
        "models:\n"
        f"  - name: slow\n    source: {slow.source}\n    runtime: custom\n"
        "    eager: true\n    parameters: {class: 'toy:Echo', delay: '1.5'}\n")
    # `models deploy` below sends a local folder over the API: it needs the roots.
    env = {**os.environ, "CACHEMESH_HOME": str(home),
           "CACHEMESH_SERVE_SOURCE_ROOTS": str(digits_dir.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachemesh", "serve", "--port", str(port), "--grpc-port", "0",
         "--workers", "1",
         "--memory", "2GiB", "--config", str(config),
         "--model", f"digits={digits_dir},runtime=sklearn,version=3"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        client = httpx.Client(base_url=url, timeout=30)
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if client.get("/v2/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.1)
        ls = cm(home, "models", "--url", url, "ls", "--json")
        models = {m["name"]: m for m in orjson.loads(ls.stdout)["models"]}
        assert models["slow"]["state"] == "Ready" and models["digits"]["version"] == "3"
        cm(home, "models", "--url", url, "deploy", "again", str(digits_dir), "--eager")
        assert "again" in cm(home, "models", "--url", url, "ls").stdout
        missing = cm(home, "models", "--url", url, "rm", "nope", check=False)
        assert missing.returncode == 3 and "no model named 'nope'" in missing.stderr

        # SIGTERM while a request is in flight: it finishes; new ones get 503; then exit 0
        result: dict[str, httpx.Response] = {}
        inflight = threading.Thread(target=lambda: result.setdefault(
            "r", httpx.post(f"{url}/v2/models/slow/infer", content=BODY, timeout=30)))
        inflight.start()
        time.sleep(0.4)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = client.post("/v2/models/slow/infer", content=BODY)
        assert late.status_code == 503 and "shutting down" in late.json()["error"]
        assert late.headers["retry-after"] == "1"
        assert client.get("/v2/health/ready").status_code == 503
        inflight.join(30)
        assert result["r"].status_code == 200
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # what was deployed at run time is in the store's registry; --model ones are not
    again = cm(home, "cache", "ls", "--json")
    assert "again" in again.stdout
