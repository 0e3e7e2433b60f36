"""hf:// and ms:// through the shared fetcher: parallel ranges, resume, re-signing, single-flight."""

from __future__ import annotations

import hashlib
import random
import threading

import pytest

import cachemesh
from cachemesh.caches import Caches
from cachemesh.config import Settings
from cachemesh.errors import IntegrityError
from cachemesh.sources import parse_source
from tests.emulators.hf_hub import HfHubEmulator
from tests.emulators.modelscope import ModelScopeEmulator

CHUNK = 256 * 1024
BIG = 2 * 1024 * 1024 + 12345  # eight full ranges and a short one


def _settings(**overrides: object) -> Settings:
    return Settings.from_env(chunk_size=CHUNK, range_concurrency=4, fetch_concurrency=4,
                             retry_backoff_s=0.01, **overrides)


def _files(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {"config.json": b'{"seed": %d}' % seed, "model.safetensors": rng.randbytes(BIG)}


def _ranges(origin_requests: list, sha: str) -> list[str]:
    return [h.get("range", "") for _, path, h in origin_requests if path.endswith(sha)]


@pytest.mark.parametrize("hub", ["hf", "ms"])
def test_a_large_lfs_file_is_fetched_in_parallel_ranges_straight_from_the_cdn(
        hub: str, hf_env: HfHubEmulator, ms_env: ModelScopeEmulator, repo_id: str):
    emulator = hf_env if hub == "hf" else ms_env
    files = _files(1)
    emulator.commit(repo_id, files)
    sha = hashlib.sha256(files["model.safetensors"]).hexdigest()
    before = len(emulator.blob_origin.requests)
    view = cachemesh.pull(f"{hub}://{repo_id}", settings=_settings())

    assert (view / "model.safetensors").read_bytes() == files["model.safetensors"]
    ranges = _ranges(emulator.blob_origin.requests[before:], sha)
    expected = {f"bytes={a}-{min(a + CHUNK, BIG) - 1}" for a in range(0, BIG, CHUNK)}
    assert set(ranges) == expected  # one ranged GET per piece, none repeated
    assert len(ranges) == len(expected)
    assert emulator.blob_origin.served[sha] == BIG  # every byte once
    if hub == "hf":
        # The signed CDN URL is reused: the hub resolves the file far fewer times than
        # there are ranges (at most once per range slot that started before the first answer).
        assert hf_env.resolves[(repo_id, "model.safetensors")] <= 4 < len(ranges)


def test_a_cut_connection_resumes_where_it_stopped(hub_caches: Caches, hf_env: HfHubEmulator,
                                                   repo_id: str):
    files = _files(2)
    hf_env.commit(repo_id, files)
    sha = hashlib.sha256(files["model.safetensors"]).hexdigest()
    hf_env.blob_origin.cut_after[sha] = [100_000, 50_000]  # the first two answers break
    view = cachemesh.pull(f"hf://{repo_id}", settings=_settings())

    assert (view / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert hf_env.blob_origin.cut_after[sha] == []  # both faults were hit
    # The broken ranges were asked again from the byte where they stopped, not from
    # their start, so the origin sent each byte once.
    assert hf_env.blob_origin.served[sha] == BIG
    resumed = [r for r in _ranges(hf_env.blob_origin.requests, sha)
               if int(r.split("=")[1].split("-")[0]) % CHUNK]
    assert len(resumed) == 2, resumed


def test_an_expired_signed_url_is_resolved_again(hf_env: HfHubEmulator, repo_id: str):
    files = _files(3)
    hf_env.commit(repo_id, files)
    source = parse_source(f"hf://{repo_id}", {}, _settings())
    big = next(f for f in source.list_files().files if f.path == "model.safetensors")
    data = files["model.safetensors"]
    try:
        assert b"".join(source.read_range(big, 0, 1000)) == data[:1000]
        assert b"".join(source.read_range(big, 1000, 2000)) == data[1000:2000]
        assert hf_env.resolves[(repo_id, "model.safetensors")] == 1  # the CDN URL was reused
        hf_env.blob_origin.rotate_key()  # every URL signed so far now answers 403
        assert b"".join(source.read_range(big, 5000, 9000)) == data[5000:9000]
        assert hf_env.resolves[(repo_id, "model.safetensors")] == 2
    finally:
        source.close()


def test_a_small_file_is_checked_against_its_git_blob_id(hf_env: HfHubEmulator, repo_id: str):
    files = {"config.json": b'{"a": 1}' * 100, "w.bin": b"w" * 3000}
    hf_env.commit(repo_id, files)
    hf_env.corrupt(hashlib.sha256(files["config.json"]).hexdigest())
    with pytest.raises(IntegrityError, match="git blob id"):
        cachemesh.pull(f"hf://{repo_id}", settings=_settings())


def test_two_caches_of_one_repo_fetch_each_blob_once(hf_env: HfHubEmulator, repo_id: str):
    files = _files(4)
    hf_env.commit(repo_id, files)
    sha = hashlib.sha256(files["model.safetensors"]).hexdigest()
    settings = _settings()
    start = threading.Barrier(2)
    views: dict[str, object] = {}

    def pull(name: str) -> None:
        start.wait()
        views[name] = cachemesh.pull(f"hf://{repo_id}", name=name, settings=settings)

    threads = [threading.Thread(target=pull, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(views) == {"one", "two"}
    for view in views.values():
        assert (view / "model.safetensors").read_bytes() == files["model.safetensors"]  # type: ignore[operator]
    assert hf_env.blob_origin.served[sha] == BIG
    assert hf_env.served[(repo_id, "config.json")] == len(files["config.json"])
    du = Caches(settings).du()
    assert du["logical_bytes"] == 2 * sum(map(len, files.values()))
    assert du["physical_bytes"] == sum(map(len, files.values()))


def test_a_redirect_to_a_file_url_fails_at_once_without_retries(clean_env, tmp_path):
    """A hostile mirror that redirects a file's download to file:// (issue 22, item 12):
    a permanent error, not a transient one retried with backoff."""
    from cachemesh.caches import make_spec
    from cachemesh.errors import SourceError, TransientSourceError

    with HfHubEmulator(blob_origin_url="file:///etc") as hub:
        repo = "org/redirects-to-files"
        hub.commit(repo, {"config.json": b"{}", "model.safetensors": b"\0" * 4096})
        settings = Settings.from_env({"CACHEMESH_HOME": str(tmp_path / "home"),
                                      "HF_ENDPOINT": hub.url, "CACHEMESH_FETCH_RETRIES": "3",
                                      "CACHEMESH_RETRY_BACKOFF": "0.01"})
        caches = Caches(settings)
        with pytest.raises(SourceError) as failure:
            caches.ensure(make_spec(name="evil", source=f"hf://{repo}"))
        assert not isinstance(failure.value, TransientSourceError)
        assert "file://" in str(failure.value) and "model.safetensors" in str(failure.value)
        assert hub.resolves[(repo, "model.safetensors")] == 1  # asked once, never retried
