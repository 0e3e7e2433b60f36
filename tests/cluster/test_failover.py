"""Faults of a node in a cluster (issue 17 item 5), on three real ``cachemesh serve``
processes of this module's own (the tests stop them): SIGKILL of the node holding a hot
model (its lease expires in 2 s, its copies are forgotten, requests load it elsewhere)
and SIGTERM (the node drains: its hot model is loaded elsewhere before it exits).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.cluster.etcd_server import EtcdServer
from tests.cluster.nodes import Cluster, wait_until
from tests.cluster.test_forwarding import X, deploy

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def nodes(etcd: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("faults"), etcd.url,
                      f"/test-{uuid.uuid4().hex[:12]}/")
    try:
        for name in ("a", "b", "c"):
            cluster.start(name, wait=False)
        for name in ("a", "b", "c"):
            wait_until(cluster[name].live, 60, f"node {name} to listen")
        cluster.wait_members(["a", "b", "c"])
        yield cluster
    finally:
        for node in cluster.nodes.values():
            node.kill()


def test_sigkill_failover(nodes: Cluster) -> None:
    deploy(nodes, "m1", load_delay=0.3)
    holder = nodes["a"].http.post("/v2/models/m1/infer", json=X).headers["cachemesh-node"]
    survivor = next(n for n in ("a", "b", "c") if n != holder)
    nodes[holder].kill()
    started = time.monotonic()
    failed = 0
    while True:
        r = httpx.post(f"{nodes[survivor].url}/v2/models/m1/infer", json=X, timeout=15)
        if r.status_code == 200:
            break
        failed += 1
        assert time.monotonic() - started < 10, r.text
    assert r.headers["cachemesh-node"] != holder
    assert failed <= 1  # a node that refuses connections is retried elsewhere
    nodes.nodes.pop(holder)


def test_sigterm_drains(nodes: Cluster) -> None:
    names = sorted(nodes.nodes)
    holder = nodes[names[0]].http.post("/v2/models/m1/infer", json=X).headers["cachemesh-node"]
    other = next(n for n in names if n != holder)
    nodes[holder].proc.terminate()
    codes = []
    while nodes[holder].proc.poll() is None:
        r = httpx.post(f"{nodes[other].url}/v2/models/m1/infer", json=X, timeout=15)
        codes.append(r.status_code)
    assert nodes[holder].proc.wait(20) == 0
    r = httpx.post(f"{nodes[other].url}/v2/models/m1/infer", json=X, timeout=15)
    assert r.status_code == 200 and r.headers["cachemesh-node"] == other
    assert codes and set(codes) == {200}, codes
