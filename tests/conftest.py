"""Fixtures shaped like the code: settings -> store/caches -> sources -> CLI.

The autouse ``clean_env`` fixture gives every test its own CACHEMESH_HOME and
removes the ecosystem's variables, so no test reads the developer's store or
credentials.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cachemesh.caches import Caches
from cachemesh.config import Settings
from cachemesh.sources import SCHEMES
from tests import fakes
from tests.emulators.http_origin import HttpOrigin
from tests.emulators.s3_origin import S3Origin

# The hub emulators' fixtures (hf_hub, ms_hub, hf_env, ms_env, hub_caches, repo_id).
pytest_plugins = ["tests.emulators.fixtures"]

_PREFIXES = ("CACHEMESH_", "HF_", "HUGGINGFACE_", "AWS_", "MODELSCOPE_", "TRANSFORMERS_")


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for key in list(os.environ):
        if key.startswith(_PREFIXES):
            monkeypatch.delenv(key, raising=False)
    home = tmp_path / "cmhome"
    monkeypatch.setenv("CACHEMESH_HOME", str(home))
    monkeypatch.setitem(SCHEMES, "mem", fakes.MemorySource)
    fakes.ORIGINS.clear()
    yield home
    fakes.ORIGINS.clear()


@pytest.fixture
def settings(clean_env: Path) -> Settings:
    return Settings.from_env(fetch_concurrency=4)


@pytest.fixture
def caches(settings: Settings) -> Iterator[Caches]:
    c = Caches(settings)
    yield c
    # Every storage test ends with the store's invariants.
    problems = c.verify()
    assert not problems, problems


@pytest.fixture
def make_tree(tmp_path: Path) -> Callable[[str, dict[str, bytes]], Path]:
    """Write ``{relpath: bytes}`` under tmp_path/<name> and return the directory."""

    def make(name: str, files: dict[str, bytes]) -> Path:
        root = tmp_path / "origins" / name
        for rel, data in files.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        root.mkdir(parents=True, exist_ok=True)
        return root

    return make


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Origin]:
    """One S3-compatible server (moto, server mode) on loopback for the whole session."""
    origin = S3Origin().start()
    yield origin
    origin.stop()


@pytest.fixture
def s3_origin(s3_server: S3Origin) -> Iterator[S3Origin]:
    """The session's S3 server with counters and faults cleared for this test."""
    s3_server.reset_faults()
    yield s3_server
    s3_server.reset_faults()


@pytest.fixture
def http_origin() -> Iterator[HttpOrigin]:
    """A fresh HTTP origin on loopback (Range support, fault injection, byte counters)."""
    with HttpOrigin() as origin:
        yield origin


def model_files(seed: int = 0, n: int = 3, size: int = 64 * 1024) -> dict[str, bytes]:
    """A small fake model: config, tokenizer and some weight shards."""
    rng = __import__("random").Random(seed)
    files = {
        "config.json": b'{"model_type": "tiny", "seed": %d}' % seed,
        "tokenizer.json": b'{"vocab": ["a", "b", "c"]}',
    }
    for i in range(n):
        files[f"weights/shard-{i:02d}.bin"] = rng.randbytes(size)
    return files
