"""ControlClient and AsyncControlClient against a real server on loopback (with a token)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cachemesh import errors as e
from cachemesh.client import AsyncControlClient, ControlClient
from cachemesh.config import Settings
from tests.serve.conftest import RunningServer, free_port, serve_settings, toy_model

TOKEN = "client-test-token-0123456789"
ECHO = {"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": [2.5]}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    settings = dataclasses.replace(serve_settings(tmp_path_factory.mktemp("client-home")),
                                   api_token=TOKEN)
    with RunningServer(settings, []) as running:
        running.client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield running


@pytest.fixture
def api(server: RunningServer) -> Iterator[ControlClient]:
    with ControlClient(server.url, token=TOKEN, timeout=60) as client:
        yield client


def origin(tmp_path: Path, name: str = "weights") -> Path:
    root = tmp_path / "origin" / name
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "toy"}')
    (root / "sub" / "model.bin").write_bytes(bytes(range(256)) * 64)
    return root


def test_a_datacache_from_declaration_to_removal(api: ControlClient, tmp_path: Path):
    name, source = f"c-{uuid.uuid4().hex[:8]}", str(origin(tmp_path))
    declaration = {"bucket": "team", "path": "models/toy", "include": ["*.json", "sub/*"]}
    created = api.create_datacache(name, source, **declaration)
    assert created["name"] == name and created["Status"] in ("Pending", "Loading", "Available")
    done = api.wait_datacache(name, timeout=60)
    assert done["status"] == "Available", done
    view = Path(done["view"])
    assert view.as_posix().endswith("buckets/team/models/toy")
    assert (view / "sub" / "model.bin").read_bytes() == bytes(range(256)) * 64
    assert any(ev["kind"] for ev in done["events"])
    assert name in [c["name"] for c in api.list_datacaches(bucket="team")]
    assert name not in [c["name"] for c in api.list_datacaches(bucket="other")]
    # the same declaration again is accepted; another one under the name is refused
    assert api.create_datacache(name, source, **declaration)["status"] == "Available"
    with pytest.raises(e.ConflictError, match=r"\(HTTP 409\)"):
        api.create_datacache(name, str(origin(tmp_path, "other")))
    # the events stream replays from the start and ends once the status is final
    kinds = [ev.kind for ev in api.datacache_events(name)]
    assert kinds[-1] == "status" and "event" in kinds and "progress" in kinds
    api.delete_datacache(name)
    with pytest.raises(e.NotFoundError, match=f"no cache named '{name}'"):
        api.get_datacache(name)


def test_eci_shape_and_cluster_fields(api: ControlClient, tmp_path: Path):
    share = origin(tmp_path, "share")
    name = f"eci-{uuid.uuid4().hex[:8]}"
    body = {"Name": name, "Bucket": "eci", "Path": "/models/share",
            "DataSource": {"Type": "NAS", "Options": {"server": "localhost",
                                                      "path": str(share)}}}
    assert api.create_datacache_eci(body)["DataCacheId"] == f"edc-{name}"
    assert api.wait_datacache(name, timeout=60)["Path"] == "/models/share"
    # nodes/min_copies are sent only when set; today's server refuses them by name
    with pytest.raises(e.InvalidInputError, match="nodes") as info:
        api.create_datacache(f"{name}-all", str(share), nodes="all", min_copies=2)
    assert "(HTTP 400)" in str(info.value)
    with pytest.raises(e.NotFoundError):
        api.get_datacache(f"{name}-all")


def test_models_deploy_load_apply_and_delete(api: ControlClient, server: RunningServer,
                                             tmp_path: Path):
    spec = toy_model(tmp_path, f"m-{uuid.uuid4().hex[:8]}")
    name = spec.name
    status = api.deploy_model(name, spec.source, runtime="custom",
                              parameters=dict(spec.parameters))
    assert status["name"] == name and status["state"] in ("Pulling", "Unloaded")
    api.load_model(name)
    assert api.get_model(name)["state"] == "Ready"
    r = server.client.post(f"/v2/models/{name}/infer", json=ECHO)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2.5]
    api.unload_model(name)
    assert api.get_model(name)["state"] == "Unloaded"
    # a document with two versions: a rollout answers once the new versions serve
    doc = {"name": name, "versions": {
        "default": {"source": spec.source, "runtime": "custom",
                    "parameters": dict(spec.parameters)},
        "v2": {"source": spec.source, "runtime": "custom",
               "parameters": {**spec.parameters, "tag": "2"}}},
        "traffic": {"default": 50, "v2": 50}}
    applied = api.apply_model(doc)
    assert applied["traffic"] == {"default": 50, "v2": 50}
    assert applied["versions"]["v2"]["status"]["state"] == "Ready"
    assert [m["name"] for m in api.list_models()["models"]] == [name]
    with pytest.raises(e.InvalidInputError, match="traffic"):
        api.apply_model({**doc, "traffic": {"default": 50, "v2": 10}})
    api.delete_model(name)
    with pytest.raises(e.NotFoundError, match=f"no model named '{name}'"):
        api.get_model(name)


def test_errors_carry_the_servers_message(server: RunningServer):
    with ControlClient(server.url) as anonymous:
        with pytest.raises(e.UnauthorizedError, match="CACHEMESH_API_TOKEN") as info:
            anonymous.list_models()
        assert not info.value.invalid
    with ControlClient(server.url, token="not-the-token-at-all") as wrong:
        with pytest.raises(e.UnauthorizedError) as info:
            wrong.list_datacaches()
        assert info.value.invalid
    with ControlClient(server.url, token=TOKEN) as api:
        # a name that would leave its URL segment is refused before anything is sent
        with pytest.raises(e.UnsafePathError):
            api.get_model("../v2/health/live")
        # a lone server lists itself as the one node there is
        (me,) = api.list_nodes()
        assert me["self"] and me["healthy"] and not me["degraded"]
        # what a lone server does not serve yet (the jobs API)
        with pytest.raises(e.NotFoundError, match=r"\(HTTP 404\)"):
            api.list_jobs()
    with ControlClient(f"http://user:secret@127.0.0.1:{free_port()}", timeout=5) as down:
        with pytest.raises(e.UnavailableError, match="cannot reach") as info:
            down.list_models()
        assert "secret" not in str(info.value)


def test_from_settings_sends_the_settings_tokens(server: RunningServer):
    settings = Settings.from_env({"CACHEMESH_URL": server.url, "CACHEMESH_API_TOKEN": TOKEN,
                                  "CACHEMESH_HOME": "/nonexistent"})
    with ControlClient.from_settings(settings) as api:
        assert "models" in api.list_models()


def test_status_codes_map_onto_the_hierarchy():
    def answer(code: int, headers: dict[str, str] | None = None) -> ControlClient:
        transport = httpx.MockTransport(lambda request: httpx.Response(
            code, json={"error": f"said {code}"}, headers=headers))
        return ControlClient("http://cachemesh.invalid", transport=transport)

    with pytest.raises(e.OverloadedError, match=r"said 429 \(HTTP 429\)") as info:
        answer(429, {"Retry-After": "7"}).list_models()
    assert info.value.retry_after == 7
    with pytest.raises(e.CapacityError):
        answer(507).list_models()
    with pytest.raises(e.CachemeshError, match="said 500") as info:
        answer(500).list_models()
    assert type(info.value) is e.CachemeshError


def test_the_async_client_does_the_same(server: RunningServer, tmp_path: Path):
    source = str(origin(tmp_path))
    spec = toy_model(tmp_path, f"am-{uuid.uuid4().hex[:8]}")

    async def main() -> None:
        name = f"a-{uuid.uuid4().hex[:8]}"
        async with AsyncControlClient(server.url, token=TOKEN, timeout=60) as api:
            await api.create_datacache(name, source)
            seen = [ev async for ev in api.datacache_events(name)]
            assert seen[-1].kind == "status" and seen[-1].data["status"] == "Available"
            assert (await api.wait_datacache(name))["status"] == "Available"
            assert name in [c["name"] for c in await api.list_datacaches()]
            await api.delete_datacache(name)
            with pytest.raises(e.NotFoundError):
                await api.get_datacache(name)
            doc = {"versions": {"v1": {"source": spec.source, "runtime": "custom",
                                       "parameters": dict(spec.parameters)}}, "eager": True}
            assert (await api.apply_model(doc, name=spec.name))["name"] == spec.name
            await api.load_model(spec.name)
            assert (await api.get_model(spec.name))["state"] == "Ready"
            await api.delete_model(spec.name)
            assert len(await api.list_nodes()) == 1

    asyncio.run(main())
