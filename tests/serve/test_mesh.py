"""Mesh behaviours end to end, with real HTTP clients against a real server:
rollouts under load, canaries, header and parameter routes, invalid documents,
documents across a restart, and what `cachemesh models ls` shows."""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from cachemesh.caches import Caches
from cachemesh.serve.core.registry import ModelSpec, SqliteModelRegistry
from tests.serve.conftest import RunningServer, serve_settings
from tests.serve.test_control import cm

TOY = Path(__file__).with_name("mesh_toy.py")
BODY = orjson.dumps({"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": [1]}]})


def version(root: Path, tag: str, **params: Any) -> dict[str, Any]:
    """A version entry of a model document: a directory whose model answers ``tag``."""
    d = root / "origin" / tag
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(TOY, d / "toy.py")
    (d / "weights.bin").write_bytes(b"\0" * 1024)
    return {"source": str(d), "runtime": "custom",
            "parameters": {"class": "toy:Tagged", "tag": tag,
                           **{k: str(v) for k, v in params.items()}}}


@dataclass
class Shot:
    start: float
    end: float
    status: int
    version: str | None  # the x-model-version response header
    tag: str | None  # what the model that answered says it is
    pid: int | None
    error: str | None = None


async def shoot(c: httpx.AsyncClient, path: str, body: bytes = BODY,
                headers: dict[str, str] | None = None) -> Shot:
    start = time.monotonic()
    try:
        r = await c.post(path, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return Shot(start, time.monotonic(), 0, None, None, None, repr(exc))
    end = time.monotonic()
    if r.status_code != 200:
        return Shot(start, end, r.status_code, None, None, None, r.text)
    params = r.json().get("parameters", {})
    return Shot(start, end, 200, r.headers.get("x-model-version"), params.get("tag"),
                params.get("pid"))


async def hammer(c: httpx.AsyncClient, path: str, stop: asyncio.Event, shots: list[Shot],
                 concurrency: int = 4, **kw: Any) -> None:
    """``concurrency`` clients, each sending requests back to back until ``stop``."""
    async def client() -> None:
        while not stop.is_set():
            shots.append(await shoot(c, path, **kw))

    await asyncio.gather(*(client() for _ in range(concurrency)))


def failures(shots: list[Shot]) -> list[Shot]:
    return [s for s in shots if s.status != 200]


def binomial_bounds(n: int, p: float, tail: float) -> tuple[int, int]:
    """The smallest [lo, hi] with P(X < lo) <= tail and P(X > hi) <= tail, X ~ Bin(n, p)."""
    logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p) for k in range(n + 1)]
    pmf = [math.exp(x) for x in logs]
    lo, acc = 0, 0.0
    while acc + pmf[lo] <= tail:
        acc += pmf[lo]
        lo += 1
    hi, acc = n, 0.0
    while acc + pmf[hi] <= tail:
        acc += pmf[hi]
        hi -= 1
    return lo, hi


def model(server: RunningServer, name: str = "m") -> dict[str, Any]:
    r = server.client.get(f"/api/v1/models/{name}")
    assert r.status_code == 200, r.text
    return r.json()


def document(status: dict[str, Any]) -> dict[str, Any]:
    """The document part of what GET returns."""
    return {"versions": {k: {f: v[f] for f in ("source", "runtime", "parameters")}
                         for k, v in status["versions"].items()},
            **{k: status[k] for k in ("traffic", "routes", "aliases", "scaling")}}


def wait_until(check, timeout: float = 30, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)


@pytest.mark.slow
def test_rollout_under_load_then_a_failed_version_then_rollback(tmp_path: Path):
    """Rolling v1 -> v2 under a client loop: no request fails and the answers switch;
    a version that cannot load never takes traffic; pointing back rolls back."""
    v1 = {"versions": {"v1": version(tmp_path, "v1", delay=0.005)}, "eager": True}
    v2 = {"versions": {"v2": version(tmp_path, "v2", delay=0.005, load_delay=1.0)}}
    v3 = {"versions": {"v3": version(tmp_path, "v3", fail_load=1)}}
    settings = serve_settings(tmp_path / "home", workers=2)
    with RunningServer(settings, []) as s:
        assert s.client.put("/api/v1/models/m", json=v1).status_code == 201
        wait_until(lambda: model(s)["state"] == "Ready")

        async def under_load(doc: dict) -> tuple[httpx.Response, float, float, list[Shot]]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                stop, shots = asyncio.Event(), []
                loop = asyncio.create_task(hammer(c, "/v2/models/m/infer", stop, shots))
                await asyncio.sleep(0.7)
                put_at = time.monotonic()
                r = await c.put("/api/v1/models/m", json=doc)
                done_at = time.monotonic()
                await asyncio.sleep(0.7)
                stop.set()
                await loop
                return r, put_at, done_at, shots

        def check_switch(r, put_at, done_at, shots, old: str, new: str) -> None:
            assert r.status_code == 200, r.text
            assert failures(shots) == []
            assert all(x.version == x.tag for x in shots)  # the header names who answered
            before = [x for x in shots if x.end < put_at]
            after = [x for x in shots if x.start > done_at]
            assert before and {x.tag for x in before} == {old}
            assert after and {x.tag for x in after} == {new}
            # the switch happens once: no request that started after a new answer came
            # back got an old one
            first_new = min(x.end for x in shots if x.tag == new)
            assert all(x.start < first_new for x in shots if x.tag == old)
            print(f"\nrollout {old} -> {new}: {len(shots)} requests, {len(failures(shots))}"
                  f" failed; PUT took {done_at - put_at:.2f}s; {len(before)} {old} before,"
                  f" {len(after)} {new} after, {len(shots) - len(before) - len(after)} during")

        r, put_at, done_at, shots = asyncio.run(under_load(v2))
        check_switch(r, put_at, done_at, shots, "v1", "v2")
        assert done_at - put_at > 1.0  # it waited for v2's load
        doc = r.json()
        assert list(doc["versions"]) == ["v2"] and doc["traffic"] == {"v2": 100}
        assert "unloaded v1" in doc["rollout"]
        mem = s.client.get("/api/v1/models").json()["memory"]
        assert {m for w in mem["workers"] for m in w["models"]} == {"m@v2"}  # v1 is gone

        # a version that fails to load: the PUT fails, v2 keeps every request
        r, put_at, done_at, shots = asyncio.run(under_load(v3))
        assert r.status_code == 500, r.text
        assert "traffic stays as it was (v2 100%)" in r.json()["error"]
        assert "refuses to load" in r.json()["error"]
        assert failures(shots) == [] and {x.tag for x in shots} == {"v2"}
        doc = model(s)
        assert list(doc["versions"]) == ["v2"] and "rollout of model 'm' failed" in doc["rollout"]
        print(f"failed rollout to v3: {len(shots)} requests, {len(failures(shots))} failed")

        # rollback: point back at v1 (its files are in the cache already)
        r, put_at, done_at, shots = asyncio.run(under_load(v1))
        check_switch(r, put_at, done_at, shots, "v2", "v1")


@pytest.mark.slow
def test_canary_split_path_versions_and_metrics(tmp_path: Path):
    doc = {"versions": {"v1": version(tmp_path, "v1"), "v2": version(tmp_path, "v2")},
           "traffic": {"v1": 90, "v2": 10}, "aliases": {"canary": "v2"}, "eager": True}
    with RunningServer(serve_settings(tmp_path / "home", workers=2), []) as s:
        assert s.client.put("/api/v1/models/m", json=doc).status_code == 201
        wait_until(lambda: s.client.get("/v2/models/m/ready").status_code == 200)
        n = 1000

        async def send(path: str, count: int) -> list[Shot]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                sem = asyncio.Semaphore(8)

                async def one() -> Shot:
                    async with sem:
                        return await shoot(c, path)
                return await asyncio.gather(*(one() for _ in range(count)))

        started = time.monotonic()
        shots = asyncio.run(send("/v2/models/m/infer", n))
        took = time.monotonic() - started
        assert failures(shots) == []
        assert all(x.version == x.tag for x in shots)
        canary = sum(x.tag == "v2" for x in shots)
        lo, hi = binomial_bounds(n, 0.10, tail=5e-7)  # a false alarm: p < 1e-6
        print(f"\ncanary 90/10 over {n} requests: v2 took {canary} ({canary / n:.1%});"
              f" accepted {lo}..{hi}; {n / took:.0f} requests/s")
        assert lo <= canary <= hi, (canary, lo, hi)
        metrics = s.client.get("/metrics").text
        assert f'cachemesh_version_requests_total{{model="m",version="v2"}} {canary}.0' in metrics
        # a path names a version (or an alias) directly, whatever the shares
        for path, tag in [("/v2/models/m/versions/v2/infer", "v2"),
                          ("/v2/models/m/versions/canary/infer", "v2"),
                          ("/v2/models/m/versions/v1/infer", "v1")]:
            got = asyncio.run(send(path, 20))
            assert {(x.tag, x.version) for x in got} == {(tag, tag)}, path
        r = s.client.post("/v2/models/m/versions/v9/infer", content=BODY)
        assert r.status_code == 404 and "version 'v9'" in r.json()["error"]
        meta = s.client.get("/v2/models/m/versions/canary").json()
        assert meta["versions"] == ["v1", "v2"]
        index = s.client.get("/v2/repository/index").json()
        assert {(e["version"], e["state"]) for e in index} == {("v1", "READY"), ("v2", "READY")}


def check_route_function(s: RunningServer) -> None:
    """ModelService.route, the routing entry point of every adapter (OpenAI and gRPC
    call it, or the hooks that call it), decides as the V2 REST path does."""
    from cachemesh.errors import ModelNotFoundError

    service = s.service
    assert service.route("m").version == "v1"
    # the cluster's pinned-version header means nothing to a lone node (no forwarding)
    assert service.route("m", headers={"cachemesh-forwarded-version": "v2"}).version == "v1"
    d = service.route("m", headers={"x-model-version": "v2"})
    assert (d.version, d.reason) == ("v2", "route 0: header x-model-version=v2")
    assert service.route("m", parameters={"cohort": "exp-1"}).version == "v3"
    assert service.route("m", "v3", headers={"x-model-version": "v2"}).reason == "path"
    for name, version in (("m", "v9"), ("nosuch", None)):
        with pytest.raises(ModelNotFoundError):
            service.route(name, version)

    async def hooks() -> list[Any]:
        return [await service.generate("m", {"kind": "completion", "prompt": "x"},
                                       headers={"x-user": "beta-1"}),
                await service.generate("m", {}, parameters={"variant": "b"}),
                [c async for c in service.stream("m", {}, headers={"x-model-version": "v2"})],
                await service.generate("m", {}, version="v3")]

    got = asyncio.run_coroutine_threadsafe(hooks(), s.server._loop).result(30)
    assert got == [{"text": "v3"}, {"text": "v2"}, [{"text": "v2"}], {"text": "v3"}]


@pytest.mark.slow
def test_header_and_parameter_routes_the_cli_and_a_restart(tmp_path: Path):
    doc = {"versions": {"v1": version(tmp_path, "v1"), "v2": version(tmp_path, "v2"),
                        "v3": version(tmp_path, "v3")},
           "traffic": {"v1": 100},
           "routes": [{"header": "x-model-version", "value": "v2", "version": "v2"},
                      {"header": "X-User", "pattern": "beta-[0-9]+", "version": "v3"},
                      {"parameter": "variant", "value": "b", "version": "v2"},
                      {"parameter": "cohort", "prefix": "exp-", "version": "v3"}]}
    home = tmp_path / "home"
    settings = serve_settings(home, workers=2)
    registry = SqliteModelRegistry(Caches(settings).db)

    def body(**parameters: Any) -> bytes:
        return orjson.dumps({"parameters": parameters, "inputs": [
            {"name": "t", "shape": [1], "datatype": "FP32", "data": [1]}]})

    cases = [({}, BODY, "v1"),
             ({"x-model-version": "v2"}, BODY, "v2"),
             ({"x-model-version": "v7"}, BODY, "v1"),  # no route matches: traffic decides
             ({"x-user": "beta-17"}, BODY, "v3"),
             ({"x-user": "beta-x"}, BODY, "v1"),
             ({}, body(variant="b"), "v2"),
             ({}, body(variant="a"), "v1"),
             ({}, body(cohort="exp-3"), "v3"),
             ({"x-model-version": "v2"}, body(cohort="exp-3"), "v2")]  # first match wins

    def check_routes(s: RunningServer) -> None:
        async def go() -> list[tuple[str, list[Shot]]]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                out = []
                for headers, payload, want in cases:
                    got = await asyncio.gather(*(shoot(c, "/v2/models/m/infer", payload, headers)
                                                 for _ in range(10)))
                    out.append((want, got))
                return out

        for want, got in asyncio.run(go()):
            assert {(x.status, x.version, x.tag) for x in got} == {(200, want, want)}, got

    with RunningServer(settings, [], registry=registry) as s:
        r = s.client.put("/api/v1/models/m", json=doc)
        assert r.status_code == 201, r.text
        check_routes(s)
        check_route_function(s)
        # status: versions, copies and where they are, from the API and the CLI
        m = model(s)
        assert {k: v["status"]["state"] for k, v in m["versions"].items()} == {
            "v1": "Ready", "v2": "Ready", "v3": "Ready"}
        workers = {k: [c["worker"] for c in v["status"]["copies"]] for k, v in m["versions"].items()}
        assert all(len(w) == 1 for w in workers.values()), workers
        placed = [c["placed"] for v in m["versions"].values() for c in v["status"]["copies"]]
        assert all("not full: slot" in x for x in placed), placed
        assert m["routes"][1] == {"header": "X-User", "parameter": None, "value": None,
                                  "prefix": None, "pattern": "beta-[0-9]+", "version": "v3"}
        ls = cm(home, "models", "--url", s.url, "ls").stdout
        print("\n" + ls)
        lines = [line.split() for line in ls.splitlines()]
        assert ["m", "v1", "100%", "Ready"] == lines[1][:4]
        assert ["v2", "0%", "Ready", str(workers["v2"][0])] == lines[2][:4]
        assert any("x-model-version=v2" in line for line in ls.splitlines())
    # a new server on the same store: the same document, the same routes (what was
    # deployed at run time wins over the command line's declaration of the same name)
    declared = ModelSpec(name="m", source=doc["versions"]["v1"]["source"], runtime="custom")
    with RunningServer(serve_settings(home, workers=2), [declared], registry=registry) as s:
        m = model(s)
        assert m["routes"] == r.json()["routes"] and m["traffic"] == {"v1": 100}
        assert m["origin"] == "api" and list(m["versions"]) == ["v1", "v2", "v3"]
        check_routes(s)


@pytest.mark.slow
def test_invalid_documents_get_a_4xx_and_change_nothing(tmp_path: Path):
    good = {"versions": {"v1": version(tmp_path, "v1")}}
    slow = {"versions": {"v1": version(tmp_path, "v1"),
                         "v2": version(tmp_path, "v2", load_delay=1.5)},
            "traffic": {"v1": 50, "v2": 50}}
    with RunningServer(serve_settings(tmp_path / "home", workers=1), []) as s:
        assert s.client.put("/api/v1/models/m", json=good).status_code == 201
        before = model(s)
        v1 = good["versions"]["v1"]
        bad = [
            ({"versions": {"v1": v1, "v2": v1}, "traffic": {"v1": 90, "v2": 20}}, 400,
             "sum to 110, not 100"),
            ({"versions": {"v1": v1}, "traffic": {"v1": 90, "v9": 10}}, 400,
             "unknown version(s) v9"),
            ({"versions": {"v1": v1}, "routes": [{"header": "x", "value": "1", "version": "v2"}]},
             400, "routes.0: unknown version 'v2'"),
            ({"versions": {"v2": {"source": "nope://x"}}}, 400, "unknown source scheme"),
            ({"versions": {"v1": {**v1, "parameters": {"class": "toy:Other"}}}}, 409,
             "versions do not change"),
            ({"name": "other", "versions": {"v1": v1}}, 400, "URL names 'm'"),
            ({"versions": {"v1": v1}, "trafic": {"v1": 100}}, 400, "trafic"),
            ([1, 2], 400, "a model document is a JSON object"),
        ]
        for doc, status, fragment in bad:
            r = s.client.put("/api/v1/models/m", json=doc)
            assert r.status_code == status and fragment in r.json()["error"], (doc, r.text)
        for raw in (b"", b"{not json", b"[" * 5000 + b"]" * 5000):
            r = s.client.put("/api/v1/models/m", content=raw)
            assert r.status_code == 400 and "not a JSON document" in r.json()["error"], r.text
        assert document(model(s)) == document(before)
        # the body is JSON whatever its Content-Type says (curl -d sends a form type)
        r = s.client.put("/api/v1/models/m", content=orjson.dumps(good),
                         headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200 and list(r.json()["versions"]) == ["v1"], r.text
        # one rollout at a time
        async def two() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                first = asyncio.create_task(c.put("/api/v1/models/m", json=slow))
                await asyncio.sleep(0.5)
                second = await c.put("/api/v1/models/m", json=good)
                return await first, second

        first, second = asyncio.run(two())
        assert first.status_code == 200, first.text
        assert second.status_code == 409 and "rolled out already" in second.json()["error"]
        assert model(s)["traffic"] == {"v1": 50, "v2": 50}
        # the same document again is a no-op
        r = s.client.put("/api/v1/models/m", json=model(s))  # GET | PUT round-trips
        assert r.status_code == 200 and r.json()["traffic"] == {"v1": 50, "v2": 50}


@pytest.mark.slow
def test_a_request_routed_before_the_switch_finishes_on_the_old_version(tmp_path: Path):
    """A request that reached v1 while v1 was not loaded waits for v1's load, even
    though v2 takes over (and v1 is dropped) meanwhile: it is answered, by v1."""
    v1 = {"versions": {"v1": version(tmp_path, "v1", load_delay=1.5)}}
    v2 = {"versions": {"v2": version(tmp_path, "v2")}}
    with RunningServer(serve_settings(tmp_path / "home", workers=2), []) as s:
        assert s.client.put("/api/v1/models/m", json=v1).status_code == 201

        async def race() -> tuple[Shot, httpx.Response, Shot, float]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                early = asyncio.create_task(shoot(c, "/v2/models/m/infer"))
                await asyncio.sleep(0.5)  # it waits for v1's load now
                put = asyncio.create_task(c.put("/api/v1/models/m", json=v2))
                while (await c.get("/api/v1/models/m")).json()["traffic"] != {"v2": 100}:
                    await asyncio.sleep(0.01)
                switched = time.monotonic()
                late = await shoot(c, "/v2/models/m/infer")
                return await early, await put, late, switched

        early, put, late, switched = asyncio.run(race())
        assert put.status_code == 200, put.text
        assert (early.status, early.tag) == (200, "v1")
        assert (late.status, late.tag) == (200, "v2")
        assert early.end > switched  # it was still waiting on v1 when v2 took over
        assert list(model(s)["versions"]) == ["v2"]


@pytest.mark.parametrize("version", [3, 4])
def test_stores_written_before_the_merge_open_with_their_models(tmp_path: Path, version: int):
    """Version 3: a mesh store (a document, no bucket: it was always 'models');
    version 4: a store of main with buckets (a simple spec naming its bucket).
    Both open with the current migrations and their models come back as documents."""
    import sqlite3

    from cachemesh.store import db as dbmod

    path = tmp_path / "meta.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    for step in dbmod.MIGRATIONS[:version]:
        step(conn)
    conn.execute(f"PRAGMA user_version = {version}")
    rows = {
        "doc": {"name": "doc", "versions": {"v1": {"source": "/m/1", "runtime": "sklearn"},
                                            "v2": {"source": "/m/2"}},
                "traffic": {"v1": 90, "v2": 10},
                "routes": [{"header": "x-model-version", "value": "v2", "version": "v2"}]},
        "simple": {"name": "simple", "source": "/m/s", "runtime": "sklearn", "version": None,
                   "parameters": {}, "eager": True,
                   **({"bucket": "team-a"} if version == 4 else {})},
    }
    for name, spec in rows.items():
        conn.execute("INSERT INTO models VALUES (?, ?, 0, 0)", (name, orjson.dumps(spec)))
    conn.execute("COMMIT")
    conn.close()
    db = dbmod.Database(path)
    assert db.query("PRAGMA user_version")[0][0] == dbmod.SCHEMA_VERSION == 5
    docs = {d.name: d for d in SqliteModelRegistry(db).list()}
    assert docs["doc"].bucket == "models" and docs["doc"].traffic == {"v1": 90, "v2": 10}
    assert docs["doc"].routes[0].version == "v2"
    simple = docs["simple"]
    assert simple.bucket == ("team-a" if version == 4 else "models") and simple.eager
    assert simple.traffic == {"default": 100} and simple.versions["default"].source == "/m/s"
