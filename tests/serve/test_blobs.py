"""The peer route of a real server: /api/v1/blobs/sha256/{hex} (serve/adapters/blobs.py).

What another node sees: the cluster token on every call, verified blobs by range, the
landed ranges of a blob still fetching (and 416 for the rest), piece lists, protected
buckets, and the counts in /metrics."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachemesh.caches import Caches, make_spec
from cachemesh.errors import UnauthorizedError
from cachemesh.fetch import Fetcher, FetchRequest, content_identity
from cachemesh.fetch.peer_http import Availability, parse_watch_line
from cachemesh.fetch.pieces import PIECE_SIZE, PieceList
from cachemesh.serve.adapters.sharing import BlobShare
from cachemesh.store import Store
from cachemesh.store.buckets import REFRESH_S
from tests.serve.conftest import RunningServer, serve_settings

TOKEN = "cluster-token-for-the-blob-route"
SECRET = "token-of-the-protected-bucket-0"
ROUTE = "/api/v1/blobs/sha256/"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("node")
    settings = serve_settings(home)
    settings = dataclasses.replace(
        settings, cluster=dataclasses.replace(settings.cluster, token=TOKEN))
    with RunningServer(settings, []) as server:
        yield server


def _local_cache(node: RunningServer, name: str, data: bytes, bucket: str = "default") -> str:
    folder = node.settings.home.parent / f"src-{name}"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(data)
    Caches(node.settings).ensure(make_spec(name=name, source=str(folder), bucket=bucket))
    return hashlib.sha256(data).hexdigest()


def _auth(**more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", **more}


def test_every_call_needs_the_cluster_token(node: RunningServer):
    sha = _local_cache(node, "tokens", os.urandom(1000))
    assert node.client.head(ROUTE + sha).status_code == 401
    assert node.client.get(ROUTE + sha, headers={
        "Authorization": "Bearer not-the-cluster-token"}).status_code == 401
    assert node.client.get(f"{ROUTE}{sha}/pieces").status_code == 401
    assert node.client.head(ROUTE + sha, headers=_auth()).status_code == 200
    assert node.client.head(ROUTE + "ab" * 32, headers=_auth()).status_code == 404
    assert node.client.head(ROUTE + "not-hex", headers=_auth()).status_code == 400


def test_a_verified_blob_by_range_and_its_piece_list(node: RunningServer):
    data = os.urandom(PIECE_SIZE + 5000)
    sha = _local_cache(node, "verified", data)
    head = node.client.head(ROUTE + sha, headers=_auth())
    assert head.headers["x-cachemesh-blob"] == "verified"
    assert head.headers["x-cachemesh-size"] == str(len(data))
    assert head.headers["x-cachemesh-ranges"] == f"0-{len(data) - 1}"
    part = node.client.get(ROUTE + sha, headers=_auth(Range="bytes=100-4195000"))
    assert part.status_code == 206 and part.content == data[100:4195001]
    assert part.headers["content-range"] == f"bytes 100-4195000/{len(data)}"
    whole = node.client.get(ROUTE + sha, headers=_auth())
    assert whole.status_code == 200 and whole.content == data
    assert node.client.get(ROUTE + sha, headers=_auth(
        Range=f"bytes=0-{len(data)}")).status_code == 416
    pieces = PieceList.from_json(node.client.get(f"{ROUTE}{sha}/pieces", headers=_auth()).content)
    assert pieces.digests == (hashlib.sha256(data[:PIECE_SIZE]).hexdigest(),
                              hashlib.sha256(data[PIECE_SIZE:]).hexdigest())
    served = node.client.get("/metrics").text
    assert "cachemesh_peer_served_bytes_total" in served


def test_the_landed_ranges_of_a_blob_still_fetching(node: RunningServer):
    data = os.urandom(3 * 1024 * 1024)
    sha = hashlib.sha256(data).hexdigest()
    half = threading.Event()
    finish = threading.Event()

    def read(start: int, end: int) -> Iterator[bytes]:
        if start >= len(data) // 2:
            half.set()
            finish.wait(30)
        yield data[start:end]

    store = Store(node.settings.home)
    settings = dataclasses.replace(node.settings, chunk_size=512 * 1024, range_concurrency=1)
    fetcher = Fetcher(store, settings, checkpoint_s=0.01)
    request = FetchRequest(identity=content_identity(sha), size=len(data), read=read, sha256=sha,
                           name="fetching")
    thread = threading.Thread(target=fetcher.fetch, args=(request,), daemon=True)
    thread.start()
    try:
        assert half.wait(30)
        for _ in range(200):
            head = node.client.head(ROUTE + sha, headers=_auth())
            if head.status_code == 200 and head.headers["x-cachemesh-ranges"]:
                break
            threading.Event().wait(0.02)
        assert head.headers["x-cachemesh-blob"] == "fetching"
        assert head.headers["x-cachemesh-ranges"] == f"0-{len(data) // 2 - 1}"
        landed = node.client.get(ROUTE + sha, headers=_auth(Range="bytes=0-1023"))
        assert landed.status_code == 206 and landed.content == data[:1024]
        missing = node.client.get(ROUTE + sha, headers=_auth(
            Range=f"bytes={len(data) - 10}-{len(data) - 1}"))
        assert missing.status_code == 416
        assert missing.headers["x-cachemesh-ranges"] == head.headers["x-cachemesh-ranges"]
        assert node.client.get(f"{ROUTE}{sha}/pieces", headers=_auth()).status_code == 404
        # A watch: a line now, a line per change, and the end once the blob is verified.
        lines = []
        with node.client.stream("GET", f"{ROUTE}{sha}/watch", headers=_auth()) as stream:
            for line in stream.iter_lines():
                lines.append(parse_watch_line(line))
                if len(lines) == 1:
                    finish.set()  # let the fetch finish
        assert lines[0] == Availability("fetching", len(data), ((0, len(data) // 2),))
        assert lines[-1] == Availability("verified", len(data), ((0, len(data)),))
    finally:
        finish.set()
        thread.join(30)
    assert node.client.head(ROUTE + sha, headers=_auth()).headers["x-cachemesh-blob"] == "verified"


def test_a_protected_buckets_blob_needs_one_of_its_tokens(node: RunningServer):
    caches = Caches(node.settings)
    caches.protect_bucket("private", SECRET)
    data = os.urandom(2000)
    sha = _local_cache(node, "private-model", data, bucket="private")
    time.sleep(REFRESH_S)  # how long the server may trust its copy of the bucket table
    assert node.client.head(ROUTE + sha, headers=_auth()).status_code == 404
    other = _auth(**{"X-Cachemesh-Bucket-Token": "some-other-bucket-token"})
    assert node.client.head(ROUTE + sha, headers=other).status_code == 404
    opened = _auth(**{"X-Cachemesh-Bucket-Token": SECRET})
    assert node.client.get(ROUTE + sha, headers=opened).content == data
    # The same bytes in an open bucket too: then any peer may have them.
    _local_cache(node, "open-copy", data)
    assert node.client.head(ROUTE + sha, headers=_auth()).status_code == 200


def test_a_node_without_a_cluster_token_shares_nothing(tmp_path: Path):
    settings = serve_settings(tmp_path / "lone")
    share = BlobShare(Store(settings.home), settings)
    with pytest.raises(UnauthorizedError):
        share.authenticate([TOKEN])


def test_a_fetch_that_commits_between_the_two_looks_is_offered_verified(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """find() looks for the blob, then reads the fetch's record. A fetch that commits in
    between has its record marked committed by then: the blob is looked for again, not
    answered "absent" (which sent peers to the origin for what this node had)."""
    from tests.fetch.conftest import FakeObject

    settings = serve_settings(tmp_path / "n")
    store = Store(settings.home)
    obj = FakeObject(os.urandom(5000))
    Fetcher(store, settings).fetch(obj.request(sha256=obj.sha256))
    share = BlobShare(store, settings)
    real, looks = share._verified, [0]

    def first_look_misses(sha: str):
        looks[0] += 1
        return None if looks[0] == 1 else real(sha)

    monkeypatch.setattr(share, "_verified", first_look_misses)
    found = share.find(obj.sha256)
    assert looks[0] == 2 and found is not None and found.state == "verified"
