"""ms:// against the ModelScope emulator (HTTPS with a test CA), and ModelScope's
own client against the same emulator."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

import cachemesh
from cachemesh.caches import Caches
from cachemesh.config import Settings
from cachemesh.errors import (
    AccessDeniedError,
    IntegrityError,
    InvalidInputError,
    SourceError,
    SourceNotFoundError,
)
from cachemesh.sources import parse_source
from cachemesh.sources.modelscope import ModelScopeSource, modelscope_endpoint, parse_ms_uri
from tests.emulators.fixtures import MS_TOKEN
from tests.emulators.modelscope import ModelScopeEmulator


def model_files(seed: int) -> dict[str, bytes]:
    rng = __import__("random").Random(seed)
    return {
        "configuration.json": b'{"framework": "pytorch", "seed": %d}' % seed,
        "config.json": b'{"model_type": "qwen2", "seed": %d}' % seed,
        "model.safetensors": rng.randbytes(120 * 1024),
        "tokenizer/vocab.txt": b"a\nb\nc\n",
    }


def tree_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_pull_over_tls_verifies_sha256_and_pins_the_commit(hub_caches: Caches,
                                                           ms_env: ModelScopeEmulator, repo_id):
    files = model_files(1)
    commit = ms_env.commit(repo_id, files)
    view = cachemesh.pull(f"ms://{repo_id}", settings=hub_caches.settings)
    assert tree_of(view) == files
    info = hub_caches.get(repo_id.split("/")[1])
    assert info.source == f"ms://{repo_id}@master" and info.revision == commit
    weights = files["model.safetensors"]
    # The large file went through the redirect to the (TLS) blob origin, once.
    assert ms_env.blob_origin.served[hashlib.sha256(weights).hexdigest()] == len(weights)
    assert ms_env.served[(repo_id, "config.json")] == len(files["config.json"])
    assert ms_env.url.startswith("https://")
    # Every file had a Sha256: no "size only" warning; ModelScope has no hub/ layout.
    kinds = [e.kind for e in hub_caches.events(info.name)]
    assert kinds == ["created", "pull-started", "available"]
    assert not (hub_caches.settings.home / "hub").exists()


def test_tags_and_the_endpoint_variables(hub_caches: Caches, ms_env: ModelScopeEmulator, repo_id,
                                         monkeypatch: pytest.MonkeyPatch):
    first = ms_env.commit(repo_id, {"a.txt": b"one"})
    ms_env.repos[repo_id].tag("v1.0.0")
    ms_env.commit(repo_id, {"a.txt": b"two"})
    # MODELSCOPE_ENDPOINT (a URL) wins over MODELSCOPE_DOMAIN, as in the client.
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "unreachable.invalid")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", ms_env.url)
    s = Settings.from_env()
    view = cachemesh.pull(f"ms://{repo_id}@v1.0.0", settings=s)
    assert tree_of(view) == {"a.txt": b"one"}
    assert Caches(s).get(view.name).revision == first
    with pytest.raises(SourceNotFoundError, match="no revision 'nope'"):
        cachemesh.pull(f"ms://{repo_id}@nope", settings=s)


def test_private_missing_and_untrusted(ms_env: ModelScopeEmulator, repo_id,
                                       monkeypatch: pytest.MonkeyPatch):
    ms_env.add_repo(repo_id, private=True, readers=[MS_TOKEN])
    files = model_files(2)
    ms_env.commit(repo_id, files)
    with pytest.raises(AccessDeniedError, match="MODELSCOPE_API_TOKEN"):
        cachemesh.pull(f"ms://{repo_id}", settings=Settings.from_env())
    with pytest.raises(SourceNotFoundError, match=f"{repo_id}-missing was not found"):
        cachemesh.pull(f"ms://{repo_id}-missing", settings=Settings.from_env())
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", MS_TOKEN)
    settings = Settings.from_env()
    view = cachemesh.pull(f"ms://{repo_id}", settings=settings)
    assert tree_of(view) == files
    grep = subprocess.run(["grep", "-rl", "--binary-files=text", MS_TOKEN, str(settings.home)],
                          capture_output=True, text=True)
    assert grep.stdout == ""
    for _, _, headers in ms_env.blob_origin.requests:
        assert MS_TOKEN not in str(headers)
    # Certificates are checked: without the test CA, the emulator is not trusted.
    monkeypatch.delenv("CACHEMESH_CA_BUNDLE")
    with pytest.raises(SourceError, match="CERTIFICATE_VERIFY_FAILED|certificate"):
        cachemesh.pull(f"ms://{repo_id}", name="untrusted", settings=Settings.from_env())


def test_a_corrupted_file_is_caught(hub_caches: Caches, ms_env: ModelScopeEmulator, repo_id):
    files = model_files(3)
    ms_env.commit(repo_id, files)
    ms_env.corrupt(hashlib.sha256(files["config.json"]).hexdigest())
    with pytest.raises(IntegrityError, match="sha256"):
        cachemesh.pull(f"ms://{repo_id}", settings=hub_caches.settings)
    assert not (hub_caches.settings.home / "buckets/default" / repo_id.split("/")[1] /
                "config.json").exists()


def test_a_listing_cut_at_the_server_limit_is_walked_folder_by_folder(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch):
    files = {f"d{i}/f{j}.txt": b"%d-%d" % (i, j) for i in range(3) for j in range(3)}
    files["top.txt"] = b"top"
    with ModelScopeEmulator(files_limit=4) as small:
        small.commit("org/wide", files)
        monkeypatch.setattr("cachemesh.sources.modelscope.TRUNCATION_LIMIT", 4)
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", small.url)
        monkeypatch.setenv("CACHEMESH_CA_BUNDLE", str(small.ca_file))
        view = cachemesh.pull("ms://org/wide", settings=Settings.from_env())
        assert tree_of(view) == files


@pytest.mark.parametrize("env,endpoint", [
    ({}, "https://modelscope.cn"),
    ({"MODELSCOPE_DOMAIN": "www.modelscope.ai"}, "https://www.modelscope.ai"),
    ({"MODELSCOPE_DOMAIN": "http://mirror:8080/"}, "http://mirror:8080"),
    ({"MODELSCOPE_DOMAIN": "x", "MODELSCOPE_ENDPOINT": "https://y"}, "https://y"),
])
def test_endpoint_precedence(env: dict[str, str], endpoint: str):
    assert modelscope_endpoint(env) == endpoint


def test_uri_forms():
    assert parse_ms_uri("ms://Qwen/Qwen2-0.5B") == ("Qwen/Qwen2-0.5B", "master")
    assert parse_ms_uri("modelscope://org/name@v1.0.0") == ("org/name", "v1.0.0")
    for bad in ("ms://single", "ms://datasets/org/d", "ms://a/b/c", "ms://org/name@"):
        with pytest.raises(InvalidInputError):
            parse_source(bad, {}, Settings.from_env())
    source = parse_source("ms://org/name", {}, Settings.from_env({"MODELSCOPE_API_TOKEN": "t0k"}))
    assert isinstance(source, ModelScopeSource) and "t0k" not in repr(source)


def test_modelscopes_own_snapshot_download_accepts_the_emulator(
        ms_env: ModelScopeEmulator, repo_id, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    files = model_files(4)
    ms_env.commit(repo_id, files)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ms_env.ca_file))
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms-home"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))
    from modelscope import snapshot_download

    with pytest.warns(FutureWarning, match="MODELSCOPE_DOMAIN"):
        path = snapshot_download(repo_id, cache_dir=str(tmp_path / "ms-cache"))
    assert tree_of(Path(path)) == files
    assert str(path).startswith(str(tmp_path / "ms-cache"))
    assert os.path.basename(path) == "master"
