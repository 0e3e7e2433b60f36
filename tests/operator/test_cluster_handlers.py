"""The operator's reconcilers against a cluster: two real ``cachemesh serve --cluster`` nodes
on loopback with a real etcd (tests/cluster/nodes.py), named as the chart names them (the
Kubernetes node's name), with the chart's API token, the hub emulator as Hugging Face, and
a RecordingKube (conftest.py) in place of the Kubernetes API server.

Two nodes rather than the three of ``three_nodes``: every per-node rule (each node's
state, its label, the copy on each node removed) shows with two, and the issue's checks
have 30 s in all.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachemesh.client import AsyncControlClient
from cachemesh.operator import handlers
from cachemesh.operator.mapping import API_VERSION
from tests.cluster.conftest import etcd, require_etcd  # noqa: F401  (the session's etcd)
from tests.cluster.etcd_server import EtcdServer
from tests.cluster.nodes import Cluster, toy_spec, wait_until
from tests.emulators.hf_hub import HfHubEmulator
from tests.operator.conftest import TOKEN, RecordingKube
from tests.operator.test_handlers import datacache, settle

NODES = ("node-a", "node-b")
FILES = {"config.json": b'{"model_type": "llama"}',
         "model.safetensors": random.Random(5).randbytes(96 * 1024)}


@pytest.fixture(scope="module")
def mesh(etcd: EtcdServer, hf_hub: HfHubEmulator,  # noqa: F811
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_etcd()
    cluster = Cluster(tmp_path_factory.mktemp("operator-mesh"), etcd.url,
                      f"/test-{uuid.uuid4().hex[:12]}/", CACHEMESH_API_TOKEN=TOKEN,
                      HF_ENDPOINT=hf_hub.url)
    try:
        cluster.start_all(list(NODES), headers={"Authorization": f"Bearer {TOKEN}"})
        yield cluster
    finally:
        cluster.stop()


def view_on(mesh: Cluster, node: str, name: str) -> Path:
    return mesh.root / node / "home" / "buckets" / "hf" / "models" / name


def test_a_datacache_is_pulled_by_every_node_labels_each_and_is_cleaned_up_everywhere(
        mesh: Cluster, hf_hub: HfHubEmulator):
    repo = f"org/op-{uuid.uuid4().hex[:8]}"
    hf_hub.commit(repo, FILES)
    name = f"dc-{uuid.uuid4().hex[:8]}"
    label = f"cachemesh.io/cache.{name}"
    kube = RecordingKube()

    async def main() -> None:
        # the operator talks to one node (the Service picks any)
        async with AsyncControlClient(mesh["node-a"].url, token=TOKEN) as api:
            async def reconcile(obj: dict[str, Any], declare: bool) -> dict[str, Any]:
                return await handlers.reconcile_datacache(obj, api, kube, declare=declare)

            obj = kube.put(datacache(name, repo))  # ECI's shape: no nodes
            first = await reconcile(obj, declare=True)
            assert first["phase"] in ("Pending", "Pulling", "Available")
            assert kube.events[0][2:] == ("Declared", f"URL repoSource=HuggingFace/Model"
                                          f" repoId={repo} into hf/models/{name} on every node")
            obj = await settle(reconcile, kube, obj, {"Available", "Failed"}, timeout=20)
            status = obj["status"]
            assert status["phase"] == "Available", status
            assert [(n["name"], n["phase"], n["percent"]) for n in status["nodes"]] == [
                ("node-a", "Available", 100), ("node-b", "Available", 100)]
            assert status["availableNodes"] == 2 and status["progress"]["percent"] == 100
            assert status["progress"]["bytesDone"] == 2 * sum(map(len, FILES.values()))
            assert status["view"] == str(view_on(mesh, "node-a", name))
            for node in NODES:  # a copy on each node, and each node labelled
                assert (view_on(mesh, node, name) / "model.safetensors").read_bytes() == \
                    FILES["model.safetensors"]
                assert kube.labels[node] == {label: "true"}
            # any node describes it the same way
            async with api.at(mesh["node-b"].url) as other:
                seen = await other.get_datacache(name)
            assert seen["node"] == "node-b" and set(seen["nodes"]) == set(NODES)

            # deletion (the finalizer's handler): the declaration and both copies go
            await handlers.delete_datacache(kube.get(obj), api, kube)
            for node in NODES:
                r = mesh[node].http.get(f"/api/v1/datacaches/{name}")
                assert r.status_code == 404, (node, r.text)
                assert not view_on(mesh, node, name).exists()
                assert kube.labels[node] == {}
            assert kube.reasons(name)[-1] == "Deleted"
            await handlers.delete_datacache(kube.get(obj), api, kube)  # again: fine

    asyncio.run(main())


def test_a_datacache_for_named_nodes_labels_only_those_and_moves_with_its_spec(
        mesh: Cluster, hf_hub: HfHubEmulator):
    repo = f"org/op-{uuid.uuid4().hex[:8]}"
    hf_hub.commit(repo, {"config.json": b'{"model_type": "bert"}'})
    name = f"dc-{uuid.uuid4().hex[:8]}"
    kube = RecordingKube()

    async def main() -> None:
        async with AsyncControlClient(mesh["node-a"].url, token=TOKEN) as api:
            async def reconcile(obj: dict[str, Any], declare: bool) -> dict[str, Any]:
                return await handlers.reconcile_datacache(obj, api, kube, declare=declare)

            obj = kube.put(datacache(name, repo, nodes=["node-b"], minCopies=1))
            await reconcile(obj, declare=True)
            obj = await settle(reconcile, kube, obj, {"Available", "Failed"}, timeout=20)
            status = obj["status"]
            assert status["phase"] == "Available", status
            # node-a answers: it holds no copy, node-b does
            assert [(n["name"], n["phase"]) for n in status["nodes"]] == [
                ("node-b", "Available")]
            assert kube.labels == {"node-b": {f"cachemesh.io/cache.{name}": "true"}}
            assert not view_on(mesh, "node-a", name).exists()

            # the spec moves it to node-a: the old declaration and node-b's copy go first
            moved = kube.put({**obj, "spec": {**obj["spec"], "nodes": ["node-a"]}})
            await reconcile(moved, declare=True)
            assert "Replacing" in kube.reasons(name)
            obj = await settle(reconcile, kube, moved, {"Available", "Failed"}, timeout=20)
            assert [(n["name"], n["phase"]) for n in obj["status"]["nodes"]] == [
                ("node-a", "Available")]
            assert obj["status"]["observedGeneration"] == 2
            assert kube.labels == {"node-a": {f"cachemesh.io/cache.{name}": "true"},
                                   "node-b": {}}
            assert not view_on(mesh, "node-b", name).exists()

            await handlers.delete_datacache(kube.get(obj), api, kube)
            for node in NODES:
                assert mesh[node].http.get(f"/api/v1/datacaches/{name}").status_code == 404
                assert kube.labels[node] == {}

    asyncio.run(main())


def test_a_model_is_served_by_every_node_and_removed_from_all(mesh: Cluster):
    spec = toy_spec(mesh.origin, f"m-{uuid.uuid4().hex[:8]}")
    kube = RecordingKube()
    obj = kube.put({"apiVersion": API_VERSION, "kind": "Model",
                    "metadata": {"name": spec["name"], "namespace": "team"},
                    "spec": {"source": spec["source"], "runtime": "custom",
                             "parameters": spec["parameters"],
                             # a node pulls and loads only when placed (cluster mode):
                             # two copies are kept so that both nodes hold one
                             "scaling": {"minCopies": 2, "maxCopies": 2}}})

    async def main() -> None:
        async with AsyncControlClient(mesh["node-b"].url, token=TOKEN) as api:
            status = await handlers.reconcile_model(obj, api, kube)
            assert status["phase"] in ("Standby", "Pulling", "Ready"), status
            assert status["inference"]["v2"] == f"/v2/models/{spec['name']}/infer"
            assert kube.reasons(spec["name"])[0] == "Applied"
            # the declaration is the cluster's: every node answers for the model
            for node in NODES:
                r = wait_until(lambda n=node: (lambda r: r if r.status_code == 200 else None)(
                    mesh[n].infer(spec["name"], 3.0)), 20, f"{node} to serve the model",
                    every=0.1)
                assert r.json()["outputs"][0]["data"] == [3.0]
            # each node's copy (min_copies 2) shows in the status (node records, via etcd)
            async def copies() -> dict[str, Any]:
                deadline = asyncio.get_running_loop().time() + 10
                while True:
                    status = await handlers.reconcile_model(kube.get(obj), api, kube,
                                                            declare=False)
                    nodes = status["versions"]["default"].get("nodes", [])
                    if [n["phase"] for n in nodes] == ["Ready", "Ready"]:  # records lag
                        return status
                    assert asyncio.get_running_loop().time() < deadline, status
                    await asyncio.sleep(0.2)

            status = await copies()
            assert status["phase"] == "Ready"
            assert status["versions"]["default"]["nodes"] == [
                {"name": "node-a", "phase": "Ready"}, {"name": "node-b", "phase": "Ready"}]
            assert status["versions"]["default"]["copies"] == 2
            assert kube.get(obj)["status"]["versions"] == status["versions"]  # CRD-validated

            await handlers.delete_model(kube.get(obj), api, kube)
            for node in NODES:
                wait_until(lambda n=node: mesh[n].infer(spec["name"]).status_code == 404, 10,
                           f"{node} to forget the model", every=0.1)
            assert kube.reasons(spec["name"])[-1] == "Deleted"

    asyncio.run(main())
