"""Loading from an origin while the cache fetches it (load/origin.py), against real
origins on loopback: the HTTP origin and the S3 server (moto) with byte counters,
throttling and corruption.

Each test fails when streaming is off (``stream_origin=False`` pulls first):
the throttled ones check that tensors came while the origin was still sending.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

import cachemesh
from cachemesh.caches import AVAILABLE, Caches
from cachemesh.config import Settings
from cachemesh.errors import IntegrityError, RefetchedError
from cachemesh.fetch import Flight
from cachemesh.sources import parse_source
from cachemesh.store import Store
from tests.emulators.http_origin import HttpOrigin
from tests.emulators.s3_origin import S3Origin
from tests.load.conftest import assert_same

KIB = 1024


def weights(n: int, seed: int, rows: int = 128) -> dict[str, torch.Tensor]:
    """``n`` float32 tensors of ``rows`` x 128 (64 KiB each at 128 rows)."""
    gen = torch.Generator().manual_seed(seed)
    return {f"layer.{i:03d}.weight": torch.randn(rows, 128, generator=gen) for i in range(n)}


@pytest.fixture
def env(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Small fetch pieces and two connections, so a small file lands in many steps."""
    for key, value in {
        "CACHEMESH_CHUNK_SIZE": str(128 * KIB),
        "CACHEMESH_RANGE_CONCURRENCY": "2",
        "CACHEMESH_FETCH_CONCURRENCY": "2",
        "CACHEMESH_RETRY_BACKOFF": "0.01",
        "CACHEMESH_FETCH_TIMEOUT": "20",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    return clean_env


@pytest.fixture
def s3(s3_origin: S3Origin, env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Origin]:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_origin.endpoint_url)
    yield s3_origin


@pytest.fixture
def bucket(s3: S3Origin) -> str:
    name = f"st-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


class TimedFlight(Flight):
    """A Flight that notes when the fetch it watches committed its blob."""

    finished_at: float | None = None

    def finished(self, blob: Path) -> None:
        self.finished_at = time.monotonic()
        super().finished(blob)


def watch_fetch(uri: str) -> TimedFlight:
    """Watch (in this process) the fetch of the single file of ``uri``."""
    from cachemesh.fetch.observe import REGISTRY

    settings = Settings.from_env()
    source = parse_source(uri, {}, settings)
    try:
        (file,) = source.list_files().files
        partial = source.fetcher(Store(settings.home)).partial_path(source.identity(file))
    finally:
        source.close()
    flight = TimedFlight()
    REGISTRY.watch(partial, flight)
    flight._unregister.append(lambda: REGISTRY.unwatch(partial, flight))
    return flight


def probe_count(origin: HttpOrigin) -> int:
    """Ranged GETs of the first byte (a source probing size and range support)."""
    return sum(1 for method, _, rng in origin.requests if method == "GET" and rng == "bytes=0-0")


def quiet(origin: HttpOrigin) -> None:
    """Wait until the origin has answered every request (a probe's byte is counted late)."""
    deadline = time.monotonic() + 10
    while origin.active and time.monotonic() < deadline:
        time.sleep(0.01)


def check_cache(name: str) -> None:
    caches = Caches(Settings.from_env())
    assert caches.get(name).status == AVAILABLE
    assert caches.verify() == []


def test_first_tensor_comes_while_a_throttled_origin_is_still_sending(env: Path) -> None:
    """(a) early first tensor, (b) every byte served once, (c) equal tensors, verified cache."""
    original = weights(96, seed=1)
    data = save(original)
    with HttpOrigin() as origin:
        origin.files["/m/model.safetensors"] = data
        origin.delay_s = 0.01  # per 64 KiB: ~0.5 s for the 6 MiB on two connections
        uri = origin.url("/m/model.safetensors")
        with watch_fetch(uri) as fetch:
            quiet(origin)
            origin.reset_counters()
            got: dict[str, torch.Tensor] = {}
            first_at = served_at_first = None
            with cachemesh.iter_tensors(uri) as stream:
                for name, tensor in stream:
                    if first_at is None:
                        first_at = time.monotonic()
                        served_at_first = origin.served["/m/model.safetensors"]
                    got[name] = tensor.clone()
            ended_at = time.monotonic()
        probes = probe_count(origin)
        served = origin.served["/m/model.safetensors"]
    assert first_at is not None and served_at_first is not None and fetch.finished_at is not None
    # Tensors came while most of the file was still at the origin, well before the fetch ended.
    assert served_at_first < len(data) // 2, (served_at_first, len(data))
    assert first_at < fetch.finished_at <= ended_at
    # One read of the origin served both the cache and the loader (besides the 1-byte probes).
    assert served - probes == len(data)
    assert_same(got, original)
    check_cache("model.safetensors")


def test_load_state_dict_from_s3_streams_a_sharded_checkpoint(
        s3: S3Origin, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """(d) load_state_dict("s3://...") with an index and shards: bytes once, early, verified."""
    shards = {"model-00001-of-00002.safetensors": weights(32, seed=2),
              "model-00002-of-00002.safetensors": weights(16, seed=3, rows=64)}
    second = shards["model-00002-of-00002.safetensors"]
    shards["model-00002-of-00002.safetensors"] = {
        k.replace("layer.", "head."): v for k, v in second.items()}
    index = {"metadata": {"total_size": 0},
             "weight_map": {k: f for f, ts in shards.items() for k in ts}}
    client = s3.client()
    keys = {}
    for fname, ts in shards.items():
        keys[fname] = save(ts, metadata={"format": "pt"})
        client.put_object(Bucket=bucket, Key=f"llm/{fname}", Body=keys[fname])
    client.put_object(Bucket=bucket, Key="llm/model.safetensors.index.json",
                      Body=json.dumps(index).encode())
    client.put_object(Bucket=bucket, Key="llm/config.json", Body=b'{"model_type": "tiny"}')
    s3.reset_faults()
    s3.delay_s = 0.04  # per 64 KiB: ~0.7 s for the first shard on two connections
    first = f"{bucket}/llm/model-00001-of-00002.safetensors"
    seen: dict[str, int] = {}

    class Watch(dict):  # notes what the origin had sent when the first tensor arrived
        def __setitem__(self, key: str, value: torch.Tensor) -> None:
            if not self:
                seen.update(s3.served)
            super().__setitem__(key, value)

    from cachemesh.load import state_dict as sd

    monkeypatch.setattr(sd, "LoadedStateDict", type("Seen", (Watch, sd.LoadedStateDict), {}))
    result = cachemesh.load_state_dict(f"s3://{bucket}/llm", chunk_bytes=128 * KIB)
    expected = {k: v for ts in shards.values() for k, v in ts.items()}
    assert_same(result, expected)
    assert result.metadata == {"format": "pt"}
    # The first tensor came while the first shard was still being sent (pulling first: all of it).
    assert seen.get(first, 0) < len(keys["model-00001-of-00002.safetensors"]), seen
    for fname, body in keys.items():
        assert s3.served[f"{bucket}/llm/{fname}"] == len(body), fname
        assert s3.gets[f"{bucket}/llm/{fname}"] >= 2  # ranged reads, not one GET
    check_cache("llm")


def test_a_corrupt_origin_raises_and_leaves_no_visible_blob(
        s3: S3Origin, bucket: str, env: Path) -> None:
    """(e) the tensors already yielded are disowned by the error; nothing becomes visible."""
    data = save(weights(24, seed=4))
    key = f"{bucket}/bad/model.safetensors"
    s3.client().put_object(Bucket=bucket, Key="bad/model.safetensors", Body=data)  # md5 ETag
    s3.reset_faults()
    s3.corrupt[key] = 1000  # every GET flips a byte
    s3.delay_s = 0.01
    yielded = 0
    with pytest.raises(IntegrityError) as info:
        for _ in cachemesh.iter_tensors(f"s3://{bucket}/bad/model.safetensors"):
            yielded += 1
    assert yielded > 0  # streamed before verification...
    assert "discard them" in "\n".join(getattr(info.value, "__notes__", []))  # ...and disowned
    with pytest.raises(IntegrityError):
        cachemesh.load_state_dict(f"s3://{bucket}/bad/model.safetensors")
    store = Store(Settings.from_env().home)
    assert not [p for p in store.blobs.root.rglob("*") if p.is_file()]
    caches = Caches(Settings.from_env())
    assert all(c.status != AVAILABLE for c in caches.list())
    assert not list((store.home / "buckets").rglob("*.safetensors"))


def test_bytes_fetched_again_after_a_failed_verification_are_not_trusted(
        s3: S3Origin, bucket: str) -> None:
    """One corrupt response: the fetcher refetches the file. iter_tensors says its tensors
    may be wrong; load_state_dict returns the verified ones."""
    original = weights(24, seed=5)
    data = save(original)
    s3.client().put_object(Bucket=bucket, Key="once/model.safetensors", Body=data)
    uri = f"s3://{bucket}/once/model.safetensors"
    s3.reset_faults()
    s3.corrupt[f"{bucket}/once/model.safetensors"] = 1
    s3.delay_s = 0.01
    yielded = 0
    with pytest.raises(RefetchedError):
        for _ in cachemesh.iter_tensors(uri):
            yielded += 1
    assert yielded > 0
    check_cache("model.safetensors")  # the second fetch was verified

    Caches(Settings.from_env()).rm("model.safetensors", force=True)
    Caches(Settings.from_env()).gc(tmp_age_s=0)
    s3.reset_faults()
    s3.corrupt[f"{bucket}/once/model.safetensors"] = 1
    s3.delay_s = 0.01
    result = cachemesh.load_state_dict(uri)
    assert_same(result, original)
    # Fetched twice (the first copy failed verification), each time once.
    assert s3.served[f"{bucket}/once/model.safetensors"] == 2 * len(data)
    check_cache("model.safetensors")


def stream_into(uri: str, origin: HttpOrigin, path: str) -> tuple[dict[str, torch.Tensor], int]:
    """Every tensor of ``uri`` (copied), and what the origin had sent of ``path`` at the first."""
    got: dict[str, torch.Tensor] = {}
    served_at_first = -1
    with cachemesh.iter_tensors(uri) as stream:
        for name, tensor in stream:
            if served_at_first < 0:
                served_at_first = origin.served[path]
            got[name] = tensor.clone()
    return got, served_at_first


def test_a_header_from_bytes_that_fail_verification_is_read_again_verified(
        s3: S3Origin, bucket: str) -> None:
    """The first response flips a byte inside the header: parsing it fails, the stream
    waits for the fetcher's second, verified fetch and reads the file from it, without
    an error, since no tensor of the file had been handed out."""
    from cachemesh.load.origin import OriginStream

    original = {f"t.{i:04d}": torch.full((2,), float(i)) for i in range(1500)}
    data = save(original)
    assert int.from_bytes(data[:8], "little") > len(data) // 2  # the flipped byte is in it
    s3.client().put_object(Bucket=bucket, Key="hdr/model.safetensors", Body=data)
    s3.reset_faults()
    s3.corrupt[f"{bucket}/hdr/model.safetensors"] = 1
    stream = cachemesh.iter_tensors(f"s3://{bucket}/hdr/model.safetensors")
    assert isinstance(stream, OriginStream)
    with stream:
        got = {k: v.clone() for k, v in stream}
    assert_same(got, original)
    assert s3.served[f"{bucket}/hdr/model.safetensors"] == 2 * len(data)
    check_cache("model.safetensors")


def test_two_streams_of_one_source_share_one_fetch(env: Path) -> None:
    """Single-flight in a process: a second loader follows the same partial file."""
    original = weights(48, seed=6)
    data = save(original)
    path = "/two/model.safetensors"
    with HttpOrigin() as origin:
        origin.files[path] = data
        origin.delay_s = 0.02
        uri = origin.url(path)
        results: list[tuple[dict[str, torch.Tensor], int]] = []
        errors: list[BaseException] = []

        def load() -> None:
            try:
                results.append(stream_into(uri, origin, path))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        probes = probe_count(origin)
        served = origin.served[path]
    assert not errors, errors
    assert len(results) == 2
    for got, served_at_first in results:
        assert_same(got, original)
        assert 0 <= served_at_first < len(data), served_at_first
    assert served - probes == len(data)
    check_cache("model.safetensors")


@pytest.mark.slow
def test_a_fetch_run_by_another_process_is_followed_not_repeated(env: Path) -> None:
    """Single-flight across processes: the stream reads the other process's partial file
    through its state record, and the origin serves the file once."""
    original = weights(64, seed=7)
    data = save(original)
    path = "/other/model.safetensors"
    with HttpOrigin() as origin:
        origin.files[path] = data
        origin.delay_s = 0.08  # ~2.6 s on two connections: the record is written every second
        uri = origin.url(path)
        other = subprocess.Popen(
            [sys.executable, "-c", "import sys, cachemesh; cachemesh.pull(sys.argv[1])", uri],
            env=os.environ.copy())
        try:
            fetch_dir = env / "tmp" / "fetch"
            deadline = time.monotonic() + 30
            while not any(
                    json.loads(p.read_text() or "{}").get("landed")
                    for p in (fetch_dir.glob("*.state") if fetch_dir.is_dir() else [])):
                assert other.poll() is None and time.monotonic() < deadline, "no record appeared"
                time.sleep(0.02)
            got, served_at_first = stream_into(uri, origin, path)
            assert other.wait(30) == 0
        finally:
            if other.poll() is None:
                other.kill()
                other.wait()
        probes = probe_count(origin)
        served = origin.served[path]
    assert_same(got, original)
    assert 0 <= served_at_first < len(data), served_at_first
    assert served - probes == len(data)
    check_cache("model.safetensors")


def test_a_blob_already_stored_is_read_without_the_origin(s3: S3Origin, bucket: str) -> None:
    """A second source with the same weights (same published sha256) streams from the
    stored blob while its pull links it; the origin sends none of its bytes."""
    from cachemesh.load.origin import OriginStream

    original = weights(16, seed=8)
    data = save(original)
    client = s3.client()
    for prefix in ("a", "b"):
        client.put_object(Bucket=bucket, Key=f"{prefix}/model.safetensors", Body=data,
                          ChecksumAlgorithm="SHA256")
    assert_same(cachemesh.load_state_dict(f"s3://{bucket}/a/model.safetensors"), original)
    s3.reset_faults()
    stream = cachemesh.iter_tensors(f"s3://{bucket}/b/")
    assert isinstance(stream, OriginStream)
    with stream:
        assert_same({k: v.clone() for k, v in stream}, original)
    assert s3.served[f"{bucket}/b/model.safetensors"] == 0
    check_cache("b")


def test_hf_source_streams(env: Path, hf_env, repo_id: str) -> None:
    """hf:// (LFS file, verified by its sha256) streams like s3:// and https://."""
    from cachemesh.load.origin import OriginStream

    original = weights(16, seed=9)
    data = save(original)
    hf_env.commit(repo_id, {"model.safetensors": data, "config.json": b'{"model_type": "x"}'})
    stream = cachemesh.iter_tensors(f"hf://{repo_id}")
    assert isinstance(stream, OriginStream)
    with stream:
        assert_same({k: v.clone() for k, v in stream}, original)
    assert hf_env.blob_origin.served[hashlib.sha256(data).hexdigest()] == len(data)
    check_cache(repo_id.split("/")[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streaming_onto_a_cuda_device(env: Path) -> None:
    """The CUDA path (pinned staging buffers) reads from the partial file too."""
    from cachemesh.load.origin import OriginStream

    original = weights(24, seed=10)
    with HttpOrigin() as origin:
        origin.files["/gpu/model.safetensors"] = save(original)
        origin.delay_s = 0.01
        stream = cachemesh.iter_tensors(origin.url("/gpu/model.safetensors"), device="cuda")
        assert isinstance(stream, OriginStream)
        with stream:
            got = {k: v.clone() for k, v in stream}
    assert all(t.is_cuda for t in got.values())
    assert_same(got, original)
    check_cache("model.safetensors")
