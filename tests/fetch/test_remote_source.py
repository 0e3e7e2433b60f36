"""The contract a new remote source implements (what HF and ModelScope sources
will do), the pieces shared by HTTP sources, and the fetch package's surface."""

from __future__ import annotations

import base64
import hashlib
import inspect
import os
from collections.abc import Iterator

import httpx
import pytest

import cachemesh
import cachemesh.fetch
from cachemesh.config import Settings
from cachemesh.errors import (
    AccessDeniedError,
    InvalidInputError,
    SourceChangedError,
    SourceError,
    SourceNotFoundError,
    TransientSourceError,
)
from cachemesh.fetch import http as fetch_http
from cachemesh.sources import SCHEMES
from cachemesh.sources.base import Listing, RemoteFile, RemoteSource
from cachemesh.sources.s3 import _md5_from_head, _sha256_from_head
from tests.fetch.conftest import CHUNK

HUB: dict[str, dict[str, bytes]] = {}
READS: list[tuple[str, int, int]] = []


class TinyHub(RemoteSource):
    """A whole remote source: list with published sha256, read a byte range."""

    schemes = ("tinyhub",)

    def __init__(self, uri: str, settings: Settings) -> None:
        super().__init__(settings)
        self.uri = uri
        self.repo = uri.removeprefix("tinyhub://")

    @classmethod
    def from_uri(cls, uri, options, settings):  # type: ignore[no-untyped-def]
        return cls(uri, settings)

    def list_files(self) -> Listing:
        return Listing([RemoteFile(p, len(d), sha256=hashlib.sha256(d).hexdigest(),
                                   origin_tag="main", locator=p)
                        for p, d in sorted(HUB[self.repo].items())], revision="main")

    def read_range(self, file: RemoteFile, start: int, end: int) -> Iterator[bytes]:
        READS.append((self.repo, start, end))
        yield HUB[self.repo][file.locator][start:end]


@pytest.fixture
def tinyhub(monkeypatch):
    monkeypatch.setitem(SCHEMES, "tinyhub", TinyHub)
    HUB.clear()
    READS.clear()
    yield HUB


def test_a_source_that_lists_and_reads_ranges_gets_everything_else(tinyhub, fcaches,
                                                                    fetch_settings):
    shared = os.urandom(3 * CHUNK)
    tinyhub["org/base"] = {"config.json": b"{}", "model.safetensors": shared}
    tinyhub["org/tuned"] = {"config.json": b'{"tuned": true}', "model.safetensors": shared}
    view = cachemesh.pull("tinyhub://org/base", settings=fetch_settings)
    assert (view / "model.safetensors").read_bytes() == shared
    assert len([r for r in READS if r[0] == "org/base"]) == 4  # 3 ranges + config
    text = " ".join(e.message for e in fcaches.events("base"))
    assert "verified: 2 against the sha256" in text
    # Another repository publishing the same sha256: not fetched again.
    READS.clear()
    view = cachemesh.pull("tinyhub://org/tuned", settings=fetch_settings)
    assert (view / "model.safetensors").read_bytes() == shared
    assert READS == [("org/tuned", 0, len(b'{"tuned": true}'))]
    assert fcaches.du()["physical_bytes"] == len(shared) + 2 + 15


def test_fetch_package_lists_its_public_names():
    public = {n for n in dir(cachemesh.fetch) if not n.startswith("_")
              and not inspect.ismodule(getattr(cachemesh.fetch, n))}
    assert set(cachemesh.fetch.__all__) == public


@pytest.mark.parametrize("url,shown", [
    ("https://h.example/a/b.bin?X-Amz-Signature=abc&X-Amz-Credential=AKID%2F1",
     "https://h.example/a/b.bin?X-Amz-Signature=***&X-Amz-Credential=***"),
    ("https://user:pw@h.example:8443/f?token=t", "https://h.example:8443/f?token=***"),
    ("http://[::1]:9000/x", "http://[::1]:9000/x"),
    ("https://h.example/f#frag", "https://h.example/f"),
])
def test_redact_url(url, shown):
    assert fetch_http.redact_url(url) == shown


@pytest.mark.parametrize("status,error", [
    (401, AccessDeniedError), (403, AccessDeniedError), (404, SourceNotFoundError),
    (410, SourceNotFoundError), (412, SourceChangedError), (429, TransientSourceError),
    (500, TransientSourceError), (503, TransientSourceError), (418, SourceError),
])
def test_http_statuses_map_to_our_errors(status, error):
    response = httpx.Response(status, headers={"Retry-After": "3"})
    exc = fetch_http.status_error(response, "https://h/f")
    assert type(exc) is error and "https://h/f" in str(exc)
    if error is TransientSourceError:
        assert exc.retry_after == 3.0


def test_s3_checksum_rules():
    sha = hashlib.sha256(b"x").digest()
    b64 = base64.b64encode(sha).decode()
    single = {"ETag": '"' + "a" * 32 + '"', "ChecksumSHA256": b64}
    assert _sha256_from_head(single) == sha.hex()
    assert _md5_from_head(single) == "a" * 32
    assert _sha256_from_head({**single, "ChecksumSHA256": b64 + "-3"}) is None
    assert _sha256_from_head({**single, "ChecksumType": "COMPOSITE"}) is None
    multipart = {"ETag": '"' + "b" * 32 + '-2"', "ChecksumSHA256": b64}
    assert _sha256_from_head(multipart) is None  # moto omits the "-N"; the ETag tells
    assert _sha256_from_head({**multipart, "ChecksumType": "FULL_OBJECT"}) == sha.hex()
    assert _md5_from_head(multipart) is None
    assert _md5_from_head({**single, "ServerSideEncryption": "aws:kms"}) is None
    assert _md5_from_head({**single, "SSECustomerAlgorithm": "AES256"}) is None
    assert _md5_from_head({**single, "ServerSideEncryption": "AES256"}) == "a" * 32
    oss_kms = {**single, "ResponseMetadata": {"HTTPHeaders": {
        "x-oss-server-side-encryption": "KMS"}}}
    assert _md5_from_head(oss_kms) is None


def test_fetch_settings_from_the_environment():
    s = Settings.from_env({"CACHEMESH_FETCH_RETRIES": "2", "CACHEMESH_RETRY_BACKOFF": "0.25",
                           "CACHEMESH_FETCH_TIMEOUT": "5"})
    assert (s.fetch_retries, s.retry_backoff_s, s.fetch_timeout_s) == (2, 0.25, 5.0)
    for bad in ({"CACHEMESH_RETRY_BACKOFF": "soon"}, {"CACHEMESH_FETCH_TIMEOUT": "-1"},
                {"CACHEMESH_FETCH_RETRIES": "0"}):
        with pytest.raises(InvalidInputError):
            Settings.from_env(bad)
