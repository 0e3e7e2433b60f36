"""The one mapping between the CRDs' fields and the control API's (operator/mapping.py)."""

from __future__ import annotations

import pytest
import yaml

from cachemesh.errors import InvalidInputError
from cachemesh.operator import mapping as m
from cachemesh.serve.adapters.eci import EciCreateDataCache, eci_to_spec_fields
from cachemesh.serve.core.documents import make_document
from tests.deploy.crds import ROOT

EXAMPLES = ROOT / "deploy" / "examples"


def example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def test_ecis_example_becomes_the_eci_request_the_node_translates():
    body = m.datacache_request(example("datacache-eci.yaml"))
    assert body == {"Name": "llama-7b-hf", "Bucket": "huggingFace-model",
                    "Path": "/models/llama-7b-hf",
                    "DataSource": {"Type": "URL", "Options": {
                        "repoSource": "HuggingFace/Model",
                        "repoId": "decapoda-research/llama-7b-hf"}}}
    # the server's own model of the request takes it, and reads the source we mean
    fields = eci_to_spec_fields(EciCreateDataCache.model_validate(body))
    assert fields["source"] == "hf://decapoda-research/llama-7b-hf"
    assert (fields["bucket"], fields["path"]) == ("huggingFace-model", "models/llama-7b-hf")


def test_every_field_of_a_datacache_and_nodes_only_when_set():
    obj = example("datacache-hf.yaml")
    body = m.datacache_request(obj)
    assert body["Size"] == 5 and body["RetentionDays"] == 30
    assert body["Nodes"] == "all" and body["MinCopies"] == 2
    assert body["DataSource"]["Options"]["revision"] == "main"
    del obj["spec"]["nodes"], obj["spec"]["minCopies"], obj["spec"]["bucket"]
    body = m.datacache_request(obj)
    assert "Nodes" not in body and "MinCopies" not in body and body["Bucket"] == "default"
    nas = m.datacache_request(example("datacache-nas.yaml"))
    assert nas["DataSource"] == {"Type": "NAS", "Options": {
        "server": "nas.example.internal", "path": "/exports/models/bert", "vers": 3,
        "options": "nolock,tcp,noresvport"}}


@pytest.mark.parametrize("nodes, expected", [("all", "all"), (3, 3), (["a", "b.c"], ["a", "b.c"])])
def test_nodes_values(nodes, expected):
    assert m.check_nodes(nodes) == expected


@pytest.mark.parametrize("nodes", ["some", 0, -1, True, [], ["a", "a"], ["A_b"], [3], {"all": 1}])
def test_wrong_nodes(nodes):
    with pytest.raises(InvalidInputError, match="nodes"):
        m.check_nodes(nodes)


def test_the_status_of_a_description():
    description = {"name": "q", "status": "Loading", "view": "/s/buckets/models/q",
                   "bucket": "models", "Path": "/q", "error": None,
                   "progress": {"bytes_done": 50, "bytes_total": 200, "files_done": 1,
                                "files_total": 4, "rate": 1.0, "percent": 25}}
    status = m.datacache_status(description, "node-a", generation=3)
    assert status == {
        "phase": "Pulling", "message": None, "view": "/s/buckets/models/q",
        "bucket": "models", "path": "/q", "observedGeneration": 3, "availableNodes": 0,
        "progress": {"percent": 25, "bytesDone": 50, "bytesTotal": 200, "filesDone": 1,
                     "filesTotal": 4},
        "nodes": [{"name": "node-a", "phase": "Pulling", "percent": 25,
                   "view": "/s/buckets/models/q"}]}
    assert m.datacache_status({**description, "status": "Available"}, None)["nodes"] == []
    # a cluster-wide cache lists its nodes (peer-to-peer issue)
    wide = {**description, "nodes": [
        {"node": "b", "status": "Available", "view": "/v", "progress": {"percent": 100}},
        {"node": "a", "status": "Failed", "error": "disk full", "progress": {}}]}
    status = m.datacache_status(wide, "ignored")
    assert status["nodes"] == [{"name": "a", "phase": "Failed", "percent": 0,
                                "message": "disk full"},
                               {"name": "b", "phase": "Available", "percent": 100, "view": "/v"}]
    assert status["availableNodes"] == 1
    assert [m.phase_of(s) for s in ("Pending", "Loading", "Available", "Failed", None)] == [
        "Pending", "Pulling", "Available", "Failed", "Pending"]


def test_the_status_of_a_cluster_wide_cache():
    """GET in cluster mode (serve/datacache/preheat.py): ``nodes`` maps each node to its pull, and
    ``cluster`` is the declaration; the answering node may hold no copy (Pending)."""
    described = {"name": "q", "status": "Pending", "bucket": "models", "node": "c",
                 "cluster": {"nodes": "all", "assigned": None, "min_copies": None},
                 "nodes": {"a": {"state": "Available", "progress": 1.0, "bytes_done": 200,
                                 "bytes_total": 200, "error": None},
                           "b": {"state": "Loading", "progress": 0.5, "bytes_done": 100,
                                 "bytes_total": 200, "error": None},
                           "gone": {"state": "Available", "progress": 1.0}}}
    status = m.datacache_status(described, "c", expected=["a", "b", "c"], view="/s/v")
    assert status["nodes"] == [{"name": "a", "phase": "Available", "percent": 100},
                               {"name": "b", "phase": "Pulling", "percent": 50},
                               {"name": "c", "phase": "Pending", "percent": 0}]
    assert status["phase"] == "Pulling" and status["view"] == "/s/v"
    assert status["progress"] == {"percent": 50, "bytesDone": 300, "bytesTotal": 400,
                                  "filesDone": 0, "filesTotal": 0}
    assert status["availableNodes"] == 1 and status["message"] is None
    done = {**described, "nodes": {n: {"state": "Available", "progress": 1.0} for n in "ab"}}
    assert m.datacache_status(done, "c", expected=["a", "b"])["phase"] == "Available"
    failed = {**described, "nodes": {"a": {"state": "Available"},
                                     "b": {"state": "Failed", "error": "disk full"}}}
    status = m.datacache_status(failed, "c", expected=["a", "b"])
    assert status["phase"] == "Failed" and status["message"] == "b: disk full"
    assert m.datacache_status({**described, "nodes": {}}, "c")["phase"] == "Pending"


def test_node_label():
    assert m.node_label("qwen2.5-0.5b") == "cachemesh.io/cache.qwen2.5-0.5b"
    assert m.node_label("x" * 57)
    with pytest.raises(InvalidInputError, match="63"):
        m.node_label("x" * 58)


def test_a_model_becomes_the_document_the_server_validates():
    doc = m.model_document(example("model.yaml"))
    assert doc["scaling"] == {"max_copies": 2, "copy_rate": 20, "cooldown_s": 60}
    assert doc["versions"]["v1"]["parameters"] == {"dtype": "float32"}
    parsed = make_document(doc)
    assert parsed.name == "qwen-chat" and parsed.scaling.max_copies == 2
    assert parsed.eager and parsed.bucket == "models"
    canary = make_document(m.model_document(example("model-canary.yaml")))
    assert canary.traffic == {"v1": 90, "v2": 10} and canary.aliases["canary"] == "v2"
    assert canary.routes[0].header == "x-canary"


def test_the_short_form_and_min_copies():
    obj = {"kind": "Model", "metadata": {"name": "svm"},
           "spec": {"source": "s3://m/svm", "runtime": "sklearn", "eager": True,
                    "scaling": {"minCopies": 2}}}
    doc = m.model_document(obj)
    assert doc == {"name": "svm", "eager": True, "scaling": {"min_copies": 2},
                   "versions": {"default": {"source": "s3://m/svm", "runtime": "sklearn"}}}
    del obj["spec"]["scaling"]
    assert make_document(m.model_document(obj)).versions["default"].runtime == "sklearn"
    with pytest.raises(InvalidInputError, match="either"):
        m.model_document({"metadata": {"name": "x"}, "spec": {}})
    with pytest.raises(InvalidInputError, match="unknown"):
        m.model_document({"metadata": {"name": "x"},
                          "spec": {"source": "s", "scaling": {"max_copies": 1}}})


def test_the_status_of_a_model():
    status = {"name": "svm", "state": "Unloaded", "reason": None, "rollout": None,
              "traffic": {"v1": 100},
              "versions": {"v1": {"source": "x", "status": {"state": "Unloaded",
                                                            "reason": "not loaded yet",
                                                            "copies": []}}}}
    out = m.model_status(status, 2)
    assert out["phase"] == "Standby" and out["observedGeneration"] == 2
    assert out["versions"]["v1"] == {"phase": "Standby", "message": "not loaded yet",
                                     "copies": 0, "traffic": 100}
    assert out["inference"] == {"v2": "/v2/models/svm/infer", "openai": "svm"}


def test_the_status_of_a_model_in_a_cluster():
    """Each version's status names the nodes holding a copy (copies/ in etcd)."""
    status = {"name": "svm", "state": "Ready", "traffic": {"v1": 100},
              "versions": {"v1": {"source": "x", "status": {
                  "state": "Ready", "copies": [{"worker": 1}],
                  "nodes": [{"node": "b", "state": "loading", "bytes": 1},
                            {"node": "a", "state": "ready", "bytes": 9},
                            {"node": "a", "state": "ready", "bytes": 9}]}}}}
    out = m.model_status(status)
    assert out["versions"]["v1"] == {
        "phase": "Ready", "copies": 2, "traffic": 100,
        "nodes": [{"name": "a", "phase": "Ready"}, {"name": "b", "phase": "Loading"}]}


def test_a_status_patch_removes_what_the_new_status_lacks():
    """A Model that was Standby ("not on this node") and is now Ready loses its message:
    a merge patch only removes a field it names as null."""
    from cachemesh.operator.kube import replacing

    old = {"phase": "Standby", "message": "pulled when placed",
           "versions": {"default": {"phase": "Standby", "message": "x", "copies": 0}}}
    new = {"phase": "Ready", "versions": {"default": {"phase": "Ready", "copies": 2}}}
    assert replacing(old, new) == {
        "phase": "Ready", "message": None,
        "versions": {"default": {"phase": "Ready", "copies": 2, "message": None}}}
    assert replacing(None, new) == new
