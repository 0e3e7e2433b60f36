"""Cluster mode when etcd fails (issue 17 item 6), with real ``cachemesh serve --cluster``
nodes on an etcd of the test's own: etcd stopped (serving goes on, readiness stays 200
and says degraded, declarations 503, resync when it returns) and etcd replaced by an empty
one (the nodes re-register and restore the declarations, a deleted model staying deleted).
Then etcd over TLS with client certificates from a CA the test makes."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from cachemesh.cluster import EtcdKV, Keys
from tests.cluster.conftest import require_etcd
from tests.cluster.etcd_server import EtcdServer, TLSFiles
from tests.cluster.nodes import Cluster, ServeNode, cli, toy_spec, wait_until

PREFIX = "/outage/"


@pytest.fixture
def two_nodes(own_etcd: EtcdServer, tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path / "nodes", own_etcd.url, PREFIX)
    try:
        cluster.start_all(["a", "b"])
        yield cluster
    finally:
        cluster.stop()


def _in_etcd(etcd: EtcdServer, under: str) -> list[str]:
    """The names of the keys under ``under``, read from etcd itself."""
    async def read() -> list[str]:
        kv = EtcdKV([etcd.endpoint], timeout=2.0)
        try:
            return [Keys(PREFIX).name_of(x.key, under) for x in (await kv.get_prefix(under)).kvs]
        finally:
            await kv.close()

    return asyncio.run(read())


def _models_in_etcd(etcd: EtcdServer) -> list[str]:
    return _in_etcd(etcd, Keys(PREFIX).models)


def _degraded(node: ServeNode) -> bool:
    r = node.http.get("/v2/health/ready")
    return r.status_code == 200 and r.json()["degraded"] is True


def test_etcd_stopped_then_back_then_replaced_empty(own_etcd: EtcdServer,
                                                     two_nodes: Cluster) -> None:
    a, b = two_nodes["a"], two_nodes["b"]
    for name in ("kept", "gone", "later"):
        assert a.http.post("/api/v1/models",
                           json=toy_spec(two_nodes.origin, name)).status_code == 201
    assert b.http.delete("/api/v1/models/gone").status_code == 204
    wait_until(lambda: b.model("kept").status_code == 200, 10, "b to know kept")
    assert b.infer("kept").status_code == 200  # loaded on b
    wait_until(lambda: a.model("gone").status_code == 404, 10, "a to forget gone")
    time.sleep(0.2)  # the local copies are written 50 ms after a change

    # etcd stops: both keep serving; readiness 200 and degraded; declarations 503
    own_etcd.stop()
    for node in (a, b):
        wait_until(lambda n=node: _degraded(n), 10, f"{node.name} to be degraded")
    assert b.infer("kept", 2.0).json()["outputs"][0]["data"] == [2.0]
    refused = a.http.post("/api/v1/models", json=toy_spec(two_nodes.origin, "during"))
    assert refused.status_code == 503, refused.text
    assert "etcd" in refused.json()["error"]
    assert a.http.delete("/api/v1/models/later").status_code == 503
    me, other = sorted(a.nodes()["nodes"], key=lambda n: not n["self"])
    assert me["degraded"] and not me["healthy"] and not me["stale"]
    # what a last saw of b, which nobody can confirm now
    assert other["name"] == "b" and other["stale"] and not other["healthy"]
    assert "cachemesh_cluster_degraded 1.0" in a.http.get("/metrics").text

    # back with its data: resync by itself within 10 s
    own_etcd.start()
    back = time.monotonic()
    for node in (a, b):
        wait_until(lambda n=node: not _degraded(n), 10, f"{node.name} to resync")
    assert time.monotonic() - back < 10
    assert a.http.post("/api/v1/models",
                       json=toy_spec(two_nodes.origin, "after")).status_code == 201
    wait_until(lambda: b.model("after").status_code == 200, 10, "b to see a's declaration")

    # replaced by an empty etcd: the nodes re-register and restore what they last saw
    own_etcd.replace()
    lost = time.monotonic()
    wait_until(lambda: sorted(_models_in_etcd(own_etcd)) == ["after", "kept", "later"], 10,
               "the declarations to be restored", every=0.2)
    wait_until(lambda: _in_etcd(own_etcd, Keys(PREFIX).nodes) == ["a", "b"], 10,
               "both nodes to re-register in the new etcd", every=0.2)
    for node in (a, b):
        wait_until(lambda n=node: n.nodes()["cluster"]["data_losses"] >= 1
                   and n.nodes()["cluster"]["state"] == "active" and not _degraded(n),
                   10, f"{node.name} to know etcd lost its data, and be active again")
    assert time.monotonic() - lost < 10
    assert a.model("gone").status_code == 404 and b.model("gone").status_code == 404
    assert b.infer("kept", 4.0).json()["outputs"][0]["data"] == [4.0]
    # and the cluster works on the new etcd: a declaration on b reaches a
    r = b.http.post("/api/v1/models", json=toy_spec(two_nodes.origin, "new-era"))
    assert r.status_code == 201, r.text
    wait_until(lambda: a.model("new-era").status_code == 200, 10, "a to see b's declaration")

    # every node stopped, etcd emptied meanwhile: the first node back restores from its store
    time.sleep(0.2)  # (the local copy is written 50 ms after a change)
    two_nodes.stop()
    own_etcd.replace()
    two_nodes.start("a")
    assert sorted(_models_in_etcd(own_etcd)) == ["after", "kept", "later", "new-era"]


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[tuple[EtcdServer, Path]]:
    require_etcd()
    ca = trustme.CA()
    certs = tmp_path / "certs"
    certs.mkdir()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    server_cert.private_key_pem.write_to_path(str(certs / "server-key.pem"))
    server_cert.cert_chain_pems[0].write_to_path(str(certs / "server.pem"))
    ca.cert_pem.write_to_path(str(certs / "ca.pem"))
    client = ca.issue_cert("node-a")
    client.private_key_pem.write_to_path(str(certs / "node-key.pem"))
    client.cert_chain_pems[0].write_to_path(str(certs / "node.pem"))
    https = ca.issue_cert("127.0.0.1")  # the node's own HTTPS listener
    https.private_key_pem.write_to_path(str(certs / "https-key.pem"))
    https.cert_chain_pems[0].write_to_path(str(certs / "https.pem"))
    server = EtcdServer(tmp_path / "etcd", tls=TLSFiles(
        cert=certs / "server.pem", key=certs / "server-key.pem", client_ca=certs / "ca.pem"))
    try:
        server.start()
        yield server, certs
    finally:
        server.stop()


def test_node_joins_etcd_over_tls_and_serves_https(
        tls_etcd: tuple[EtcdServer, Path], tmp_path: Path) -> None:
    server, certs = tls_etcd
    cluster = Cluster(tmp_path / "nodes", server.url, "/tls/",
                      CACHEMESH_CLUSTER_CA=str(certs / "ca.pem"))
    try:
        node = cluster.start("a", "--etcd-cacert", str(certs / "ca.pem"),
                             "--etcd-cert", str(certs / "node.pem"),
                             "--etcd-key", str(certs / "node-key.pem"),
                             "--tls-cert", str(certs / "https.pem"),
                             "--tls-key", str(certs / "https-key.pem"),
                             https_ca=certs / "ca.pem")
        body = node.nodes()
        assert [n["advertise"] for n in body["nodes"]] == [node.url]
        assert node.url.startswith("https://")
        assert body["cluster"]["etcd"].startswith("https://")
        assert node.http.post("/api/v1/models",
                              json=toy_spec(cluster.origin, "over-tls")).status_code == 201
        # without the client certificate etcd refuses the node: one line, no traceback
        env = cluster.env("b")
        out = subprocess.run([*cli(), "serve", "--port", "0", "--cluster", server.url,
                              "--node-name", "b", "--advertise", "http://127.0.0.1:9",
                              "--etcd-cacert", str(certs / "ca.pem")],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "TLS" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    finally:
        cluster.stop()
