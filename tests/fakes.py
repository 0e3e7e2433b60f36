"""A fake origin beside the real ones: files held in memory, under ``mem://NAME``.

Tests register file sets in :data:`ORIGINS`, and can make the origin publish a
checksum, lie about one, list hostile names, or fail after some bytes. It
counts what it serves so tests can assert a file was fetched once.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from cachemesh.errors import SourceError, SourceNotFoundError
from cachemesh.sources.base import Listing, RemoteFile, Source, check_options


@dataclass
class Origin:
    files: dict[str, bytes]
    publish_sha256: bool = True
    lie_sha256: set[str] = field(default_factory=set)  # paths whose published sha256 is wrong
    fail_after: dict[str, int] = field(default_factory=dict)  # path -> bytes before an error
    served: Counter = field(default_factory=Counter)  # path -> bytes served
    opened: Counter = field(default_factory=Counter)  # path -> times opened


ORIGINS: dict[str, Origin] = {}


class _Failing(io.RawIOBase):
    def __init__(self, data: bytes, fail_at: int, origin: Origin, path: str) -> None:
        self.data, self.pos, self.fail_at, self.origin, self.path = data, 0, fail_at, origin, path

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if self.pos >= self.fail_at:
            if self.fail_at < len(self.data):
                raise SourceError(f"mem origin cut the connection for {self.path}")
            return 0
        end = min(self.fail_at, self.pos + len(buf))
        n = end - self.pos
        buf[:n] = self.data[self.pos:end]
        self.pos = end
        self.origin.served[self.path] += n
        return n


class MemorySource(Source):
    schemes = ("mem",)
    options = ()

    def __init__(self, name: str) -> None:
        self.name = name
        self.uri = f"mem://{name}"

    @classmethod
    def from_uri(cls, uri: str, options: Mapping[str, Any], settings: Any) -> MemorySource:
        check_options(cls, options)
        return cls(uri.removeprefix("mem://"))

    @property
    def origin(self) -> Origin:
        try:
            return ORIGINS[self.name]
        except KeyError:
            raise SourceNotFoundError(f"mem origin {self.name!r} does not exist") from None

    def list_files(self) -> Listing:
        files = []
        for path, data in sorted(self.origin.files.items()):
            sha = hashlib.sha256(data).hexdigest() if self.origin.publish_sha256 else None
            if path in self.origin.lie_sha256:
                sha = "0" * 64
            files.append(RemoteFile(path, len(data), sha256=sha,
                                    origin_tag=hashlib.md5(data).hexdigest(), locator=path))
        return Listing(files, revision="r1")

    def open(self, file: RemoteFile) -> BinaryIO:
        origin = self.origin
        origin.opened[file.locator] += 1
        data = origin.files[file.locator]
        fail_at = origin.fail_after.get(file.locator, len(data))
        return io.BufferedReader(_Failing(data, fail_at, origin, file.locator))  # type: ignore[return-value]
