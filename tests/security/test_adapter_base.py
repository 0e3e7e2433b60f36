"""An adapter's base model stays in its model's bucket (issue 22, item 2)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cachemesh.caches import Caches, make_spec
from cachemesh.serve.core.registry import MemoryModelRegistry
from tests.emulators.hf_hub import HfHubEmulator
from tests.runtimes.llms import TinyLLMs, tiny_llms
from tests.security.conftest import BUCKET_TOKEN, PROTECTED, WITH_BUCKET
from tests.serve.conftest import RunningServer, serve_settings

__all__ = ["tiny_llms"]  # the session fixture, used here

pytest.importorskip("peft")


def test_a_protected_adapters_base_is_pulled_into_its_bucket_and_a_base_there_works(
        hf_env: HfHubEmulator, repo_id: str, tiny_llms: TinyLLMs, tmp_path: Path):
    """A LoRA in protected bucket team-a over a base on the Hub: the base's cache is in
    team-a (0700, not under hub/, not listed without the token), not in the default
    bucket; and a base taken from a view of team-a itself loads (it used to fail every
    load with UnsafePathError)."""
    chat = tiny_llms.chat
    hf_env.commit(repo_id, {p.relative_to(chat).as_posix(): p
                            for p in chat.rglob("*") if p.is_file()})
    home = tmp_path / "home"
    settings = serve_settings(home, workers=1, source_roots=(tiny_llms.adapters[0].parent,))
    settings = dataclasses.replace(settings, environ={**settings.environ, "HF_ENDPOINT": hf_env.url,
                                                      "HF_HOME": str(tmp_path / "hf-home")})
    caches = Caches(settings)
    caches.protect_bucket(PROTECTED, BUCKET_TOKEN)
    team_base = caches.ensure(make_spec(name="team-base", source=str(chat),
                                        bucket=PROTECTED)).view
    as_team = {"Authorization": f"Bearer {BUCKET_TOKEN}"}
    with RunningServer(settings, [], registry=MemoryModelRegistry()) as server:
        c = server.client

        def deploy_and_ask(name: str, base: str) -> None:
            r = c.post("/api/v1/models", headers=WITH_BUCKET, json={
                "name": name, "source": str(tiny_llms.adapters[0]), "bucket": PROTECTED,
                "runtime": "transformers", "parameters": {"base": base}})
            assert r.status_code == 201, r.text
            r = c.post("/v1/completions", headers=as_team,
                       json={"model": name, "prompt": "hello", "max_tokens": 2})
            assert r.status_code == 200, r.text

        deploy_and_ask("lora-hub", f"hf://{repo_id}")
        infos = caches.list()
        assert {i.bucket for i in infos} == {PROTECTED}, [(i.name, i.bucket) for i in infos]
        assert any(i.source.startswith(f"hf://{repo_id}") for i in infos), infos
        assert not (home / "buckets" / "default").exists()
        assert not list(home.glob("hub/*"))  # hub/ is readable by all: nothing of team-a
        assert c.get("/api/v1/datacaches").json()["datacaches"] == []  # no token: nothing
        seen = c.get("/api/v1/datacaches", headers=WITH_BUCKET).json()["datacaches"]
        assert {d["name"] for d in seen} == {i.name for i in infos}

        deploy_and_ask("lora-view", f"file://{team_base}")
        assert {i.bucket for i in caches.list()} == {PROTECTED}
    assert caches.verify() == []
