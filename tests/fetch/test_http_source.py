"""https:// (and http://) single files, against a real HTTP origin on loopback."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import ssl
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import cachemesh
from cachemesh.caches import AVAILABLE
from cachemesh.cli import main
from cachemesh.config import Settings
from cachemesh.errors import (
    AccessDeniedError,
    IntegrityError,
    InvalidInputError,
    SourceChangedError,
    SourceError,
    SourceNotFoundError,
    TransientSourceError,
)
from cachemesh.sources import parse_source
from tests.emulators.http_origin import HttpOrigin
from tests.fetch.conftest import CHUNK


def events_text(caches, name: str) -> str:
    return "\n".join(f"{e.kind}: {e.message}" for e in caches.events(name))


def test_pull_a_url_with_ranges_and_sha256(http_origin, fcaches, fetch_settings):
    data = os.urandom(5 * CHUNK + 17)
    http_origin.files["/models/tiny.safetensors"] = data
    url = http_origin.url("/models/tiny.safetensors")
    sha = hashlib.sha256(data).hexdigest()
    view = cachemesh.pull(url, sha256=sha.upper(), settings=fetch_settings)
    assert view.name == "tiny.safetensors"
    assert (view / "tiny.safetensors").read_bytes() == data
    assert http_origin.served["/models/tiny.safetensors"] == len(data) + 1  # + the probe's byte
    ranges = [r for m, p, r in http_origin.requests if r and r != "bytes=0-0"]
    assert len(ranges) == 6  # parallel ranged reads of CHUNK bytes
    info = fcaches.get("tiny.safetensors")
    assert info.status == AVAILABLE and info.progress.bytes_done == len(data)
    assert "verified: 1 against the sha256" in events_text(fcaches, info.name)


def test_without_sha256_the_size_is_all_and_the_events_say_so(http_origin, fcaches, fetch_settings):
    http_origin.files["/f.bin"] = os.urandom(1000)
    view = cachemesh.pull(http_origin.url("/f.bin"), name="f", settings=fetch_settings)
    assert (view / "f.bin").stat().st_size == 1000
    assert "verified by size only" in events_text(fcaches, "f")
    assert [e.level for e in fcaches.events("f") if e.kind == "verification"] == ["warning"]


def test_a_wrong_sha256_fails_and_leaves_nothing(http_origin, fcaches, fetch_settings):
    http_origin.files["/f.bin"] = os.urandom(3 * CHUNK)
    with pytest.raises(IntegrityError, match="sha256"):
        cachemesh.pull(http_origin.url("/f.bin"), sha256="ab" * 32, settings=fetch_settings)
    assert fcaches.list() == []
    assert fcaches.store.blobs.files_on_disk() == {}
    with pytest.raises(InvalidInputError, match="64 hexadecimal"):
        cachemesh.pull(http_origin.url("/f.bin"), sha256="abc", settings=fetch_settings)


def test_a_cut_connection_costs_only_the_missing_bytes(http_origin, fcaches, fetch_settings):
    data = os.urandom(6 * CHUNK)
    http_origin.files["/w.bin"] = data
    source = parse_source(http_origin.url("/w.bin"), {}, fetch_settings)
    file = source.list_files().files[0]
    http_origin.cut_after["/w.bin"] = [100, CHUNK // 2, 7]  # three responses cut short
    source.fetch(file, fcaches.store, lambda n: None)
    assert fcaches.store.blobs.path(hashlib.sha256(data).hexdigest()).read_bytes() == data
    assert http_origin.served["/w.bin"] == 1 + len(data)  # the probe's byte, then each byte once
    starts = [int(r.split("=")[1].split("-")[0]) for m, p, r in http_origin.requests]
    resumed = [s for s in starts if s % CHUNK]
    assert len(resumed) == 3, [r for _, _, r in http_origin.requests]  # resumed where cut
    source.close()


def test_corrupted_bytes_are_caught_fetched_again_and_never_visible(
        http_origin, fcaches, fetch_settings):
    data = os.urandom(4 * CHUNK)
    http_origin.files["/w.bin"] = data
    http_origin.corrupt["/w.bin"] = 1
    view = cachemesh.pull(http_origin.url("/w.bin"), settings=fetch_settings,
                          sha256=hashlib.sha256(data).hexdigest())
    assert (view / "w.bin").read_bytes() == data
    bad = bytearray(data[:CHUNK])
    bad[CHUNK // 2] ^= 0xFF
    assert hashlib.sha256(bytes(bad) + data[CHUNK:]).hexdigest() not in \
        fcaches.store.blobs.files_on_disk()


def test_5xx_bursts_are_retried(http_origin, fcaches, fetch_settings):
    data = os.urandom(2 * CHUNK)
    http_origin.files["/w.bin"] = data
    http_origin.errors["/w.bin"] = [503, 502, 500]  # probe, then reads
    view = cachemesh.pull(http_origin.url("/w.bin"), settings=fetch_settings)
    assert (view / "w.bin").read_bytes() == data
    # More failures in a row than retries: the pull fails, and says why.
    http_origin.files["/x.bin"] = data
    http_origin.errors["/x.bin"] = [503] * (fetch_settings.fetch_retries + 1)
    with pytest.raises(TransientSourceError, match="HTTP 503"):
        cachemesh.pull(http_origin.url("/x.bin"), settings=fetch_settings)


def test_missing_and_forbidden(http_origin, fcaches, fetch_settings):
    with pytest.raises(SourceNotFoundError, match="HTTP 404"):
        cachemesh.pull(http_origin.url("/nope.bin"), settings=fetch_settings)
    http_origin.files["/secret.bin"] = b"x"
    http_origin.errors["/secret.bin"] = [403]
    with pytest.raises(AccessDeniedError):
        cachemesh.pull(http_origin.url("/secret.bin"), settings=fetch_settings)
    assert fcaches.list() == []


def test_a_server_without_ranges_streams_and_restarts_when_cut(
        http_origin, fcaches, fetch_settings):
    data = os.urandom(3 * CHUNK)
    http_origin.files["/s.bin"] = data
    http_origin.ranges = False
    # The probe (a GET of byte 0 that gets a 200) is cut, then the first stream.
    http_origin.cut_after["/s.bin"] = [1, CHUNK + 5]
    progress = []
    view = cachemesh.pull(http_origin.url("/s.bin"), name="s", settings=fetch_settings,
                          on_progress=lambda p: progress.append(p.bytes_done))
    assert (view / "s.bin").read_bytes() == data
    assert http_origin.served["/s.bin"] == 1 + CHUNK + 5 + len(data)  # probe, cut, whole
    assert max(progress) == len(data)  # the restart is not counted twice
    assert "does not serve byte ranges" in events_text(fcaches, "s")


def test_an_object_replaced_during_the_pull_is_refused(http_origin, fcaches, fetch_settings):
    data = os.urandom(4 * CHUNK)
    http_origin.files["/m.bin"] = data
    source = parse_source(http_origin.url("/m.bin"), {}, fetch_settings)
    file = source.list_files().files[0]
    http_origin.files["/m.bin"] = os.urandom(4 * CHUNK)  # new ETag, same size
    with pytest.raises(SourceChangedError, match="changed at the origin"):
        source.fetch(file, fcaches.store, lambda n: None)
    assert fcaches.store.blobs.files_on_disk() == {}
    source.close()


def test_secrets_in_urls_are_redacted_and_credentials_refused(http_origin, fcaches, fetch_settings):
    http_origin.files["/f.bin"] = b"hello"
    url = http_origin.url("/f.bin") + "?X-Amz-Signature=TOPSECRET&X-Amz-Credential=AKIDSECRET"
    cachemesh.pull(url, name="f", settings=fetch_settings)
    info = fcaches.get("f")
    shown = info.source + events_text(fcaches, "f") + repr(parse_source(url, {}, fetch_settings))
    assert "TOPSECRET" not in shown and "AKIDSECRET" not in shown
    assert "X-Amz-Signature=***" in info.source
    http_origin.errors["/f.bin"] = [404]
    with pytest.raises(SourceNotFoundError) as failure:
        cachemesh.pull(url, name="g", settings=fetch_settings)
    assert "TOPSECRET" not in str(failure.value)
    with pytest.raises(InvalidInputError, match="credentials") as refused:
        parse_source("https://user:hunter2@example.com/f.bin", {}, fetch_settings)
    assert "hunter2" not in str(refused.value)


def test_cli_pull_with_sha256(http_origin, fcaches, fetch_settings):
    data = os.urandom(CHUNK + 1)
    http_origin.files["/cli.bin"] = data
    result = CliRunner().invoke(main, [
        "--home", str(fetch_settings.home), "pull", http_origin.url("/cli.bin"), "-q",
        "--sha256", hashlib.sha256(data).hexdigest(),
    ])
    assert result.exit_code == 0, result.output
    view = Path(result.stdout.strip().splitlines()[-1])
    assert (view / "cli.bin").read_bytes() == data


def test_https_with_a_private_certificate_authority(fcaches, fetch_settings, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    with HttpOrigin(tls=server) as origin:
        data = os.urandom(3 * CHUNK)
        origin.files["/m.bin"] = data
        url = origin.url("/m.bin")
        assert url.startswith("https://localhost:")
        untrusting = dataclasses.replace(fetch_settings, ca_bundle=None)  # certifi's bundle
        with pytest.raises(SourceError, match="not trusted") as failure:
            cachemesh.pull(url, settings=untrusting)
        assert not isinstance(failure.value, TransientSourceError)  # not retried
        bundle = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        trusting = dataclasses.replace(fetch_settings, ca_bundle=str(bundle))
        view = cachemesh.pull(url, settings=trusting, sha256=hashlib.sha256(data).hexdigest())
        assert (view / "m.bin").read_bytes() == data
        assert origin.served["/m.bin"] == 1 + len(data)


@pytest.mark.parametrize("path,name", [
    ("/models/model.safetensors", "model.safetensors"),
    ("/a/..%2F..%2Fetc%2Fpasswd", ".._.._etc_passwd"),  # decoded slashes cannot nest
    ("/a/%2e%2e", "download"),
    ("/a/x%00y%5Cz", "x_y_z"),  # NUL and backslash
    ("/", "download"),
])
def test_file_names_from_urls_are_safe(path, name):
    from cachemesh.sources.http import file_name
    from cachemesh.store.names import check_relpath

    assert file_name(f"https://h.example{path}?q=1") == name
    assert check_relpath(name) == name


def test_a_sha256_the_user_gave_is_named_as_theirs_when_the_bytes_differ(
        http_origin, fcaches, fetch_settings):
    """The digest of --sha256 is the user's, not something the origin publishes
    (issue 22, item 12)."""
    data = os.urandom(CHUNK + 1)
    http_origin.files["/given.bin"] = data
    wrong = "0" * 64
    result = CliRunner().invoke(main, [
        "--home", str(fetch_settings.home), "pull", http_origin.url("/given.bin"), "-q",
        "--sha256", wrong])
    assert result.exit_code != 0
    message = result.output
    assert wrong in message and hashlib.sha256(data).hexdigest() in message, message
    assert "publishes" not in message and "--sha256" in message, message
    assert "the origin keeps sending" not in message, message


def test_a_stream_cut_every_time_gives_up_after_the_retry_budget(
        http_origin, fcaches, fetch_settings):
    """An origin without ranges that always cuts the stream halfway (issue 22, item 7):
    each restart throws the bytes away, so it is not progress; the pull gives up after
    the retry budget (fetch_retries=3 here) with an error that says why."""
    data = os.urandom(4 * CHUNK)
    http_origin.files["/cut.bin"] = data
    http_origin.ranges = False
    # Enough cuts for a fetcher that counted restarts as progress to get through them all.
    http_origin.cut_after["/cut.bin"] = [len(data) // 2] * 30
    with pytest.raises(TransientSourceError) as failure:
        cachemesh.pull(http_origin.url("/cut.bin"), name="cut", settings=fetch_settings)
    gets = [r for r in http_origin.requests if r[0] == "GET" and r[1] == "/cut.bin"]
    assert len(gets) == 1 + fetch_settings.fetch_retries + 1  # the probe, then 4 attempts
    message = str(failure.value)
    assert "gave up after 4 attempts" in message and "byte 0" in message, message
    assert not fcaches.exists("cut")  # nothing landed: a one-shot pull leaves nothing
    assert not list((fetch_settings.home / "tmp").rglob("*.part"))


@pytest.mark.parametrize("ranges", [True, False])
def test_a_trickling_origin_is_dropped_under_the_low_speed_limit(
        http_origin, clean_env, ranges: bool):
    """Bytes that come, but too slowly (issue 22, item 8): each response under the
    low-speed limit is dropped and counts as a failure, bytes or not; after the retry
    budget the pull fails, naming the limit."""
    data = os.urandom(8 * 64 * 1024)
    http_origin.files["/slow.bin"] = data
    http_origin.ranges = ranges
    http_origin.delay_s = 0.4  # before each 64 KiB: 160 KiB/s
    settings = Settings.from_env({
        "CACHEMESH_HOME": str(clean_env), "CACHEMESH_FETCH_RETRIES": "1",
        "CACHEMESH_RETRY_BACKOFF": "0.01", "CACHEMESH_CHUNK_SIZE": str(len(data)),
        "CACHEMESH_FETCH_LOW_SPEED_LIMIT": "1MiB", "CACHEMESH_FETCH_LOW_SPEED_TIME": "1"})
    with pytest.raises(TransientSourceError, match="low-speed limit") as failure:
        cachemesh.pull(http_origin.url("/slow.bin"), name="slow", settings=settings)
    assert "CACHEMESH_FETCH_LOW_SPEED_LIMIT" in str(failure.value)
    assert "gave up after 2 attempts" in str(failure.value)
    gets = [r for r in http_origin.requests if r[0] == "GET"]
    assert len(gets) == 1 + 2  # the probe, then two slow attempts
    assert (settings.fetch_low_speed_bytes, settings.fetch_low_speed_time_s) == (1024**2, 1.0)


def test_progress_of_a_slow_transfer_is_reported_every_second(http_origin, fcaches,
                                                              fetch_settings):
    """A slow origin's pull shows its bytes as they come, not in 4 MiB steps (item 8):
    the listener, and the cache's status that other processes read."""
    data = os.urandom(10 * 64 * 1024)
    http_origin.files["/crawl.bin"] = data
    http_origin.ranges = False  # one stream
    http_origin.delay_s = 0.3  # 10 blocks, about 3 s
    seen: list[tuple[float, int, int]] = []

    def listener(p) -> None:
        if 0 < p.bytes_done < len(data):
            status = fcaches.get("crawl").progress.bytes_done  # what `cache status` shows
            seen.append((time.monotonic(), p.bytes_done, status))

    cachemesh.pull(http_origin.url("/crawl.bin"), name="crawl", settings=fetch_settings,
                   on_progress=listener)
    assert len(seen) >= 2, seen
    assert [b for _, b, _ in seen] == sorted(b for _, b, _ in seen)
    assert max(b[0] - a[0] for a, b in zip(seen, seen[1:], strict=False)) < 1.5
    assert max(status for _, _, status in seen) > 0  # the database saw bytes mid-transfer
