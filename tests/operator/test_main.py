"""kopf's layer (operator/main.py): each registered function calls its reconciler, and the
reconcilers' errors become kopf's (permanent for an invalid object, retried otherwise)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import kopf
import pytest

from cachemesh import errors as e
from cachemesh.client import AsyncControlClient
from cachemesh.config import OperatorSettings
from cachemesh.operator import main
from cachemesh.operator.mapping import API_VERSION
from tests.operator.conftest import TOKEN, RecordingKube
from tests.serve.conftest import RunningServer, toy_model


def test_errors_become_kopfs():
    async def raise_(exc: Exception) -> None:
        raise exc

    with pytest.raises(kopf.PermanentError, match="bad spec"):
        asyncio.run(main._call(raise_(e.InvalidInputError("bad spec"))))
    for exc in (e.UnavailableError("etcd"), e.ConflictError("in use"), e.CachemeshError("x")):
        with pytest.raises(kopf.TemporaryError) as info:
            asyncio.run(main._call(raise_(exc)))
        assert info.value.delay == main.RESYNC_S


def test_the_registered_functions_reconcile(node: RunningServer, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch):
    spec = toy_model(tmp_path, f"k-{uuid.uuid4().hex[:8]}")
    kube = RecordingKube()
    obj = kube.put({"apiVersion": API_VERSION, "kind": "Model",
                    "metadata": {"name": spec.name},
                    "spec": {"source": spec.source, "runtime": "custom", "eager": True,
                             "parameters": dict(spec.parameters)}})

    class Context:
        def __init__(self) -> None:
            self.api = AsyncControlClient(node.url, token=TOKEN)
            self.kube = kube
            self.operator = OperatorSettings(lone_node="node-a")

    async def run() -> dict[str, Any]:
        ctx = Context()
        monkeypatch.setattr(main, "_context", ctx)
        await main.model_declared(body=obj)
        for _ in range(100):
            await main.model_resync(body=kube.get(obj))
            if kube.get(obj)["status"]["phase"] == "Ready":
                break
            await asyncio.sleep(0.1)
        status = kube.get(obj)["status"]
        await main.model_deleted(body=kube.get(obj))
        with pytest.raises(e.NotFoundError):
            await ctx.api.get_model(spec.name)
        # an object the server refuses: permanent on create, quiet on the timer
        bad = kube.put({**obj, "spec": {**obj["spec"], "source": "nope://x"}})
        with pytest.raises(kopf.PermanentError, match="unknown source scheme"):
            await main.model_declared(body=bad)
        await main.model_resync(body=kube.get(bad))
        await ctx.api.aclose()
        return status

    assert asyncio.run(run())["phase"] == "Ready"


def test_operator_settings_from_the_environment():
    settings = OperatorSettings.from_env({"CACHEMESH_OPERATOR_NODE": "node-a",
                                          "KUBERNETES_SERVICE_HOST": "fd00::1",
                                          "KUBERNETES_SERVICE_PORT": "6443"})
    assert settings.lone_node == "node-a"
    assert settings.kube_url == "https://[fd00::1]:6443"
    assert OperatorSettings.from_env({}).kube_url is None
    with pytest.raises(e.InvalidInputError, match="node name"):
        OperatorSettings.from_env({"CACHEMESH_OPERATOR_NODE": "Not_A_Node"})
