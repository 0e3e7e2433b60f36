"""The CRDs as a validator would use them: structural-schema rules, JSON Schema, CEL rules.

An API server checks a custom object in three steps, and each has a counterpart here:
- the CRD's schema must be structural (``structural_problems``: the rules of the
  Kubernetes documentation, "Specifying a structural schema");
- an object is validated against ``openAPIV3Schema`` (``validate``: jsonschema, with
  ``x-kubernetes-int-or-string`` and ``nullable`` translated, and unknown fields refused
  as kubectl's strict field validation refuses them);
- ``x-kubernetes-validations`` rules are CEL (``cel_problems``: cel-python).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "deploy" / "helm" / "cachemesh" / "crds"
_JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
_NOT_IN_JUNCTORS = ("description", "type", "default", "additionalProperties", "nullable")


def load_crds() -> dict[str, dict[str, Any]]:
    """Kind -> CRD."""
    out = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        out[crd["spec"]["names"]["kind"]] = crd
    return out


def schema_of(crd: dict[str, Any], version: str = "v1alpha1") -> dict[str, Any]:
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(version)


def structural_problems(node: dict[str, Any], where: str = "", in_junctor: bool = False
                        ) -> list[str]:
    problems = []
    special = node.get("x-kubernetes-int-or-string") or node.get(
        "x-kubernetes-preserve-unknown-fields")
    if not in_junctor and "type" not in node and not special:
        problems.append(f"{where or '<root>'}: no type")
    if in_junctor:
        problems += [f"{where}: {k} inside a junctor" for k in _NOT_IN_JUNCTORS if k in node]
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{where}: properties and additionalProperties together")
    for name, child in (node.get("properties") or {}).items():
        problems += structural_problems(child, f"{where}.{name}", in_junctor)
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{where}.*", in_junctor)
    if isinstance(node.get("items"), dict):
        problems += structural_problems(node["items"], f"{where}[]", in_junctor)
    for junctor in _JUNCTORS:
        for child in (node.get(junctor) if isinstance(node.get(junctor), list)
                      else [node[junctor]] if junctor in node else []):
            problems += structural_problems(child, f"{where}/{junctor}", True)
    if where == ".metadata" and set(node.get("properties") or {}) - {"name", "generateName"}:
        problems.append(".metadata: only name and generateName may be restricted")
    return problems


def json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema an API server effectively checks for ``node``."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")
           and k not in ("properties", "additionalProperties", "items", "nullable")}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node:
        out["properties"] = {k: json_schema(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get(
                "x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False  # strict field validation (kubectl's default)
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = json_schema(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        out["items"] = json_schema(node["items"])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def validate(obj: dict[str, Any], crd: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError, or AssertionError for a failed CEL rule."""
    schema = schema_of(crd)
    jsonschema.Draft7Validator(json_schema(schema)).validate(obj)
    problems = cel_problems(obj, schema)
    assert not problems, problems


def _rules(node: dict[str, Any], path: tuple[str, ...] = ()
           ) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    for rule in node.get("x-kubernetes-validations") or []:
        yield path, rule
    for name, child in (node.get("properties") or {}).items():
        yield from _rules(child, (*path, name))


def cel_problems(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """The messages of the CEL rules ``obj`` breaks (rules under properties; an absent
    field's rules do not run, as in an API server)."""
    env = celpy.Environment()
    problems = []
    for path, rule in _rules(schema):
        value: Any = obj
        for key in path:
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            program = env.program(env.compile(rule["rule"]))
            if not program.evaluate({"self": celpy.json_to_cel(value)}):
                problems.append(f"{'.'.join(path)}: {rule.get('message', rule['rule'])}")
    return problems
