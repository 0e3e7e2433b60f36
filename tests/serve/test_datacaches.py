"""/api/v1/datacaches against a real server on loopback, pulling from the hub emulator and a local dir."""

from __future__ import annotations

import dataclasses
import json
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cachemesh.caches import Caches
from cachemesh.config import Settings
from cachemesh.errors import CacheNotFoundError, InvalidInputError
from cachemesh.serve.adapters.eci import nas_path as _nas_path
from tests.emulators.hf_hub import HfHubEmulator
from tests.emulators.http_origin import HttpOrigin
from tests.emulators.modelscope import ModelScopeEmulator
from tests.emulators.s3_origin import S3Origin
from tests.serve.conftest import RunningServer, free_port

FILES = {
    "config.json": b'{"model_type": "llama"}',
    "tokenizer.json": b'{"vocab": {"a": 0}}',
    "model.safetensors": random.Random(7).randbytes(300 * 1024),
}


@pytest.fixture(scope="module")
def server(hf_hub: HfHubEmulator, ms_hub: ModelScopeEmulator, s3_server: S3Origin,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("dc-home")
    env = {"CACHEMESH_HOME": str(home), "HF_ENDPOINT": hf_hub.url,
           "HF_HOME": str(home.parent / "hf-home"), "HOME": str(home.parent),
           "MODELSCOPE_DOMAIN": ms_hub.domain, "CACHEMESH_CA_BUNDLE": str(ms_hub.ca_file),
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1",
           # Local folders of the tests over the API (the default, none, is in tests/security).
           "CACHEMESH_SERVE_SOURCE_ROOTS": "/"}
    base = Settings.from_env(env, fetch_concurrency=4, range_concurrency=4)
    settings = dataclasses.replace(base, serve=dataclasses.replace(
        base.serve, port=free_port(), workers=1, memory=1024**3))
    with RunningServer(settings, []) as running:
        yield running


def sse(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    kind, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                yield kind, json.loads("\n".join(data))
            kind, data = "message", []
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def watch(server: RunningServer, name: str) -> list[tuple[str, dict[str, Any]]]:
    """Every server-sent event of ``name`` until the stream ends (it must end by itself)."""
    with server.client.stream("GET", f"/api/v1/datacaches/{name}/events", timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(sse(r))


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_eci_shape_pulls_a_hub_model_in_the_background(server: RunningServer, hf_hub: HfHubEmulator):
    repo = f"org/eci-{uuid.uuid4().hex[:8]}"
    commit = hf_hub.commit(repo, FILES)
    name = f"eci-{uuid.uuid4().hex[:6]}"
    body = {"Name": name, "Bucket": "team-a", "Path": "/models/qwen", "Size": 1,
            "RetentionDays": 7, "RegionId": "cn-hangzhou",
            "DataSource": {"Type": "URL", "Options": {"repoSource": "HuggingFace/Model",
                                                      "repoId": repo, "revision": "main"}}}
    r = server.client.post("/api/v1/datacaches", json=body)
    assert r.status_code == 202, r.text
    created = r.json()
    assert created["Name"] == name and created["Status"] in ("Pending", "Loading", "Available")
    assert created["source"] == f"hf://{repo}@main" and created["Bucket"] == "team-a"
    assert r.headers["location"] == f"/api/v1/datacaches/{name}"

    events = watch(server, name)
    assert events[-1] == ("status", {"name": name, "status": "Available", "error": None})
    kinds = [d["kind"] for k, d in events if k == "event"]
    assert kinds[0] == "created" and "pull-started" in kinds and kinds[-1] == "available"
    progress = [d for k, d in events if k == "progress"]
    assert progress[-1]["bytes_done"] == progress[-1]["bytes_total"] == sum(map(len, FILES.values()))

    d = server.client.get(f"/api/v1/datacaches/{name}").json()
    assert d["Status"] == d["status"] == "Available" and d["Progress"] == "100%"
    assert d["revision"] == commit and d["Size"] == 1 and d["RetentionDays"] == 7
    assert d["LastMatchedTime"].endswith("Z") and d["Path"] == "/models/qwen"
    assert [e["Reason"] for e in d["Events"]][-1] == "available"
    view = Path(d["view"])
    assert view == server.settings.home / "buckets" / "team-a" / "models" / "qwen"
    assert tree(view) == FILES
    folder = server.settings.home / "hub" / ("models--" + repo.replace("/", "--"))
    assert tree(folder / "snapshots" / commit) == FILES
    assert (folder / "refs" / "main").read_text() == commit
    listed = server.client.get("/api/v1/datacaches", params={"bucket": "team-a"}).json()
    assert [c["Name"] for c in listed["datacaches"]] == [name]

    # The same declaration again is accepted and changes nothing; another one is a conflict.
    assert server.client.post("/api/v1/datacaches", json=body).status_code == 202
    other = {**body, "DataSource": {"Type": "URL", "Options": {"repoSource": "HuggingFace/Model",
                                                               "repoId": "org/other"}}}
    assert server.client.post("/api/v1/datacaches", json=other).status_code == 409

    # In use (a program has it open): 409; then it goes, with its view.
    caches = Caches(server.settings)
    with caches.open(name):
        r = server.client.delete(f"/api/v1/datacaches/{name}")
        assert r.status_code == 409 and "in use" in r.json()["error"]
    assert server.client.delete(f"/api/v1/datacaches/{name}").status_code == 204
    assert server.client.get(f"/api/v1/datacaches/{name}").status_code == 404
    assert not view.exists()


def test_nas_shape_and_our_shape_pull_a_local_directory(server: RunningServer, tmp_path: Path):
    share = tmp_path / "share" / "bert"
    share.mkdir(parents=True)
    for rel, data in FILES.items():
        (share / rel).write_bytes(data)
    name = f"nas-{uuid.uuid4().hex[:6]}"
    body = {"Name": name, "Path": f"/nas/{name}",
            "DataSource": {"Type": "NAS", "Options": {"server": "localhost", "path": str(share)}}}
    assert server.client.post("/api/v1/datacaches", json=body).status_code == 202
    assert watch(server, name)[-1][1]["status"] == "Available"
    assert tree(Path(server.client.get(f"/api/v1/datacaches/{name}").json()["view"])) == FILES

    ours = {"name": f"own-{uuid.uuid4().hex[:6]}", "source": f"file://{share}",
            "include": ["*.json"], "size_gib": 1}
    r = server.client.post("/api/v1/datacaches", json=ours)
    assert r.status_code == 202, r.text
    assert watch(server, ours["name"])[-1][1]["status"] == "Available"
    view = Path(server.client.get(f"/api/v1/datacaches/{ours['name']}").json()["view"])
    assert tree(view) == {k: v for k, v in FILES.items() if k.endswith(".json")}
    for n in (name, ours["name"]):
        assert server.client.delete(f"/api/v1/datacaches/{n}").status_code == 204


def test_a_pull_over_its_size_fails_clearly(server: RunningServer, hf_hub: HfHubEmulator):
    repo = f"org/big-{uuid.uuid4().hex[:8]}"
    hf_hub.commit(repo, FILES)
    name = f"quota-{uuid.uuid4().hex[:6]}"
    body = {"Name": name, "Size": 0.0001,  # about 107 kB, less than the model
            "DataSource": {"Type": "URL", "Options": {"repoSource": "HuggingFace/Model",
                                                      "repoId": repo}}}
    assert server.client.post("/api/v1/datacaches", json=body).status_code == 202
    last = watch(server, name)[-1][1]
    assert last["status"] == "Failed" and "size limit" in last["error"]
    d = server.client.get(f"/api/v1/datacaches/{name}").json()
    assert d["Status"] == "Failed" and d["Events"][-1]["Type"] == "Warning"
    assert server.client.delete(f"/api/v1/datacaches/{name}").status_code == 204


@pytest.mark.parametrize("body", [
    {},
    {"Name": "x"},
    {"Name": "x", "DataSource": {"Type": "FTP", "Options": {}}},
    {"Name": "x", "DataSource": {"Type": "URL", "Options": {"repoSource": "Github/Model",
                                                            "repoId": "a/b"}}},
    {"Name": "x", "DataSource": {"Type": "URL", "Options": {"repoSource": "HuggingFace/Model"}}},
    {"Name": "x", "DataSource": {"Type": "URL", "Options": {"repoSource": "HuggingFace/Model",
                                                            "repoId": "../etc"}}},
    {"Name": "x", "DataSource": {"Type": "NAS", "Options": {"server": "localhost",
                                                            "path": "/no/such/share"}}},
    {"Name": "x", "DataSource": {"Type": "NAS", "Options": {"server": "nas.example",
                                                            "path": "/share"}}},
    {"Name": "x", "DataSource": {"Type": "OSS", "Options": {"bucket": "b", "akSecret": "s"}}},
    {"Name": "x", "Size": -1, "DataSource": {"Type": "OSS", "Options": {"bucket": "b"}}},
    {"Name": "x", "DataSource": {"Type": "OSS", "Options": {"bucket": "bucket",
                                                            "path": "models/../.."}}},
    {"Name": "../x", "DataSource": {"Type": "OSS", "Options": {"bucket": "b"}}},
    {"Name": "x", "Path": "/../../etc", "DataSource": {"Type": "OSS", "Options": {"bucket": "b"}}},
    {"Name": "x", "Colour": "red", "DataSource": {"Type": "OSS", "Options": {"bucket": "b"}}},
    {"name": "x", "source": "gopher://host/x"},
    {"name": "x", "source": "hf://org/name", "options": {"endpoint_url": "http://h"}},
    {"name": "x"},
    {"name": "x", "source": "/tmp", "bucket": "a/b"},
    {"name": "x", "source": "/tmp", "retention_days": 0},
    {"name": "x", "source": "/tmp", "retention_days": 1e308},
    {"name": "x", "source": "/tmp", "size_gib": 1e308},
    {"Name": "x", "RetentionDays": 1e300, "DataSource": {"Type": "OSS", "Options": {"bucket": "b"}}},
    {"Name": "x", "Size": 1e300, "DataSource": {"Type": "OSS", "Options": {"bucket": "b"}}},
    {"name": "x", "source": "/tmp", "surprise": True},
], ids=lambda b: json.dumps(b)[:60])
def test_an_invalid_body_is_refused_and_creates_nothing(server: RunningServer, body: dict):
    caches = Caches(server.settings)
    before = server.client.get("/api/v1/datacaches").json()["datacaches"]
    stored = [(i.name, i.status) for i in caches.list()]
    r = server.client.post("/api/v1/datacaches", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]
    assert server.client.get("/api/v1/datacaches").json()["datacaches"] == before
    assert [(i.name, i.status) for i in caches.list()] == stored  # the store itself
    with pytest.raises(CacheNotFoundError):
        caches.get("x")
    assert not (server.settings.home / "buckets" / "default" / "x").exists()


def test_not_json_and_unknown_caches(server: RunningServer):
    r = server.client.post("/api/v1/datacaches", content=b"{nope",
                           headers={"content-type": "application/json"})
    assert r.status_code == 400
    for method, path in [("GET", "/api/v1/datacaches/ghost"),
                         ("DELETE", "/api/v1/datacaches/ghost"),
                         ("GET", "/api/v1/datacaches/ghost/events")]:
        r = server.client.request(method, path)
        assert r.status_code == 404 and "ghost" in r.json()["error"]


def test_openapi_documents_the_routes_and_both_request_shapes(server: RunningServer):
    spec = server.client.get("/openapi.json").json()
    assert {"post", "get"} <= set(spec["paths"]["/api/v1/datacaches"])
    assert {"get", "delete"} <= set(spec["paths"]["/api/v1/datacaches/{name}"])
    assert "get" in spec["paths"]["/api/v1/datacaches/{name}/events"]
    schemas = spec["components"]["schemas"]
    assert {"DataCacheRequest", "EciCreateDataCache", "EciDataSource"} <= set(schemas)
    assert server.client.get("/docs").status_code == 200


def test_eci_modelscope_repo(server: RunningServer, ms_hub: ModelScopeEmulator):
    repo = f"org/ms-{uuid.uuid4().hex[:8]}"
    ms_hub.commit(repo, FILES)
    name = f"ms-{uuid.uuid4().hex[:6]}"
    body = {"Name": name, "Bucket": "default", "Path": f"/ms/{name}", "Size": 1,
            "DataSource": {"Type": "URL", "Options": {"repoSource": "ModelScope/Model",
                                                      "repoId": repo, "revision": "master"}}}
    r = server.client.post("/api/v1/datacaches", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["source"] == f"ms://{repo}@master"
    assert watch(server, name)[-1][1]["status"] == "Available"
    d = server.client.get(f"/api/v1/datacaches/{name}").json()
    assert d["Status"] == "Available" and d["Path"] == f"/ms/{name}"
    assert tree(Path(d["view"])) == FILES
    assert server.client.delete(f"/api/v1/datacaches/{name}").status_code == 204


def test_eci_oss_prefix_from_an_s3_compatible_endpoint(server: RunningServer, s3_server: S3Origin):
    bucket = f"oss-{uuid.uuid4().hex[:8]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    for rel, data in FILES.items():
        client.put_object(Bucket=bucket, Key=f"models/bert/{rel}", Body=data)
    client.put_object(Bucket=bucket, Key="other/ignored.bin", Body=b"not in the prefix")
    name = f"oss-{uuid.uuid4().hex[:6]}"
    body = {"Name": name, "DataSource": {"Type": "OSS", "Options": {
        "bucket": bucket, "path": "/models/bert/", "url": s3_server.endpoint_url}}}
    r = server.client.post("/api/v1/datacaches", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["source"] == f"s3://{bucket}/models/bert"
    assert watch(server, name)[-1][1]["status"] == "Available"
    d = server.client.get(f"/api/v1/datacaches/{name}").json()
    assert tree(Path(d["view"])) == FILES
    assert d["Size"] == 20  # ECI's default quota, in GiB
    assert server.client.delete(f"/api/v1/datacaches/{name}").status_code == 204


def test_nas_share_is_found_where_this_node_mounted_it(tmp_path: Path):
    """A remote share is read where /proc/self/mounts says it is mounted (here a
    mounts file in that format: mounting NFS needs privileges a test does not have)."""
    mnt = tmp_path / "mnt" / "nas one"
    (mnt / "models" / "bert").mkdir(parents=True)
    mounts = tmp_path / "mounts"
    escaped = str(mnt).replace(" ", "\\040")  # how the kernel writes a space there
    mounts.write_text(
        "proc /proc proc rw 0 0\n"
        "nas.example:/export /elsewhere nfs4 rw,vers=4.1 0 0\n"
        f"nas.example:/export/team {escaped} nfs4 rw,vers=4.1 0 0\n"
        "other.example:/export/team/models /wrong-server nfs rw 0 0\n")
    assert _nas_path("nas.example", "/export/team/models/bert", str(mounts)) == mnt / "models/bert"
    assert _nas_path("nas.example", "/export/team/", str(mounts)) == mnt
    with pytest.raises(InvalidInputError, match="not mounted"):
        _nas_path("third.example", "/export/team", str(mounts))
    with pytest.raises(InvalidInputError, match="not a directory"):
        _nas_path("nas.example", "/export/team/none", str(mounts))
    with pytest.raises(InvalidInputError, match="absolute"):
        _nas_path("nas.example", "export/team", str(mounts))


def small_cache(server: RunningServer, folder: Path) -> tuple[str, list[tuple[str, dict]]]:
    """A cache of one small file, POSTed in our shape: its name and every event of its pull."""
    folder.mkdir()
    (folder / "config.json").write_bytes(FILES["config.json"])
    name = f"{folder.name}-{uuid.uuid4().hex[:6]}"
    assert server.client.post("/api/v1/datacaches",
                              json={"name": name, "source": str(folder)}).status_code == 202
    return name, watch(server, name)


def test_last_access_time_follows_use(server: RunningServer, tmp_path: Path):
    name, events = small_cache(server, tmp_path / "used")
    assert events[-1][1]["status"] == "Available"
    before = server.client.get(f"/api/v1/datacaches/{name}").json()
    caches = Caches(server.settings)
    time.sleep(1.1)  # the ISO times have whole seconds
    with caches.open(name):
        pass
    after = server.client.get(f"/api/v1/datacaches/{name}").json()
    assert after["last_access"] > before["last_access"]
    assert after["LastMatchedTime"] > before["LastMatchedTime"]
    assert after["last_access_time"] == after["LastMatchedTime"]
    assert server.client.delete(f"/api/v1/datacaches/{name}").status_code == 204


def test_event_stream_resumes_after_last_event_id(server: RunningServer, tmp_path: Path):
    name, events = small_cache(server, tmp_path / "resume")
    first = [d for k, d in events if k == "event"]
    assert len(first) >= 3 and first[-1]["kind"] == "available"

    def events_after(last_id: str) -> list[dict[str, Any]]:
        with server.client.stream("GET", f"/api/v1/datacaches/{name}/events", timeout=60,
                                  headers={"Last-Event-ID": last_id}) as r:
            assert r.status_code == 200
            return [d for k, d in sse(r) if k == "event"]

    assert events_after(str(first[0]["id"])) == first[1:]
    assert events_after(str(first[-1]["id"])) == []
    for bad in ("not-a-number", "-3", "9" * 30):  # from the start
        assert events_after(bad) == first
    assert server.client.delete(f"/api/v1/datacaches/{name}").status_code == 204


@pytest.mark.slow
def test_a_server_that_stops_stops_its_pulls_and_the_next_one_resumes(
        http_origin: HttpOrigin, tmp_path: Path):
    """Pulls run in child processes: stopping the server stops them at once (a
    thread would have gone on pulling, and kept a stopped server from exiting); the
    next server resumes them when it starts, where they stopped."""
    size = 8 * 1024 * 1024
    http_origin.files["/big.bin"] = random.Random(3).randbytes(size)
    http_origin.delay_s = 0.05  # 64 KiB each: about 6 s for the whole file
    base = Settings.from_env({"CACHEMESH_HOME": str(tmp_path / "home")},
                             fetch_retries=1, retry_backoff_s=0.01)
    settings = dataclasses.replace(base, serve=dataclasses.replace(
        base.serve, port=free_port(), workers=1, memory=1024**3))
    body = {"name": "big", "source": http_origin.url("/big.bin")}
    caches = Caches(settings)
    with RunningServer(settings, []) as running:
        assert running.client.post("/api/v1/datacaches", json=body).status_code == 202
        deadline = time.monotonic() + 30
        while caches.get("big").progress.bytes_done == 0:  # some bytes are on disk
            assert time.monotonic() < deadline
            time.sleep(0.05)
    stopped = caches.get("big")
    assert stopped.status == "Failed" and "interrupted" in stopped.error
    served = http_origin.served["/big.bin"]
    time.sleep(0.5)
    assert http_origin.served["/big.bin"] - served < 256 * 1024  # nobody is pulling any more
    assert caches.get("big").status == "Failed"

    http_origin.delay_s = 0.0
    with RunningServer(settings, []) as running:  # it resumes the pull by itself
        assert watch(running, "big")[-1][1]["status"] == "Available"
        assert "resumed" in [e.kind for e in caches.events("big")]
    assert (Path(caches.get("big").view) / "big.bin").read_bytes() == http_origin.files["/big.bin"]
    assert http_origin.served["/big.bin"] < 1.5 * size  # resumed, not fetched again


def test_usage_counts_shared_files_once(server: RunningServer, tmp_path: Path):
    files = {**FILES, "unique.bin": uuid.uuid4().bytes * 100}
    folder = tmp_path / "shared"
    folder.mkdir()
    for rel, data in files.items():
        (folder / rel).write_bytes(data)
    size = sum(len(v) for v in files.values())
    names = [f"dup-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    for name in names:
        assert server.client.post("/api/v1/datacaches",
                                  json={"name": name, "source": str(folder)}).status_code == 202
        assert watch(server, name)[-1][1]["status"] == "Available"

    plain = server.client.get("/api/v1/datacaches").json()
    assert "usage" not in plain and all("usage" not in d for d in plain["datacaches"])

    def usage() -> tuple[dict[str, dict], dict]:
        body = server.client.get("/api/v1/datacaches", params={"usage": "true"}).json()
        return {d["name"]: d["usage"] for d in body["datacaches"]}, body["usage"]

    each, total = usage()
    for name in names:  # the same bytes twice: neither holds any of them alone
        assert each[name] == {"files": len(files), "logical_bytes": size, "exclusive_bytes": 0}
    assert total["logical_bytes"] == sum(u["logical_bytes"] for u in each.values())
    assert total["saved_bytes"] == total["logical_bytes"] - total["physical_bytes"] >= size
    assert server.client.delete(f"/api/v1/datacaches/{names[0]}").status_code == 204
    each, after = usage()
    assert each[names[1]]["exclusive_bytes"] == size  # the last one holding them
    assert after["physical_bytes"] == total["physical_bytes"]
    assert after["saved_bytes"] == total["saved_bytes"] - size
    assert server.client.delete(f"/api/v1/datacaches/{names[1]}").status_code == 204


def test_a_cache_removed_and_declared_again_as_its_last_pull_ends_is_pulled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The old pull's child has exited but its thread has not finished when the same
    declaration comes again (after a DELETE): the new cache is pulled once that thread
    ends, instead of staying Pending because a pull of its name was still 'queued'."""
    import subprocess
    import threading

    from cachemesh.caches import AVAILABLE, PENDING, make_spec
    from cachemesh.serve.datacache.datacache_service import DataCacheService

    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "weights.bin").write_bytes(b"x" * 4096)
    caches = Caches(Settings.from_env({"CACHEMESH_HOME": str(tmp_path / "home")}))
    service = DataCacheService(caches, [tmp_path])
    ended = threading.Event()  # a pull's child has exited
    release = threading.Event()  # and now its thread may finish

    class Held(subprocess.Popen):
        def communicate(self, *args: Any, **kwargs: Any) -> Any:
            out = super().communicate(*args, **kwargs)
            ended.set()
            release.wait(60)
            return out

    monkeypatch.setattr(subprocess, "Popen", Held)
    spec = make_spec(name="again", source=str(origin))
    try:
        service.create(spec)
        assert ended.wait(60) and caches.get("again").status == AVAILABLE
        caches.rm("again")
        assert service.create(spec).status == PENDING
        release.set()
        deadline = time.monotonic() + 60
        while caches.get("again").status != AVAILABLE:
            assert time.monotonic() < deadline, caches.get("again")
            time.sleep(0.05)
    finally:
        release.set()
        service.stop()
