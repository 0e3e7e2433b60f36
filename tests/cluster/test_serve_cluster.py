"""Cluster mode, part A, against real ``cachemesh serve --cluster`` processes and a real
etcd (issue 17 items 1, 2, 3, 8): joining and its refusals, declarations shared by every
node, idempotent declarations, 409 on conflicting writes, the nodes listing, metrics."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

from cachemesh.cluster import EtcdKV, Keys
from tests.cluster.etcd_server import EtcdServer
from tests.cluster.nodes import Cluster, cli, node_env, toy_spec, wait_until


def _doc(spec: dict, **extra: object) -> dict:
    return {"versions": {"v1": {k: spec[k] for k in ("source", "runtime", "parameters")}},
            **extra}


def test_nodes_listing_cli_and_metrics(three_nodes: Cluster) -> None:
    a, c = three_nodes["a"], three_nodes["c"]
    body = a.nodes()
    by_name = {n["name"]: n for n in body["nodes"]}
    assert sorted(by_name) == ["a", "b", "c"]
    assert by_name["a"]["self"] and not by_name["b"]["self"]
    for name, node in by_name.items():
        assert node["advertise"] == three_nodes[name].url
        assert node["http"] == f"127.0.0.1:{three_nodes[name].port}"
        assert node["grpc"] == f"127.0.0.1:{three_nodes[name].grpc_port}"
        assert node["healthy"] and not node["degraded"]
        assert "node_id" not in node
    assert body["cluster"]["name"] == "a" and body["cluster"]["state"] == "active"
    assert sum(1 for n in ("a", "b", "c")
               if three_nodes[n].nodes()["cluster"]["leader"]) == 1
    # the command line, over the control API of another node
    env = node_env(three_nodes.root / "cli", CACHEMESH_URL=c.url)
    out = subprocess.run([*cli(), "nodes", "ls", "--json"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert sorted(n["name"] for n in json.loads(out.stdout)) == ["a", "b", "c"]
    table = subprocess.run([*cli(), "nodes", "ls"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert table.returncode == 0 and "c*" in table.stdout and a.url in table.stdout
    def renewals() -> float:
        metrics = a.http.get("/metrics").text
        assert "cachemesh_cluster_degraded 0.0" in metrics
        assert "cachemesh_cluster_etcd_errors_total" in metrics
        (line,) = [line for line in metrics.splitlines()
                   if line.startswith("cachemesh_cluster_lease_renewals_total ")]
        return float(line.split()[1])

    wait_until(lambda: renewals() >= 1, 5, "a lease renewal (every TTL/3 = 0.7 s)")


def test_declared_on_a_loads_and_answers_on_b(three_nodes: Cluster) -> None:
    a, b, c = three_nodes["a"], three_nodes["b"], three_nodes["c"]
    spec = toy_spec(three_nodes.origin, "shared-m")
    r = a.http.post("/api/v1/models", json=spec)
    assert r.status_code == 201, r.text
    wait_until(lambda: b.model("shared-m").status_code == 200, 10, "b to know shared-m")
    r = b.infer("shared-m", 3.0)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [3.0]

    def held_by_b() -> bool:  # every node sees where the copy is (copies/ in etcd)
        version = c.model("shared-m").json()["versions"]["default"]["status"]
        return [(n["node"], n["state"]) for n in version.get("nodes", [])] == [("b", "ready")]

    wait_until(held_by_b, 10, "c to see the ready copy on b")
    listing = c.http.get("/api/v1/models").json()
    (m,) = [m for m in listing["models"] if m["name"] == "shared-m"]
    assert m["versions"]["default"]["status"]["nodes"][0]["state"] == "ready"
    # removed on c: gone everywhere, its copy on b unloaded
    assert c.http.delete("/api/v1/models/shared-m").status_code == 204
    for node in (a, b):
        wait_until(lambda n=node: n.model("shared-m").status_code == 404, 10,
                   f"{node.name} to forget shared-m")
    wait_until(lambda: not [n for n in b.nodes()["nodes"] if n["name"] == "b"][0]["copies"],
               10, "b's record to hold no copy")


def test_same_document_from_every_node_is_one_write(three_nodes: Cluster) -> None:
    doc = _doc(toy_spec(three_nodes.origin, "daemonset-m"))
    first = three_nodes["a"].http.put("/api/v1/models/daemonset-m", json=doc)
    assert first.status_code == 201, first.text
    etag = first.headers["etag"]
    for name in ("b", "c", "a"):
        again = three_nodes[name].http.put("/api/v1/models/daemonset-m", json=doc)
        assert again.status_code == 200, again.text
        assert again.headers["etag"] == etag  # not written again
    spec = toy_spec(three_nodes.origin, "daemonset-s")
    assert three_nodes["b"].http.post("/api/v1/models", json=spec).status_code == 201
    wait_until(lambda: three_nodes["c"].model("daemonset-s").status_code == 200, 10, "c")
    assert three_nodes["c"].http.post("/api/v1/models", json=spec).status_code == 200
    # the V2 repository extension declares through the same registry: loaded on c, known on a
    repo = toy_spec(three_nodes.origin, "daemonset-r")
    r = three_nodes["c"].http.post("/v2/repository/models/daemonset-r/load", json={
        "parameters": {"source": repo["source"], "runtime": "custom",
                       "config": repo["parameters"]}})
    assert r.status_code == 200, r.text
    wait_until(lambda: three_nodes["a"].model("daemonset-r").status_code == 200, 10,
               "a to know the model c's repository extension declared")


def test_conflicting_writes_on_one_revision(three_nodes: Cluster) -> None:
    a, b = three_nodes["a"], three_nodes["b"]
    spec = toy_spec(three_nodes.origin, "contested")
    created = a.http.put("/api/v1/models/contested", json=_doc(spec))
    assert created.status_code == 201, created.text
    revision = created.headers["etag"]
    wait_until(lambda: b.model("contested").headers.get("etag") == revision, 10, "b's view")
    one = _doc(spec, scaling={"max_copies": 1})
    other = _doc(spec, scaling={"max_copies": 2})
    won = a.http.put("/api/v1/models/contested", json=one, headers={"If-Match": revision})
    assert won.status_code == 200, won.text
    lost = b.http.put("/api/v1/models/contested", json=other, headers={"If-Match": revision})
    assert lost.status_code == 409, lost.text
    assert "revision" in lost.json()["error"]
    # a stale revision loses even for a document no one wrote; a bad header is 400
    stale = a.http.put("/api/v1/models/contested", json=other, headers={"If-Match": revision})
    assert stale.status_code == 409
    assert a.http.put("/api/v1/models/contested", json=other,
                      headers={"If-Match": "x"}).status_code == 400
    wait_until(lambda: b.model("contested").json().get("scaling", {}).get("max_copies") == 1
               or b.model("contested").headers.get("etag") == won.headers["etag"], 10,
               "b to follow the winner")
    assert b.model("contested").headers["etag"] == won.headers["etag"]


def test_missing_local_source_is_reported(three_nodes: Cluster) -> None:
    a = three_nodes["a"]
    spec = toy_spec(three_nodes.origin, "local-only")
    assert a.http.post("/api/v1/models", json=spec).status_code == 201
    shutil.rmtree(spec["source"])  # now no node has it

    def reason() -> str | None:
        me = [n for n in a.nodes()["nodes"] if n["self"]][0]
        return me["cannot_load"].get("local-only")

    assert "does not exist on this node" in wait_until(reason, 10, "a to report it")
    a.http.delete("/api/v1/models/local-only")


def test_refusals_and_taking_the_place_back(three_nodes: Cluster, etcd: EtcdServer) -> None:
    # no token: one line, no traceback, a non-zero exit, before anything starts
    env = three_nodes.env("x")
    del env["CACHEMESH_CLUSTER_TOKEN"]
    out = subprocess.run([*cli(), "serve", "--port", "0", "--cluster", etcd.url,
                          "--node-name", "x", "--advertise", "http://127.0.0.1:9"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "CACHEMESH_CLUSTER_TOKEN" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    # a second live node named "a" (another store): refused
    out = subprocess.run([*cli(), "serve", "--port", "0", "--cluster", etcd.url,
                          "--node-name", "a", "--advertise", "http://127.0.0.1:9"],
                         env=three_nodes.env("a2"), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 4, out.stderr
    assert "taken" in out.stderr and "Traceback" not in out.stderr
    # killed, restarted on the same store: it takes its place back at once (its record
    # outlives it for the lease's 30 s) and revokes the old lease
    d = three_nodes.start("d", CACHEMESH_CLUSTER_LEASE_TTL="30")
    keys = Keys(three_nodes.extra_env["CACHEMESH_CLUSTER_PREFIX"])

    async def lease_of(name: str) -> tuple[int, int | None]:
        kv = EtcdKV([etcd.endpoint], timeout=3.0)
        try:
            found = await kv.get(keys.node(name))
            assert found is not None
            return found.lease, await kv.lease_ttl(found.lease)
        finally:
            await kv.close()

    old, _ = asyncio.run(lease_of("d"))
    d.kill()
    started = time.monotonic()
    d = three_nodes.start("d", CACHEMESH_CLUSTER_LEASE_TTL="30")
    wait_until(lambda: "d" in three_nodes["a"].node_names(), 10, "a to list d")
    new, _ = asyncio.run(lease_of("d"))
    assert new != old and time.monotonic() - started < 15

    async def ttl(lease: int) -> int | None:
        kv = EtcdKV([etcd.endpoint], timeout=3.0)
        try:
            return await kv.lease_ttl(lease)
        finally:
            await kv.close()

    assert asyncio.run(ttl(old)) is None  # revoked, not left to run out
    d.stop()
    wait_until(lambda: "d" not in three_nodes["a"].node_names(), 10, "d to leave")
