"""The CRDs: structural, valid CustomResourceDefinitions; the examples and ECI's own
example validate against them (JSON Schema and CEL); wrong objects do not."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.deploy.crds import (
    ROOT,
    cel_problems,
    load_crds,
    schema_of,
    structural_problems,
    validate,
)

EXAMPLES = ROOT / "deploy" / "examples"
ECI = """
apiVersion: eci.aliyun.com/v1alpha1
kind: DataCache
metadata:
  name: llama-7b-hf
spec:
  bucket: huggingFace-model        # default: "default"
  path: /models/llama-7b-hf        # the path to mount
  dataSource:
    type: URL                      # URL, NAS or OSS
    options:
      repoSource: HuggingFace/Model   # or ModelScope/Model
      repoId: decapoda-research/llama-7b-hf
"""


def custom_objects() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["apiVersion"].startswith("cachemesh.io/"):
                out.append((path, doc))
    return out


def test_both_crds_are_structural_with_a_status_subresource():
    crds = load_crds()
    assert set(crds) == {"DataCache", "Model"}
    for kind, crd in crds.items():
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.cachemesh.io"
        (version,) = crd["spec"]["versions"]
        assert version["subresources"] == {"status": {}}
        assert structural_problems(schema_of(crd)) == [], kind


def test_the_structural_check_can_fail():
    schema = copy.deepcopy(schema_of(load_crds()["Model"]))
    del schema["properties"]["spec"]["properties"]["eager"]["type"]
    schema["properties"]["spec"]["anyOf"] = [{"type": "object"}]
    problems = structural_problems(schema)
    assert ".spec.eager: no type" in problems and ".spec/anyOf: type inside a junctor" in problems


def test_ecis_example_with_only_apiversion_changed_validates():
    eci = yaml.safe_load(ECI)
    ours = {**eci, "apiVersion": "cachemesh.io/v1alpha1"}
    validate(ours, load_crds()["DataCache"])
    assert ours["spec"] == yaml.safe_load((EXAMPLES / "datacache-eci.yaml").read_text())["spec"]


def test_every_example_validates_against_its_crd():
    crds = load_crds()
    seen = set()
    for path, obj in custom_objects():
        validate(obj, crds[obj["kind"]])
        seen.add(obj["kind"])
    assert seen == {"DataCache", "Model"}


@pytest.mark.parametrize("change, message", [
    ({"dataSource": {"type": "FTP", "options": {"url": "x"}}}, "'FTP' is not one of"),
    ({"dataSource": {"type": "NAS", "options": {"server": "nas"}}}, "NAS source needs"),
    ({"dataSource": {"type": "URL"}}, "URL source needs"),
    ({"nodes": "some"}, "nodes is"),
    ({"nodes": 0}, "nodes is"),
    ({"nodes": []}, "nodes is"),
    ({"nodes": ["a", 3]}, "nodes is"),
    ({"minCopies": 0}, "less than the minimum"),
    ({"bucket": "../up"}, "does not match"),
    ({"sise": 3}, "Additional properties"),
])
def test_wrong_datacaches_are_refused(change: dict, message: str):
    obj = yaml.safe_load((EXAMPLES / "datacache-hf.yaml").read_text())
    obj["spec"].update(change)
    with pytest.raises((jsonschema.ValidationError, AssertionError), match=message):
        validate(obj, load_crds()["DataCache"])


def test_nodes_takes_all_a_count_or_names():
    crd = load_crds()["DataCache"]
    obj = yaml.safe_load((EXAMPLES / "datacache-hf.yaml").read_text())
    for nodes in ("all", 3, ["node-a", "node-b"]):
        validate({**obj, "spec": {**obj["spec"], "nodes": nodes}}, crd)


def test_a_long_name_is_refused_for_its_label():
    obj = yaml.safe_load((EXAMPLES / "datacache-eci.yaml").read_text())
    obj["metadata"]["name"] = "x" * 58
    assert cel_problems(obj, schema_of(load_crds()["DataCache"]))


@pytest.mark.parametrize("change, message", [
    ({"source": "hf://org/m"}, "either versions"),
    ({"traffic": {"v1": 101}}, "greater than the maximum"),
    ({"scaling": {"maxCopies": 0}}, "less than the minimum"),
    ({"scaling": {"max_copies": 2}}, "Additional properties"),
    ({"routes": [{"header": "x"}]}, "'version' is a required property"),
])
def test_wrong_models_are_refused(change: dict, message: str):
    obj = yaml.safe_load((EXAMPLES / "model.yaml").read_text())
    obj["spec"].update(change)
    with pytest.raises((jsonschema.ValidationError, AssertionError), match=message):
        validate(obj, load_crds()["Model"])
