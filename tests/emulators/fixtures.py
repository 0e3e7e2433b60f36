"""Fixtures for the hub emulators (loaded from tests/conftest.py as a plugin).

The servers start once per session; tests keep out of each other's way by
using their own repo names (:func:`repo_id`). Function fixtures point the
environment at them after ``clean_env`` has emptied it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachemesh.caches import Caches
from cachemesh.config import Settings
from tests.emulators.hf_hub import HfHubEmulator
from tests.emulators.modelscope import ModelScopeEmulator

# Tokens the emulators know. Long and distinctive, so a grep of the store finds any leak.
HF_TOKEN = "hf_emulatorTOKEN_4f1d9b2c7e5a8d3f6b0c1e2a"
HF_OTHER_TOKEN = "hf_emulatorOTHER_9a8b7c6d5e4f3a2b1c0d"
MS_TOKEN = "ms-emulator-token-7c3e1f0a9b8d2e4c6a5f"


@pytest.fixture(scope="session")
def hf_hub() -> Iterator[HfHubEmulator]:
    # A small page size, so that every listing exercises Link-header pagination.
    hub = HfHubEmulator(tree_page_size=3, tokens=[HF_TOKEN, HF_OTHER_TOKEN]).start()
    yield hub
    hub.stop()


@pytest.fixture(scope="session")
def ms_hub() -> Iterator[ModelScopeEmulator]:
    hub = ModelScopeEmulator(tokens=[MS_TOKEN]).start()
    yield hub
    hub.stop()


@pytest.fixture
def repo_id(request: pytest.FixtureRequest) -> str:
    """A repo name of this test's own: ``org/<test>-<random>``."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]
    return f"org/{name.strip('-')}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def hf_env(hf_hub: HfHubEmulator, clean_env: Path,
           monkeypatch: pytest.MonkeyPatch) -> HfHubEmulator:
    """HF_ENDPOINT points at the emulator (no token unless a test sets HF_TOKEN)."""
    monkeypatch.setenv("HF_ENDPOINT", hf_hub.url)
    monkeypatch.setenv("HF_HOME", str(clean_env.parent / "hf-home"))  # no stray token file
    return hf_hub


@pytest.fixture
def ms_env(ms_hub: ModelScopeEmulator, clean_env: Path,
           monkeypatch: pytest.MonkeyPatch) -> ModelScopeEmulator:
    """MODELSCOPE_DOMAIN points at the emulator, whose test CA cachemesh trusts."""
    monkeypatch.setenv("MODELSCOPE_DOMAIN", ms_hub.domain)
    monkeypatch.setenv("CACHEMESH_CA_BUNDLE", str(ms_hub.ca_file))
    return ms_hub


@pytest.fixture
def hub_caches(hf_env: HfHubEmulator, ms_env: ModelScopeEmulator) -> Iterator[Caches]:
    """Caches built after the environment points at the emulators; verified at the end."""
    caches = Caches(Settings.from_env(fetch_concurrency=4))
    yield caches
    problems = caches.verify()
    assert not problems, problems
