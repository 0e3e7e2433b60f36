"""Faults across processes: a pull killed mid-file and resumed, and two
processes that need the same object at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cachemesh.caches import AVAILABLE, FAILED, Caches
from cachemesh.config import Settings
from cachemesh.fetch import identity_key
from cachemesh.fetch.ranges import PartialFiles
from cachemesh.sources import parse_source
from tests.fetch.conftest import CHUNK

# A pull in its own process, checkpointing often so that a kill finds progress.
PULL = textwrap.dedent("""
    import sys
    import cachemesh.fetch.fetcher as fetcher
    fetcher.CHECKPOINT_INTERVAL_S = 0.05
    import cachemesh
    options = {"endpoint_url": sys.argv[3]} if len(sys.argv) > 3 else {}
    print(cachemesh.pull(sys.argv[1], name=sys.argv[2], **options), flush=True)
""")


def start_pull(uri: str, name: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "CACHEMESH_CHUNK_SIZE": str(CHUNK), "CACHEMESH_RANGE_CONCURRENCY": "4",
           "CACHEMESH_RETRY_BACKOFF": "0.01", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing"}
    return subprocess.Popen([sys.executable, "-c", PULL, uri, name, *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_mid_file_then_restart_fetches_only_the_missing_ranges(
        http_origin, fetch_settings, clean_env):
    data = os.urandom(40 * CHUNK)
    http_origin.files["/big.bin"] = data
    http_origin.delay_s = 0.02  # per 64 KiB: about 1.5 s for the file at 4 ranges at once
    url = http_origin.url("/big.bin")
    source = parse_source(url, {}, fetch_settings)
    identity = source.fetch_request(source.list_files().files[0]).identity
    source.close()
    files = PartialFiles(clean_env / "tmp" / "fetch", identity_key(identity))

    def landed() -> int:
        state = files.read_state()
        return state.landed.total() if state is not None else 0

    proc = start_pull(url, "big")
    wait_for(lambda: 8 * CHUNK <= landed() < len(data) // 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: http_origin.active == 0)  # the dead process's responses are over
    at_kill = landed()
    assert 0 < at_kill < len(data)
    served_before = http_origin.served["/big.bin"]

    caches = Caches(Settings.from_env(chunk_size=CHUNK, range_concurrency=4))
    info = caches.get("big")
    assert info.status == FAILED and "interrupted" in info.error
    assert not (clean_env / "buckets/default/big/big.bin").exists()  # nothing half-visible
    http_origin.delay_s = 0.0
    caches.pull("big")
    assert (caches.view("big") / "big.bin").read_bytes() == data
    assert caches.get("big").status == AVAILABLE
    # One probe byte for the new listing, then exactly the bytes the record did not name.
    assert http_origin.served["/big.bin"] - served_before == 1 + len(data) - at_kill
    assert caches.verify() == []
    assert not files.part.exists()


@pytest.mark.slow
def test_two_processes_pulling_the_same_object_fetch_it_once(s3_origin, bucket, clean_env):
    data = os.urandom(24 * CHUNK)
    s3_origin.client().put_object(Bucket=bucket, Key="shared/model.bin", Body=data)
    s3_origin.delay_s = 0.03
    uri = f"s3://{bucket}/shared"
    procs = [start_pull(uri, name, s3_origin.endpoint_url) for name in ("one", "two")]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert s3_origin.served[f"{bucket}/shared/model.bin"] == len(data)  # once, for both
    caches = Caches(Settings.from_env())
    started = [e.ts for n in ("one", "two") for e in caches.events(n) if e.kind == "pull-started"]
    ended = [e.ts for n in ("one", "two") for e in caches.events(n) if e.kind == "available"]
    assert max(started) < min(ended)  # the two pulls overlapped
    for name in ("one", "two"):
        assert (caches.view(name) / "model.bin").read_bytes() == data
        assert caches.get(name).progress.bytes_done == len(data)
    assert caches.verify() == []
