"""Faults of a node in a cluster (issue 17 item 5), on three real ``cachemesh serve``
processes of this module's own (the tests stop them): SIGKILL of the node holding a hot
model (its lease expires in 2 s, its copies are forgotten, requests load it elsewhere)
and SIGTERM (the node drains: its hot model is loaded elsewhere before it exits).
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.cluster.etcd_server import EtcdServer
from tests.cluster.nodes import Cluster, wait_until
from tests.cluster.test_forwarding import X, deploy, holders, loads

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def nodes(etcd: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("faults"), etcd.url,
                      f"/test-{uuid.uuid4().hex[:12]}/")
    try:
        cluster.start_all(["a", "b", "c"])
        yield cluster
    finally:
        for node in cluster.nodes.values():
            node.kill()


def test_sigkill_failover(nodes: Cluster) -> None:
    """The holder dies: what it held fails (5xx, an error event), never replayed; the
    next requests load the model elsewhere."""
    marks = deploy(nodes, "m1", load_delay=0.3)
    holder = nodes["a"].http.post("/v2/models/m1/infer", json=X).headers["cachemesh-node"]
    survivor = next(n for n in ("a", "b", "c") if n != holder)
    url = nodes[survivor].url
    wait_until(lambda: holders(nodes, survivor, "m1") == [holder], 5, "m1's copy record")
    with concurrent.futures.ThreadPoolExecutor(2) as pool, httpx.stream(
            "POST", f"{url}/v1/chat/completions", timeout=15, json={
                "model": "m1", "stream": True, "messages": [
                    {"role": "user", "content": "slow " + " ".join(["w"] * 60)}]}) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert "choices" in first
        # A request the holder took and runs for 3 s.
        running = pool.submit(httpx.post, f"{url}/v2/models/m1/infer", timeout=15,
                              json={**X, "parameters": {"delay": 3}})
        time.sleep(0.5)
        nodes[holder].kill()
        killed = time.monotonic()
        rest = [line for line in lines if line.startswith("data: ")]
        cut = running.result()
    assert cut.status_code >= 500 and cut.status_code != 504, cut.text  # not replayed
    assert rest and "[DONE]" not in rest and "node_lost" in rest[-1], rest[-3:]
    failed = 0
    while True:
        r = httpx.post(f"{url}/v2/models/m1/infer", json=X, timeout=15)
        if r.status_code == 200:
            break
        failed += 1
        assert time.monotonic() - killed < 10, r.text
    assert r.headers["cachemesh-node"] != holder
    assert failed <= 1  # a node that refuses connections is retried elsewhere
    assert loads(marks) == 2  # loaded again once, not once per request
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
