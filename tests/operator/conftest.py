"""Fixtures of the operator tests: a real cachemesh node on loopback (with an API token and
the hub emulator as Hugging Face), and :class:`RecordingKube` in place of the Kubernetes API
server (none can run here): it applies each status patch as a merge patch (RFC 7386) and
checks the result against the CRD, and records node labels and events.
"""

from __future__ import annotations

import copy
import dataclasses
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from cachemesh.config import Settings
from tests.deploy.crds import load_crds, validate
from tests.emulators.hf_hub import HfHubEmulator
from tests.serve.conftest import RunningServer, free_port

TOKEN = "operator-test-token-0123456789"
NODE = "node-a"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies application/merge-patch+json."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class RecordingKube:
    """The Kubernetes side of the handlers, kept in memory."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.events: list[tuple[str, str, str, str]] = []  # name, type, reason, message
        self.crds = load_crds()

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store an object as the API server would accept it (validated), with a uid."""
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta.setdefault("namespace", "default")
        meta.setdefault("uid", str(uuid.uuid4()))
        meta["generation"] = meta.get("generation", 0) + 1
        validate(obj, self.crds[obj["kind"]])
        key = (obj["kind"], meta["namespace"], meta["name"])
        if key in self.objects and "status" in self.objects[key]:
            obj["status"] = self.objects[key]["status"]
        self.objects[key] = obj
        return copy.deepcopy(obj)

    def get(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return copy.deepcopy(self.objects[(obj["kind"], meta["namespace"], meta["name"])])

    async def patch_status(self, obj: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        key = (obj["kind"], meta["namespace"], meta["name"])
        stored = merge_patch(self.objects[key], {"status": dict(status)})
        validate(stored, self.crds[obj["kind"]])  # the status subresource's schema
        self.objects[key] = stored

    async def label_node(self, node: str, key: str, value: str | None) -> None:
        labels = self.labels.setdefault(node, {})
        if value is None:
            labels.pop(key, None)
        else:
            labels[key] = value

    async def event(self, obj: Mapping[str, Any], type: str, reason: str, message: str) -> None:
        self.events.append((obj["metadata"]["name"], type, reason, message))

    def reasons(self, name: str) -> list[str]:
        return [reason for n, _, reason, _ in self.events if n == name]


@pytest.fixture(scope="module")
def node(hf_hub: HfHubEmulator, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("operator-home")
    base = Settings.from_env({"CACHEMESH_HOME": str(home), "HF_ENDPOINT": hf_hub.url,
                              "HF_HOME": str(home.parent / "hf-home"),
                              "HOME": str(home.parent)})
    settings = dataclasses.replace(base, api_token=TOKEN, serve=dataclasses.replace(
        base.serve, port=free_port(), workers=1, memory=1024**3,
        source_roots=(tmp_path_factory.getbasetemp(),)))  # the tests' models live there
    with RunningServer(settings, []) as running:
        running.client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield running
