"""Preheat through the control API of real ``serve --cluster`` nodes (three, on loopback):
ECI's CreateDataCache with ``Nodes``/``MinCopies``, ``N`` nodes picked once for every
node to read, the same declaration on another node accepted, per-node progress in GET,
and the declarations refused where they cannot mean anything."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time

from cachemesh.client import ControlClient
from cachemesh.cluster import EtcdKV, Keys
from cachemesh.cluster.blob_index import BlobIndex
from cachemesh.store.buckets import REFRESH_S
from tests.cluster.etcd_server import EtcdServer
from tests.cluster.nodes import Cluster, cli, wait_until


def _holders(etcd: EtcdServer, prefix: str, sha: str) -> dict[str, str]:
    async def read() -> dict[str, str]:
        kv = EtcdKV([etcd.endpoint], timeout=2.0)
        try:
            return {h.node: h.state for h in await BlobIndex(kv, Keys(prefix)).holders(sha)}
        finally:
            await kv.close()
    return asyncio.run(read())


def _eci(name: str, folder: str, **extra: object) -> dict[str, object]:
    return {"Name": name, "DataSource": {"Type": "NAS", "Options": {
        "server": "localhost", "path": folder}}, **extra}


def test_eci_nodes_n_picks_nodes_once_and_reports_each(three_nodes: Cluster,
                                                        etcd: EtcdServer) -> None:
    a, b, c = three_nodes["a"], three_nodes["b"], three_nodes["c"]
    folder = three_nodes.origin / "preheat-two"
    folder.mkdir()
    weights = os.urandom(64 * 1024)
    (folder / "weights.bin").write_bytes(weights)
    body = _eci("preheat-two", str(folder), Nodes=2, MinCopies=1)
    first = a.http.post("/api/v1/datacaches", json=body)
    assert first.status_code == 202, first.text
    assigned = first.json()["cluster"]["assigned"]
    assert len(assigned) == 2 and set(assigned) <= {"a", "b", "c"}
    assert first.json()["cluster"]["min_copies"] == 1
    # The same declaration on another node: accepted, the same nodes.
    again = c.http.post("/api/v1/datacaches", json=body)
    assert again.status_code == 202, again.text
    assert again.json()["cluster"]["assigned"] == assigned

    def progress() -> dict | None:
        seen = b.http.get("/api/v1/datacaches/preheat-two").json()
        done = {n: p["state"] for n, p in seen["nodes"].items()}
        return seen if done == {n: "Available" for n in assigned} else None

    seen = wait_until(progress, 30, "the two picked nodes to hold the cache", every=0.2)
    assert seen["node"] == "b"
    assert all(p["progress"] == 1.0 for p in seen["nodes"].values())
    left_out = ({"a", "b", "c"} - set(assigned)).pop()
    out = three_nodes[left_out].http.get("/api/v1/datacaches/preheat-two").json()
    assert out["status"] == "Pending" and out["node"] == left_out  # declared, not here
    assert out["cluster"]["expected"] == sorted(assigned) and out["cluster"]["done"]
    # The event stream shows each node's progress, on a node that does not hold the cache
    # too, and ends once every expected node is done.
    client = ControlClient(three_nodes[left_out].url, timeout=30)
    stream = list(client.datacache_events("preheat-two"))
    assert {e.kind for e in stream} == {"nodes"}, stream  # nothing local to report
    last = stream[-1].data
    assert last["done"] and last["expected"] == sorted(assigned)
    assert {n: p["state"] for n, p in last["nodes"].items()} == dict.fromkeys(
        assigned, "Available")
    # On a node that holds it: its own events, progress and status, then the nodes.
    kinds = [e.kind for e in ControlClient(three_nodes[assigned[0]].url, timeout=30)
             .datacache_events("preheat-two")]
    assert {"event", "progress", "status", "nodes"} <= set(kinds), kinds
    # Another declaration under the name: 409.
    other = b.http.post("/api/v1/datacaches", json=_eci("preheat-two", str(folder), Nodes=1))
    assert other.status_code == 409, other.text

    # The blob index follows each store: the picked nodes are announced as holders of the
    # weights (a local source: no fetch wrote them), and a node that removes the cache
    # and collects its blobs is withdrawn at once.
    sha, prefix = hashlib.sha256(weights).hexdigest(), three_nodes.extra_env[
        "CACHEMESH_CLUSTER_PREFIX"]
    wait_until(lambda: _holders(etcd, prefix, sha) == {n: "held" for n in assigned}, 15,
               "the picked nodes announced as holders", every=0.3)
    gone = three_nodes[assigned[0]]
    assert gone.http.delete("/api/v1/datacaches/preheat-two").status_code == 204
    # Withdrawn by the removal itself, not seconds later by the server's reconcile.
    assert _holders(etcd, prefix, sha) == {assigned[1]: "held"}
    # Its preheat entry went with its copy: the others count one copy now.
    after = a.http.get("/api/v1/datacaches/preheat-two").json()
    assert set(after["nodes"]) == {assigned[1]} and not after["cluster"]["done"], after

    # The declaration itself goes with ?cluster=true; the other copy stays where it is.
    assert three_nodes[left_out].http.delete(
        "/api/v1/datacaches/preheat-two", params={"cluster": "true"}).status_code == 204
    assert three_nodes[left_out].http.get("/api/v1/datacaches/preheat-two").status_code == 404
    kept = three_nodes[assigned[1]].http.get("/api/v1/datacaches/preheat-two").json()
    assert kept["status"] == "Available" and "nodes" not in kept
    again = a.http.post("/api/v1/datacaches", json=_eci("preheat-two", str(folder), Nodes=1))
    assert again.status_code == 202, again.text  # the name is free cluster-wide again


def test_bad_nodes_are_refused(three_nodes: Cluster) -> None:
    a = three_nodes["a"]
    folder = three_nodes.origin / "preheat-bad"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"x")
    for nodes in (0, "NOT A NAME", [], True):
        answer = a.http.post("/api/v1/datacaches", json={
            "name": "preheat-bad", "source": str(folder), "nodes": nodes})
        assert answer.status_code in (400, 422), (nodes, answer.text)
    assert a.http.get("/api/v1/datacaches/preheat-bad").status_code == 404


def test_a_protected_buckets_declaration_needs_its_token(three_nodes: Cluster) -> None:
    """On a node where the bucket is protected, a cache declared cluster-wide in it is
    described (and streamed) only to a caller with the bucket's token, as a local cache
    of that bucket is: not even its declaration shows without it."""
    a = three_nodes["a"]
    secret = "vault-token-0123456789abcdef"
    done = subprocess.run([*cli(), "bucket", "protect", "vault", "--token-stdin"],
                          input=secret, env=three_nodes.env("a"), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    time.sleep(REFRESH_S + 0.2)  # how long a server may trust its copy of the bucket table
    folder = three_nodes.origin / "vaulted"
    folder.mkdir()
    (folder / "w.bin").write_bytes(os.urandom(1000))
    token = {"X-Cachemesh-Bucket-Token": secret}
    body = {"name": "vaulted", "source": str(folder), "bucket": "vault", "nodes": ["b"]}
    assert a.http.post("/api/v1/datacaches", json=body).status_code == 403
    created = a.http.post("/api/v1/datacaches", json=body, headers=token)
    assert created.status_code == 202, created.text
    assert a.http.get("/api/v1/datacaches/vaulted").status_code == 404
    assert a.http.get("/api/v1/datacaches/vaulted/events").status_code == 404
    seen = a.http.get("/api/v1/datacaches/vaulted", headers=token)
    assert seen.status_code == 200 and seen.json()["cluster"]["expected"] == ["b"]
