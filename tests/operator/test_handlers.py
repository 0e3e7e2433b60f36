"""The operator's reconcilers against a real cachemesh node on loopback (with its API token),
fed the objects an API server would send, with a RecordingKube (conftest.py) in place of
the Kubernetes API server.

The node is a lone node (no cluster mode, as ``cachemesh serve`` runs by default): its
per-node state is the node the API answers for (``lone_node``), and no etcd is involved.
The same reconcilers against a cluster: test_cluster_handlers.py.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from cachemesh import errors as e
from cachemesh.client import AsyncControlClient
from cachemesh.operator import handlers
from cachemesh.operator.mapping import API_VERSION
from tests.emulators.hf_hub import HfHubEmulator
from tests.operator.conftest import NODE, TOKEN, RecordingKube
from tests.serve.conftest import RunningServer, toy_model

FILES = {"config.json": b'{"model_type": "llama"}',
         "model.safetensors": random.Random(3).randbytes(200 * 1024)}
ECHO = {"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": [4.0]}]}


def datacache(name: str, repo: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "DataCache",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"bucket": "hf", "path": f"/models/{name}",
                     "dataSource": {"type": "URL", "options": {
                         "repoSource": "HuggingFace/Model", "repoId": repo}}, **spec}}


async def settle(reconcile: Any, kube: RecordingKube, obj: dict[str, Any], final: set[str],
                 timeout: float = 30) -> dict[str, Any]:
    """Resync, as kopf's timer would, until the status phase is final."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        obj = kube.get(obj)
        if obj.get("status", {}).get("phase") in final:
            return obj
        assert asyncio.get_running_loop().time() < deadline, obj.get("status")
        await asyncio.sleep(0.2)
        await reconcile(obj, declare=False)


def test_a_datacache_becomes_available_labels_its_node_and_is_cleaned_up(
        node: RunningServer, hf_hub: HfHubEmulator):
    repo = f"org/op-{uuid.uuid4().hex[:8]}"
    hf_hub.commit(repo, FILES)
    name = f"dc-{uuid.uuid4().hex[:8]}"
    label = f"cachemesh.io/cache.{name}"
    kube = RecordingKube()

    async def main() -> None:
        async with AsyncControlClient(node.url, token=TOKEN) as api:
            async def reconcile(obj: dict[str, Any], declare: bool) -> dict[str, Any]:
                return await handlers.reconcile_datacache(obj, api, kube, declare=declare,
                                                          lone_node=NODE)

            obj = kube.put(datacache(name, repo))
            first = await reconcile(obj, declare=True)
            assert first["phase"] in ("Pending", "Pulling", "Available")
            assert kube.reasons(name)[0] == "Declared"
            obj = await settle(reconcile, kube, obj, {"Available", "Failed"})
            status = obj["status"]
            assert status["phase"] == "Available", status
            assert status["progress"]["percent"] == 100 and status["observedGeneration"] == 1
            view = Path(status["view"])
            assert view.as_posix().endswith(f"buckets/hf/models/{name}")
            assert (view / "model.safetensors").read_bytes() == FILES["model.safetensors"]
            assert status["nodes"] == [{"name": NODE, "phase": "Available", "percent": 100,
                                        "view": status["view"]}]
            assert kube.labels[NODE] == {label: "true"}
            assert "Available" in kube.reasons(name)
            # a resync of an Available cache changes nothing and says nothing
            events = len(kube.events)
            await reconcile(obj, declare=False)
            assert len(kube.events) == events and kube.get(obj)["status"] == status

            # the cache vanished from the node (a new disk): the resync declares it again
            await api.delete_datacache(name)
            obj = kube.get(obj)
            again = await reconcile(obj, declare=False)
            assert again["phase"] in ("Pending", "Pulling", "Available")
            obj = await settle(reconcile, kube, obj, {"Available"})

            # deletion (the finalizer's handler): gone from the node, the label goes too
            await handlers.delete_datacache(kube.get(obj), api, kube)
            with pytest.raises(e.NotFoundError):
                await api.get_datacache(name)
            assert kube.labels[NODE] == {}
            assert kube.reasons(name)[-1] == "Deleted"
            # deleting again (kopf retried after a crash) is fine
            await handlers.delete_datacache(kube.get(obj), api, kube)

    asyncio.run(main())


def test_a_changed_spec_replaces_the_cache(node: RunningServer, hf_hub: HfHubEmulator):
    repo = f"org/op-{uuid.uuid4().hex[:8]}"
    hf_hub.commit(repo, FILES)
    other = f"org/op2-{uuid.uuid4().hex[:8]}"
    hf_hub.commit(other, {"config.json": b'{"model_type": "bert"}'})
    name = f"dc-{uuid.uuid4().hex[:8]}"
    kube = RecordingKube()

    async def main() -> None:
        async with AsyncControlClient(node.url, token=TOKEN) as api:
            async def reconcile(obj: dict[str, Any], declare: bool) -> dict[str, Any]:
                return await handlers.reconcile_datacache(obj, api, kube, declare=declare,
                                                          lone_node=NODE)

            obj = kube.put(datacache(name, repo))
            await reconcile(obj, declare=True)
            obj = await settle(reconcile, kube, obj, {"Available"})
            changed = kube.put({**obj, "spec": datacache(name, other)["spec"]})
            await reconcile(changed, declare=True)
            assert "Replacing" in kube.reasons(name)
            obj = await settle(reconcile, kube, changed, {"Available"})
            assert obj["status"]["observedGeneration"] == 2
            view = Path(obj["status"]["view"])
            assert sorted(p.name for p in view.iterdir()) == ["config.json"]
            await handlers.delete_datacache(obj, api, kube)

    asyncio.run(main())


def test_a_datacache_the_node_refuses_is_failed_with_the_nodes_reason(
        node: RunningServer, hf_hub: HfHubEmulator):
    kube = RecordingKube()

    async def main() -> None:
        async with AsyncControlClient(node.url, token=TOKEN) as api:
            # nodes: the CRD takes it; a lone node does not (it needs cluster mode)
            obj = kube.put(datacache(f"dc-{uuid.uuid4().hex[:8]}", "org/x", nodes="all"))
            with pytest.raises(e.InvalidInputError, match="Nodes"):
                await handlers.reconcile_datacache(obj, api, kube, lone_node=NODE)
            status = kube.get(obj)["status"]
            assert status["phase"] == "Failed" and "Nodes" in status["message"]
            assert kube.events[-1][1:3] == ("Warning", "Invalid")
            # a repository the hub does not have: declared, then Failed with the reason
            missing = kube.put(datacache(f"dc-{uuid.uuid4().hex[:8]}", "org/nothing-here"))

            async def reconcile(obj: dict[str, Any], declare: bool) -> dict[str, Any]:
                return await handlers.reconcile_datacache(obj, api, kube, declare=declare,
                                                          lone_node=NODE)

            await reconcile(missing, declare=True)
            failed = (await settle(reconcile, kube, missing, {"Failed", "Available"}))["status"]
            assert failed["phase"] == "Failed" and "nothing-here" in failed["message"]
            assert kube.events[-1][1:3] == ("Warning", "Failed")
            assert kube.labels == {}
            await handlers.delete_datacache(kube.get(missing), api, kube)

    asyncio.run(main())


def test_a_model_is_served_through_the_mesh_and_removed(node: RunningServer, tmp_path: Path):
    spec = toy_model(tmp_path, f"m-{uuid.uuid4().hex[:8]}")
    kube = RecordingKube()
    obj = {"apiVersion": API_VERSION, "kind": "Model",
           "metadata": {"name": spec.name, "namespace": "team"},
           "spec": {"eager": True, "bucket": "models",
                    "versions": {"v1": {"source": spec.source, "runtime": "custom",
                                        "parameters": dict(spec.parameters)}},
                    "scaling": {"maxCopies": 1}}}

    async def main() -> None:
        async with AsyncControlClient(node.url, token=TOKEN) as api:
            async def reconcile(obj: dict[str, Any], declare: bool) -> dict[str, Any]:
                return await handlers.reconcile_model(obj, api, kube, declare=declare)

            stored = kube.put(obj)
            await reconcile(stored, declare=True)
            assert kube.reasons(spec.name)[0] == "Applied"
            stored = await settle(reconcile, kube, stored, {"Ready", "Failed"})
            status = stored["status"]
            assert status["phase"] == "Ready", status
            assert status["versions"]["v1"]["copies"] == 1
            r = node.client.post(status["inference"]["v2"], json=ECHO)
            assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [4.0]
            assert "Ready" in kube.reasons(spec.name)

            # a new version with half the traffic: rolled out, both answer
            v2 = kube.put({**stored, "spec": {**stored["spec"], "versions": {
                **stored["spec"]["versions"],
                "v2": {"source": spec.source, "runtime": "custom",
                       "parameters": {**spec.parameters, "tag": "2"}}},
                "traffic": {"v1": 50, "v2": 50}}})
            rolled = await reconcile(v2, declare=True)
            assert rolled["versions"]["v2"] == {"phase": "Ready", "copies": 1, "traffic": 50}
            r = node.client.post(f"/v2/models/{spec.name}/versions/v2/infer", json=ECHO)
            assert r.status_code == 200

            # a document the server refuses: Failed, with the server's reason
            bad = kube.put({**v2, "spec": {**v2["spec"], "traffic": {"v1": 50, "v2": 40}}})
            with pytest.raises(e.InvalidInputError, match="sum to 90"):
                await reconcile(bad, declare=True)
            assert kube.get(bad)["status"]["phase"] == "Failed"
            assert (await api.get_model(spec.name))["traffic"] == {"v1": 50, "v2": 50}

            await handlers.delete_model(kube.get(bad), api, kube)
            with pytest.raises(e.NotFoundError):
                await api.get_model(spec.name)
            r = node.client.post(f"/v2/models/{spec.name}/infer", json=ECHO)
            assert r.status_code == 404
            assert kube.reasons(spec.name)[-1] == "Deleted"

    asyncio.run(main())


def test_a_model_lost_by_the_mesh_is_declared_again(node: RunningServer, tmp_path: Path):
    spec = toy_model(tmp_path, f"m-{uuid.uuid4().hex[:8]}")
    kube = RecordingKube()
    obj = kube.put({"apiVersion": API_VERSION, "kind": "Model",
                    "metadata": {"name": spec.name},
                    "spec": {"source": spec.source, "runtime": "custom",
                             "parameters": dict(spec.parameters)}})

    async def main() -> None:
        async with AsyncControlClient(node.url, token=TOKEN) as api:
            first = await handlers.reconcile_model(obj, api, kube)
            assert first["phase"] in ("Standby", "Pulling")  # loads on its first request
            await api.delete_model(spec.name)
            again = await handlers.reconcile_model(kube.get(obj), api, kube, declare=False)
            assert again["phase"] in ("Standby", "Pulling")
            assert (await api.get_model(spec.name))["versions"]["default"]["source"] == \
                spec.source
            await handlers.delete_model(kube.get(obj), api, kube)

    asyncio.run(main())


def test_the_pods_client_sends_what_the_api_server_expects(tmp_path: Path):
    from cachemesh.config import OperatorSettings
    from cachemesh.operator.kube import InClusterKube

    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/api/v1/nodes/gone":
            return httpx.Response(404, json={"message": "nodes \"gone\" not found"})
        return httpx.Response(200, json={})

    settings = OperatorSettings(kube_host="10.0.0.1", service_account=tmp_path)
    (tmp_path / "token").write_text("sa-token\n")
    obj = {"apiVersion": API_VERSION, "kind": "DataCache",
           "metadata": {"name": "q", "namespace": "ns", "uid": "u-1"}}

    async def main() -> None:
        kube = InClusterKube(settings, transport=httpx.MockTransport(answer))
        await kube.patch_status(obj, {"phase": "Available", "message": None})
        await kube.label_node("node-a", "cachemesh.io/cache.q", "true")
        await kube.label_node("gone", "cachemesh.io/cache.q", None)  # a node that left
        with pytest.raises(e.NotFoundError):
            await kube.label_node("gone", "cachemesh.io/cache.q", "true")
        await kube.event(obj, "Normal", "Available", "view /v")
        await kube.aclose()

    asyncio.run(main())
    status, label, _, _, event = seen
    assert (status.method, status.url.path) == (
        "PATCH", "/apis/cachemesh.io/v1alpha1/namespaces/ns/datacaches/q/status")
    assert status.headers["content-type"] == "application/merge-patch+json"
    assert status.headers["authorization"] == "Bearer sa-token"
    assert httpx.Response(200, content=status.content).json() == {
        "status": {"phase": "Available", "message": None}}
    assert label.url.path == "/api/v1/nodes/node-a"
    assert httpx.Response(200, content=label.content).json() == {
        "metadata": {"labels": {"cachemesh.io/cache.q": "true"}}}
    body = httpx.Response(200, content=event.content).json()
    assert event.url.path == "/api/v1/namespaces/ns/events"
    assert body["involvedObject"] == {"apiVersion": API_VERSION, "kind": "DataCache",
                                      "name": "q", "namespace": "ns", "uid": "u-1"}
    assert (body["type"], body["reason"], body["message"]) == ("Normal", "Available", "view /v")
