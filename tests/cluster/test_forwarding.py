"""Any node answers any request (issue 17 items 4-6), on three real ``cachemesh serve``
processes over one real etcd (``three_nodes``): forwarding (REST V2, gRPC V2, a streamed
OpenAI chat), the hop limit and the cluster token, one load cluster-wide for concurrent
first requests, a failed load tried on another node, min_copies. The faults (SIGKILL,
SIGTERM) are in test_failover.py, on nodes of their own.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from tests.cluster.nodes import TOKEN, Cluster, toy_spec, wait_until

pytestmark = pytest.mark.timeout(120)

X = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


@pytest.fixture(scope="module")
def nodes(three_nodes: Cluster) -> Cluster:
    return three_nodes


def deploy(cluster: Cluster, name: str, via: str = "a", **params: Any) -> Path:
    marks = cluster.root / "marks" / name
    spec = toy_spec(cluster.origin, name, marks=marks, **params)
    r = cluster[via].http.post("/api/v1/models", json=spec)
    assert r.status_code in (200, 201), r.text
    for node in cluster.nodes.values():  # every node knows it (the registry's watch)
        if node.proc.poll() is None:
            wait_until(lambda n=node: n.model(name).status_code == 200, 10,
                       f"{name} declared on {node.name}")
    return marks


def loads(marks: Path) -> int:
    return len(list(marks.glob("load-*"))) if marks.exists() else 0


def holders(cluster: Cluster, via: str, model: str) -> list[str]:
    body = cluster[via].model(model).json()
    return sorted(n["node"] for v in body["versions"].values() for n in v["status"]["nodes"]
                  if n["state"] == "ready")


def pulled(cluster: Cluster, node: str, model: str) -> bool:
    """Whether ``node``'s store holds the blob of the toy model's weights."""
    digest = hashlib.sha256((cluster.origin / model / "weights.bin").read_bytes()).hexdigest()
    return (cluster.root / node / "home" / "blobs" / "sha256" / digest[:2] / digest).exists()


def status(cluster: Cluster, via: str, model: str) -> dict[str, Any]:
    version: dict[str, Any] = cluster[via].model(model).json()["versions"]["default"]["status"]
    return version


NOT_HERE = "not on this node; files are pulled when placed here"


def test_a_node_pulls_a_model_only_when_it_is_placed_there(nodes: Cluster) -> None:
    deploy(nodes, "lz1")  # declared on a, known on every node
    for name in ("a", "b", "c"):  # no pull at declaration: status says why
        found = status(nodes, name, "lz1")
        assert (found["state"], found["reason"], found["view"]) == ("Unloaded", NOT_HERE,
                                                                    None), found
    r = nodes["c"].infer("lz1", 2.0)  # loaded nowhere: one load, on one node
    assert r.status_code == 200, r.text
    holder = r.headers["cachemesh-node"]
    assert wait_until(lambda: holders(nodes, "a", "lz1") == [holder], 5, "lz1's copy")
    assert [n for n in ("a", "b", "c") if pulled(nodes, n, "lz1")] == [holder]
    assert status(nodes, holder, "lz1")["view"]
    for name in {"a", "b", "c"} - {holder}:
        assert status(nodes, name, "lz1")["reason"] == NOT_HERE
    # V2 metadata of a version pulled nowhere, asked of every node at once (none has its
    # files): placed like an inference, one node pulls and loads it, all answer from there.
    deploy(nodes, "lz2")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        metas = list(pool.map(lambda n: httpx.get(f"{nodes[n].url}/v2/models/lz2", timeout=20),
                              ["a", "b", "c"]))
    assert [m.status_code for m in metas] == [200] * 3, [m.text for m in metas]
    assert {(m.json()["name"], m.json()["platform"]) for m in metas} == {("lz2", "blackbox-toy")}
    (holder,) = {m.headers["cachemesh-node"] for m in metas}
    assert [n for n in ("a", "b", "c") if pulled(nodes, n, "lz2")] == [holder]
    # The same over gRPC (ModelMetadata), the answering node in the trailing metadata.
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    deploy(nodes, "lz5")

    def grpc_metadata(node: str) -> tuple[str, str]:
        with grpc.insecure_channel(f"127.0.0.1:{nodes[node].grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            answer, call = stub.ModelMetadata.with_call(
                service_pb2.ModelMetadataRequest(name="lz5"), timeout=20)
        return answer.platform, dict(call.trailing_metadata())["cachemesh-node"]

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = set(pool.map(grpc_metadata, ["a", "b", "c"]))
    ((platform, holder),) = answers
    assert platform == "blackbox-toy"
    assert [n for n in ("a", "b", "c") if pulled(nodes, n, "lz5")] == [holder]


def test_eager_loads_on_every_node(nodes: Cluster) -> None:
    spec = {**toy_spec(nodes.origin, "lz4"), "eager": True}
    assert nodes["c"].http.post("/api/v1/models", json=spec).status_code == 201
    # In a cluster, eager means every node: each pulls and loads it, with no request.
    wait_until(lambda: holders(nodes, "a", "lz4") == ["a", "b", "c"], 10, "lz4 everywhere")
    assert all(pulled(nodes, n, "lz4") for n in ("a", "b", "c"))


def test_placement_prefers_the_node_that_has_the_files(nodes: Cluster) -> None:
    b, c = nodes["b"], nodes["c"]
    deploy(nodes, "lz3")
    # Loaded on b (the repository extension loads where it is asked), then unloaded:
    # b keeps the files, and its record says so.
    assert b.http.post("/v2/repository/models/lz3/load").status_code == 200
    assert b.http.post("/v2/repository/models/lz3/unload").status_code == 200

    def b_has_files_and_no_copy() -> bool:
        (record,) = [n for n in c.nodes()["nodes"] if n["name"] == "b"]
        return (record["prepared"].get("lz3") == ["default"]
                and not any(x["model"] == "lz3" for x in record["copies"])
                and not holders(nodes, "c", "lz3"))

    wait_until(b_has_files_and_no_copy, 12, "b's record: lz3's files, no copy")
    r = c.infer("lz3")  # loaded nowhere: b, which has the files, over a and c
    assert r.status_code == 200, r.text
    assert r.headers["cachemesh-node"] == "b"
    assert not pulled(nodes, "a", "lz3") and not pulled(nodes, "c", "lz3")


def test_rest_v2_forwarded_and_one_load_for_concurrent_first_requests(nodes: Cluster) -> None:
    marks = deploy(nodes, "m1", load_delay=0.5)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(
            lambda n: httpx.post(f"{nodes[n].url}/v2/models/m1/infer", json=X, timeout=30),
            ["a", "b", "c", "a", "b", "c"]))
    assert [r.status_code for r in replies] == [200] * 6, [r.text for r in replies]
    answered = {r.headers["cachemesh-node"] for r in replies}
    assert len(answered) == 1, answered  # every node's request went to the one copy
    assert loads(marks) == 1  # one load in the whole cluster
    holder = answered.pop()
    assert wait_until(lambda: holders(nodes, "a", "m1") == [holder], 5, "copy record")
    other = next(n for n in ("a", "b", "c") if n != holder)
    r = nodes[other].infer("m1")
    r = httpx.post(f"{nodes[other].url}/v2/models/m1/infer", json=X, timeout=10)
    assert r.status_code == 200 and r.headers["cachemesh-node"] == holder
    assert r.json()["outputs"][0]["data"] == [1, 2, 3, 4]
    assert TOKEN not in str(r.headers) and "cachemesh-cluster-token" not in r.headers
    stats = nodes[other].http.get("/api/v1/models/m1/stats")  # a control read, forwarded
    assert stats.json()["loaded"] and stats.headers["cachemesh-node"] == holder
    meta = nodes[other].http.get("/metrics").text
    assert 'cachemesh_forwards_total{outcome="ok"}' in meta


def test_grpc_v2_forwarded(nodes: Cluster) -> None:
    import tritonclient.grpc as triton
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    marks = deploy(nodes, "g1")
    first = nodes["b"].http.post("/v2/models/g1/infer", json=X)
    holder = first.headers["cachemesh-node"]
    other = next(n for n in ("a", "b", "c") if n != holder)
    wait_until(lambda: holders(nodes, other, "g1") == [holder], 5, "g1's copy record")
    client = triton.InferenceServerClient(f"127.0.0.1:{nodes[other].grpc_port}")
    x = triton.InferInput("x", [1, 4], "FP32")
    import numpy as np

    x.set_data_from_numpy(np.array([[1, 2, 3, 4]], dtype=np.float32))
    result = client.infer("g1", [x])
    assert result.as_numpy("x").tolist() == [[1, 2, 3, 4]]
    assert client.get_model_metadata("g1").platform == "blackbox-toy"
    # The node that answered, in the trailing metadata of the call.
    with grpc.insecure_channel(f"127.0.0.1:{nodes[other].grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="g1")
        t = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        t.contents.fp32_contents.extend([1, 2, 3, 4])
        _, call = stub.ModelInfer.with_call(request, timeout=10)
        assert dict(call.trailing_metadata())["cachemesh-node"] == holder
        missing = service_pb2.ModelInferRequest(model_name="no-such-model")
        streamed = list(stub.ModelStreamInfer(iter([request, missing, request]), timeout=10))
        assert [bool(r.error_message) for r in streamed] == [False, True, False]
        assert list(streamed[2].infer_response.outputs[0].shape) == [1, 4]
        with pytest.raises(grpc.RpcError) as refused:  # posing as a node, without the token
            stub.ModelInfer(request, timeout=10, metadata=[("cachemesh-forwarded-by", "x")])
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert loads(marks) == 1  # every call above went to the one copy


def test_openai_stream_forwarded(nodes: Cluster) -> None:
    deploy(nodes, "chat1")
    first = nodes["c"].http.post("/v1/chat/completions", json={
        "model": "chat1", "messages": [{"role": "user", "content": "warm up"}]})
    assert first.status_code == 200, first.text
    holder = first.headers["cachemesh-node"]
    other = next(n for n in ("a", "b", "c") if n != holder)
    with httpx.stream("POST", f"{nodes[other].url}/v1/chat/completions", timeout=10, json={
            "model": "chat1", "stream": True,
            "messages": [{"role": "user", "content": "one two three"}]}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cachemesh-node"] == holder
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1])
    assert text.split() == ["three", "two", "one"]


def test_hop_limit_and_cluster_token(nodes: Cluster) -> None:
    marks = deploy(nodes, "h1")
    first = nodes["a"].http.post("/v2/models/h1/infer", json=X)
    holder = first.headers["cachemesh-node"]
    other = next(n for n in ("a", "b", "c") if n != holder)
    url = f"{nodes[other].url}/v2/models/h1/infer"

    def refused() -> float:  # the node's count so far (earlier tests may have added to it)
        sample = 'cachemesh_forwards_total{outcome="refused"} '
        text = nodes[other].http.get("/metrics").text
        return sum(float(line[len(sample):]) for line in text.splitlines()
                   if line.startswith(sample))

    before = refused()
    # Posing as a node: no token, a wrong token -> refused, never served.
    for headers in ({"cachemesh-forwarded-by": "x"},
                    {"cachemesh-forwarded-by": "x", "cachemesh-cluster-token": "wrong" * 8}):
        r = httpx.post(url, json=X, headers=headers, timeout=10)
        assert r.status_code == 401, r.text
    # A token alone (no hop header) is dropped: the request is forwarded as any other.
    r = httpx.post(url, json=X, headers={"cachemesh-cluster-token": TOKEN}, timeout=10)
    assert r.status_code == 200 and r.headers["cachemesh-node"] == holder
    # A forwarded request is served where it lands: never a second hop.
    r = httpx.post(url, json=X, timeout=10, headers={
        "cachemesh-forwarded-by": holder, "cachemesh-cluster-token": TOKEN})
    assert r.status_code == 200 and r.headers["cachemesh-node"] == other
    assert loads(marks) == 2
    assert refused() - before == 2


def test_failed_load_is_tried_on_another_node(nodes: Cluster) -> None:
    bad = ",".join(str(nodes.root / n) + "/" for n in ("a", "b"))
    deploy(nodes, "f1", load_fail_under=bad)  # pulled by no node until one is to load it
    # c answered last: with free memory alike, the least recently used nodes (a, b)
    # rank first, so the load fails at least once before it reaches c.
    deploy(nodes, "f0")
    r = httpx.post(f"{nodes['c'].url}/v2/models/f0/infer", json=X, timeout=10, headers={
        "cachemesh-forwarded-by": "test", "cachemesh-cluster-token": TOKEN})
    assert r.headers["cachemesh-node"] == "c"
    wait_until(lambda: any(c["model"] == "f0" and c["last_used"] for n in
                           nodes["a"].nodes()["nodes"] if n["name"] == "c"
                           for c in n["copies"]), 8, "c's record to carry that use")
    r = nodes["a"].http.post("/v2/models/f1/infer", json=X)
    assert r.status_code == 200, r.text
    assert r.headers["cachemesh-node"] == "c"
    errors = nodes["a"].model("f1").json()["versions"]["default"]["status"]["errors"]
    assert any("refuses to load" in e for e in errors), errors  # the reasons, in status


def test_min_copies(nodes: Cluster) -> None:
    spec = toy_spec(nodes.origin, "mc1")
    r = nodes["a"].http.put("/api/v1/models/mc1", json={
        "name": "mc1", "versions": {"v1": {"source": spec["source"], "runtime": "custom",
                                           "parameters": spec["parameters"]}},
        "scaling": {"min_copies": 3, "max_copies": 2}})
    assert r.status_code == 400 and "min_copies" in r.text
    r = nodes["a"].http.put("/api/v1/models/mc1", json={
        "name": "mc1", "versions": {"v1": {"source": spec["source"], "runtime": "custom",
                                           "parameters": spec["parameters"]}},
        "scaling": {"min_copies": 2}})
    assert r.status_code in (200, 201), r.text
    wait_until(lambda: len(holders(nodes, "b", "mc1")) == 2, 15, "2 copies of mc1")


def test_a_hot_model_gets_a_copy_on_another_node(nodes: Cluster) -> None:
    spec = toy_spec(nodes.origin, "hot1")
    r = nodes["b"].http.put("/api/v1/models/hot1", json={
        "name": "hot1", "versions": {"v1": {"source": spec["source"], "runtime": "custom",
                                           "parameters": spec["parameters"]}},
        "scaling": {"copy_rate": 5, "max_copies": 2}})
    assert r.status_code in (200, 201), r.text
    wait_until(lambda: all(n.model("hot1").status_code == 200 for n in nodes.nodes.values()),
               10, "hot1 declared everywhere")
    with httpx.Client(base_url=nodes["b"].url, timeout=10) as client:
        deadline = time.monotonic() + 15
        while len(holders(nodes, "b", "hot1")) < 2:  # ~50 req/s, 10 times the copy rate
            assert time.monotonic() < deadline, holders(nodes, "b", "hot1")
            for _ in range(5):
                assert client.post("/v2/models/hot1/infer", json=X).status_code == 200
            time.sleep(0.1)
    assert len(holders(nodes, "b", "hot1")) == 2  # max_copies holds it there


def test_a_traffic_split_is_drawn_once(nodes: Cluster) -> None:
    marks = nodes.root / "marks" / "split1"
    spec = toy_spec(nodes.origin, "split1", marks=marks)
    version = {"source": spec["source"], "runtime": "custom", "parameters": spec["parameters"]}
    r = nodes["a"].http.put("/api/v1/models/split1", json={
        "name": "split1", "versions": {"v1": version, "v2": version},
        "traffic": {"v1": 50, "v2": 50}})
    assert r.status_code in (200, 201), r.text
    wait_until(lambda: all(n.model("split1").status_code == 200 for n in nodes.nodes.values()),
               10, "split1 declared everywhere")
    seen = set()
    for i in range(24):
        r = nodes["abc"[i % 3]].http.post("/v2/models/split1/infer", json=X)
        assert r.status_code == 200, r.text
        assert r.headers["cachemesh-model-version"] == r.headers["x-model-version"]
        seen.add(r.headers["x-model-version"])
    assert seen == {"v1", "v2"}
    for i in range(24):  # OpenAI: the body has no version; the forwarded request names it
        r = nodes["abc"[i % 3]].http.post("/v1/chat/completions", json={
            "model": "split1", "messages": [{"role": "user", "content": "a b"}]})
        assert r.status_code == 200, r.text
        assert r.headers["cachemesh-model-version"] == r.headers["x-model-version"]
    # One load per version in the whole cluster: a forwarded request keeps the version
    # its first node drew (without that, the answering node would draw again, and load
    # the other version where it lands).
    assert loads(marks) == 2
