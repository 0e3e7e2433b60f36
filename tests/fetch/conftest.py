"""Fixtures for the fetcher and the remote sources: settings -> store/caches ->
an in-memory object (for the fetcher alone) or a real origin on loopback."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachemesh.caches import Caches
from cachemesh.config import Settings
from cachemesh.errors import TransientSourceError
from cachemesh.fetch import FetchRequest
from cachemesh.store import Store
from tests.emulators.s3_origin import S3Origin

KIB = 1024
CHUNK = 64 * KIB  # small chunks so that small test files still use many ranges


@pytest.fixture
def fetch_settings(clean_env: Path) -> Settings:
    environ = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_REGION": "us-east-1"}
    return Settings.from_env(environ, fetch_concurrency=4, range_concurrency=4, chunk_size=CHUNK,
                             fetch_retries=3, retry_backoff_s=0.01, fetch_timeout_s=10.0)


@pytest.fixture
def store(fetch_settings: Settings) -> Store:
    return Store(fetch_settings.home)


@pytest.fixture
def fcaches(fetch_settings: Settings) -> Iterator[Caches]:
    c = Caches(fetch_settings)
    yield c
    problems = c.verify()
    assert not problems, problems


@pytest.fixture
def bucket(s3_origin: S3Origin) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_origin.client().create_bucket(Bucket=name)
    return name


class FakeObject:
    """An object in memory behind a ``read(start, end)``, with counters and faults.

    ``cuts``: offsets (absolute) at which the next reads stop short, one per read;
    ``transient``: number of reads that fail before sending anything;
    ``corrupt``: number of reads whose first chunk has a flipped byte;
    ``delay_s``: sleep per yielded chunk.
    """

    def __init__(self, data: bytes, *, piece: int = 16 * KIB) -> None:
        self.data = data
        self.piece = piece
        self.served = 0
        self.reads: list[tuple[int, int]] = []
        self.served_ranges: Counter[tuple[int, int]] = Counter()
        self.cuts: list[int] = []
        self.transient = 0
        self.corrupt = 0
        self.delay_s = 0.0
        self.gate: threading.Event | None = None  # reads wait for it before each chunk
        self.lock = threading.Lock()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def read(self, start: int, end: int) -> Iterator[bytes]:
        with self.lock:
            self.reads.append((start, end))
            if self.transient > 0:
                self.transient -= 1
                raise TransientSourceError("fake origin: 503")
            cut = None
            for c in self.cuts:
                if start < c < end:
                    cut = c
                    self.cuts.remove(c)
                    break
            corrupt = self.corrupt > 0
            if corrupt:
                self.corrupt -= 1
        stop = end if cut is None else cut
        pos = start
        while pos < stop:
            if self.gate is not None:
                self.gate.wait(10)
            if self.delay_s:
                time.sleep(self.delay_s)
            chunk = bytearray(self.data[pos:min(pos + self.piece, stop)])
            if corrupt:
                chunk[0] ^= 0xFF
                corrupt = False
            with self.lock:
                self.served += len(chunk)
            yield bytes(chunk)
            pos += len(chunk)

    def request(self, identity: str | None = None, **kw: object) -> FetchRequest:
        fields: dict = {"identity": identity or f"fake:{uuid.uuid4().hex}",
                        "size": len(self.data), "read": self.read, "name": "fake object"}
        fields.update(kw)
        return FetchRequest(**fields)
