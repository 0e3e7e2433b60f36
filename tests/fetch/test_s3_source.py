"""s3:// and oss:// against an S3-compatible server on loopback (moto, server
mode), through the real boto3 protocol."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

import cachemesh
from cachemesh.caches import AVAILABLE
from cachemesh.config import Settings
from cachemesh.errors import (
    AccessDeniedError,
    InvalidInputError,
    SourceChangedError,
    SourceNotFoundError,
    UnsafePathError,
)
from cachemesh.sources import parse_source
from tests.fetch.conftest import CHUNK

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


def put(s3, bucket: str, key: str, data: bytes, *, sha256: bool = False) -> None:
    extra = {"ChecksumAlgorithm": "SHA256"} if sha256 else {}
    s3.put_object(Bucket=bucket, Key=key, Body=data, **extra)


def tree_of(view: Path) -> dict[str, bytes]:
    return {str(p.relative_to(view)): p.read_bytes() for p in view.rglob("*") if p.is_file()}


def events_text(caches, name: str) -> str:
    return "\n".join(f"{e.kind}: {e.message}" for e in caches.events(name))


def pull(s3_origin, uri: str, settings: Settings, **kw):
    return cachemesh.pull(uri, endpoint_url=s3_origin.endpoint_url, settings=settings, **kw)


def test_a_directory_prefix_pulls_everything_below_it(s3_origin, bucket, fcaches, fetch_settings):
    s3 = s3_origin.client()
    files = {"config.json": b'{"a": 1}', "weights/shard-0.bin": os.urandom(3 * CHUNK + 5),
             "weights/shard-1.bin": os.urandom(CHUNK)}
    for rel, data in files.items():
        put(s3, bucket, f"models/bert/{rel}", data)
    put(s3, bucket, "models/bert-large/other.bin", b"not this one")
    put(s3, bucket, "models/bert/", b"")  # a console's "folder" marker
    view = pull(s3_origin, f"s3://{bucket}/models/bert", fetch_settings, name="bert")
    assert tree_of(view) == files
    for rel, data in files.items():
        assert s3_origin.served[f"{bucket}/models/bert/{rel}"] == len(data)  # once each
    info = fcaches.get("bert")
    assert info.status == AVAILABLE and info.source == f"s3://{bucket}/models/bert"
    # Single-part uploads: the ETag is the MD5, and it is checked.
    assert "verified: 3 against the MD5 (ETag)" in events_text(fcaches, "bert")
    # The whole bucket, with a trailing-slash prefix: same bytes, no new transfer.
    s3_origin.served.clear()
    view = pull(s3_origin, f"s3://{bucket}/models/bert/", fetch_settings, name="bert2")
    assert tree_of(view) == files
    assert sum(s3_origin.served.values()) == 0  # single-flight records: same ETags


def test_a_prefix_naming_one_object_pulls_that_object(s3_origin, bucket, fcaches, fetch_settings):
    data = os.urandom(2 * CHUNK)
    put(s3, bucket, "ckpt/model.safetensors", data) if (s3 := s3_origin.client()) else None
    view = pull(s3_origin, f"s3://{bucket}/ckpt/model.safetensors", fetch_settings)
    assert tree_of(view) == {"model.safetensors": data}
    assert view.name == "model.safetensors"


def test_sha256_checksums_are_used_and_multipart_ones_are_not(
        s3_origin, bucket, fcaches, fetch_settings):
    s3 = s3_origin.client()
    small = os.urandom(CHUNK + 3)
    put(s3, bucket, "m/small.bin", small, sha256=True)
    # A multipart upload: its checksum is composite and its ETag is not an MD5.
    up = s3.create_multipart_upload(Bucket=bucket, Key="m/big.bin", ChecksumAlgorithm="SHA256")
    parts, blobs = [], []
    for n in (1, 2):
        body = os.urandom(5 * 1024 * 1024 if n == 1 else 1000)
        blobs.append(body)
        r = s3.upload_part(Bucket=bucket, Key="m/big.bin", UploadId=up["UploadId"], PartNumber=n,
                           Body=body, ChecksumAlgorithm="SHA256")
        parts.append({"PartNumber": n, "ETag": r["ETag"], "ChecksumSHA256": r["ChecksumSHA256"]})
    s3.complete_multipart_upload(Bucket=bucket, Key="m/big.bin", UploadId=up["UploadId"],
                                 MultipartUpload={"Parts": parts})
    source = parse_source(f"s3://{bucket}/m", {"endpoint_url": s3_origin.endpoint_url},
                          fetch_settings)
    listed = {f.path: f for f in source.list_files().files}
    assert listed["small.bin"].sha256 == hashlib.sha256(small).hexdigest()
    assert listed["big.bin"].sha256 is None and listed["big.bin"].md5 is None
    view = pull(s3_origin, f"s3://{bucket}/m", fetch_settings, name="m")
    assert (view / "big.bin").read_bytes() == b"".join(blobs)
    text = events_text(fcaches, "m")
    assert "verified: 1 against the sha256, 1 against the size only" in text
    assert "1 file(s) have no checksum at the origin; verified by size only" in text


def test_a_cut_connection_resumes_and_only_missing_bytes_are_served(
        s3_origin, bucket, fcaches, fetch_settings):
    data = os.urandom(6 * CHUNK)
    put(s3_origin.client(), bucket, "w.bin", data)
    s3_origin.cut_after[f"{bucket}/w.bin"] = [CHUNK // 2, 1000]
    view = pull(s3_origin, f"s3://{bucket}/w.bin", fetch_settings)
    assert (view / "w.bin").read_bytes() == data
    assert s3_origin.served[f"{bucket}/w.bin"] == len(data)
    assert s3_origin.gets[f"{bucket}/w.bin"] == 6 + 2  # six ranges, two resumed


def test_5xx_bursts_are_retried_and_corruption_is_caught(
        s3_origin, bucket, fcaches, fetch_settings):
    s3 = s3_origin.client()
    data = os.urandom(4 * CHUNK)
    put(s3, bucket, "a.bin", data)
    put(s3, bucket, "b.bin", data[::-1], sha256=True)
    s3_origin.errors[f"{bucket}/a.bin"] = [503, 500, 503]  # HEAD, then GETs
    s3_origin.corrupt[f"{bucket}/a.bin"] = 1  # caught by the MD5 ETag
    s3_origin.corrupt[f"{bucket}/b.bin"] = 1  # caught by the sha256 checksum
    view = pull(s3_origin, f"s3://{bucket}/", fetch_settings, name="ab")
    assert tree_of(view) == {"a.bin": data, "b.bin": data[::-1]}
    assert s3_origin.served[f"{bucket}/a.bin"] == 2 * len(data)  # fetched again after the check
    assert set(fcaches.store.blobs.files_on_disk()) == {
        hashlib.sha256(data).hexdigest(), hashlib.sha256(data[::-1]).hexdigest()}


def test_hostile_keys_are_skipped_and_nothing_lands_outside_the_store(
        s3_origin, bucket, fcaches, fetch_settings, tmp_path):
    s3 = s3_origin.client()
    hostile = ["m/../../escape.bin", "m//abs/../../x", "m/a\\b.bin", "m/ctl\x01.bin",
               "m/sub/../../../up.bin", "m/..", "m/."]
    for key in hostile:
        put(s3, bucket, key, b"hostile")
    put(s3, bucket, "m/good.bin", b"good")
    before = set(tmp_path.rglob("*"))
    view = pull(s3_origin, f"s3://{bucket}/m", fetch_settings, name="m")
    assert tree_of(view) == {"good.bin": b"good"}
    skipped = [e.message for e in fcaches.events("m") if e.kind == "warning"]
    assert len(skipped) == len(hostile), skipped
    home = fetch_settings.home
    created = {p for p in set(tmp_path.rglob("*")) - before if not p.is_relative_to(home)}
    assert created == set()
    assert not any("escape" in p.name or "up.bin" in p.name for p in home.rglob("*"))
    # A single object whose name is unsafe, or a prefix with only such objects,
    # is refused outright.
    put(s3, bucket, "solo/..", b"hostile")
    with pytest.raises(UnsafePathError, match="'..' is not allowed"):
        pull(s3_origin, f"s3://{bucket}/solo/..", fetch_settings, name="bad")
    with pytest.raises(UnsafePathError, match="no object below the prefix has a safe name"):
        pull(s3_origin, f"s3://{bucket}/m/..", fetch_settings, name="bad")
    assert not fcaches.exists("bad")


def test_missing_bucket_object_and_access_denied(s3_origin, bucket, fcaches, fetch_settings):
    with pytest.raises(SourceNotFoundError, match="bucket does not exist"):
        pull(s3_origin, "s3://no-such-bucket-here/x", fetch_settings)
    with pytest.raises(SourceNotFoundError, match="no such object or prefix"):
        pull(s3_origin, f"s3://{bucket}/nothing/here", fetch_settings)
    put(s3_origin.client(), bucket, "secret.bin", b"x")
    s3_origin.errors[f"{bucket}/secret.bin"] = [403]
    with pytest.raises(AccessDeniedError, match="access denied"):
        pull(s3_origin, f"s3://{bucket}/secret.bin", fetch_settings)
    assert fcaches.list() == []


def test_credentials_never_show(s3_origin, bucket, fcaches, clean_env):
    environ = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIDVISIBLEID", "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_SESSION_TOKEN": SECRET + "TOKEN"}
    settings = Settings.from_env(environ, chunk_size=CHUNK, retry_backoff_s=0.01)
    put(s3_origin.client(), bucket, "f.bin", b"data")
    pull(s3_origin, f"s3://{bucket}/f.bin", settings, name="f")
    s3_origin.errors[f"{bucket}/g.bin"] = [403]
    put(s3_origin.client(), bucket, "g.bin", b"data")
    with pytest.raises(AccessDeniedError) as denied:
        pull(s3_origin, f"s3://{bucket}/g.bin", settings, name="g")
    info = fcaches.get("f")
    shown = "\n".join([str(denied.value), repr(denied.value.__cause__), info.source, str(info.spec),
                       events_text(fcaches, "f"), repr(parse_source(f"s3://{bucket}/f.bin", {},
                                                                    settings))])
    assert SECRET not in shown
    db = (settings.home / "meta.db").read_bytes() + (settings.home / "meta.db-wal").read_bytes()
    assert SECRET.encode() not in db
    with pytest.raises(InvalidInputError, match="no credentials") as refused:
        parse_source(f"s3://AKID:{SECRET}@{bucket}/f", {}, settings)
    assert SECRET not in str(refused.value)
    with pytest.raises(InvalidInputError, match="must not contain credentials") as refused:
        parse_source(f"s3://{bucket}/f", {"endpoint_url": f"http://AKID:{SECRET}@host"}, settings)
    assert SECRET not in str(refused.value)


def test_oss_needs_an_endpoint_and_uses_virtual_hosts(fetch_settings):
    with pytest.raises(InvalidInputError, match="oss:// needs the endpoint"):
        parse_source("oss://bucket/models/qwen", {}, fetch_settings)
    source = parse_source("oss://bucket/models/qwen",
                          {"endpoint_url": "https://oss-cn-hangzhou.aliyuncs.com"}, fetch_settings)
    assert source.uri == "oss://bucket/models/qwen"
    assert source.default_name() == "qwen"
    client = source.client
    assert client.meta.config.s3["addressing_style"] == "virtual"
    assert client.meta.endpoint_url == "https://oss-cn-hangzhou.aliyuncs.com"
    source.close()
    with pytest.raises(InvalidInputError, match="do not take option"):
        parse_source("s3://bucket/x", {"sha256": "0" * 64}, fetch_settings)


def test_an_object_replaced_during_the_pull_is_refused(s3_origin, bucket, fcaches, fetch_settings):
    s3 = s3_origin.client()
    put(s3, bucket, "m.bin", os.urandom(2 * CHUNK))
    source = parse_source(f"s3://{bucket}/m.bin", {"endpoint_url": s3_origin.endpoint_url},
                          fetch_settings)
    file = source.list_files().files[0]
    put(s3, bucket, "m.bin", os.urandom(2 * CHUNK))
    with pytest.raises(SourceChangedError, match="changed at the origin"):
        source.fetch(file, fcaches.store, lambda n: None)
    source.close()


def test_two_caches_pulling_the_same_object_at_once_fetch_it_once(
        s3_origin, bucket, fcaches, fetch_settings):
    data = os.urandom(8 * CHUNK)
    put(s3_origin.client(), bucket, "shared/w.bin", data)
    s3_origin.delay_s = 0.005  # slow enough that both pulls overlap
    errors = []

    def run(name: str) -> None:
        try:
            pull(s3_origin, f"s3://{bucket}/shared", fetch_settings, name=name)
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert s3_origin.served[f"{bucket}/shared/w.bin"] == len(data)
    for name in ("one", "two"):
        assert (fcaches.view(name) / "w.bin").read_bytes() == data
        assert fcaches.get(name).progress.bytes_done == len(data)
