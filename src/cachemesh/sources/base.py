"""The source interface: what an origin must tell and give the cache.

A source lists the files of one model (or dataset) at an origin and fetches
each of them into the blob store. Everything else (filtering, limits, dedup,
resume, views, status) is the cache's job (``cachemesh.caches``), so a new
origin is one small module:

    class MySource(Source):
        schemes = ("my",)

        @classmethod
        def from_uri(cls, uri, options, settings): ...
        def list_files(self) -> Listing: ...
        def open(self, file) -> BinaryIO: ...       # a sequential reader, or
        def fetch(self, file, store, on_bytes): ... # a faster fetch of your own
        def hub_repo(self) -> HubRepo | None: ...  # optional: also show the files in
                                                    # the Hugging Face layout (hub/)

Remote sources override :meth:`Source.fetch` to use the shared parallel,
resumable fetcher (``cachemesh.fetch``); local sources stream through
:meth:`Source.open`. A fake beside the real ones lives in the tests.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

from ..errors import InvalidInputError

if TYPE_CHECKING:
    from ..config import Settings
    from ..store import BlobRef, Store
    from ..store.hub_layout import HubRepo, TreeEntry


@dataclass(frozen=True)
class RemoteFile:
    """One file as the origin lists it."""

    path: str  # relative POSIX path inside the cache (checked by the cache)
    size: int
    sha256: str | None = None  # published by the origin; verified before the blob is visible
    md5: str | None = None  # e.g. the ETag of a single-part S3 upload
    origin_tag: str | None = None  # the version at the origin: ETag, git oid, mtime
    locator: str = ""  # whatever the source needs to read it (a path, a key, a URL)
    # The git blob id (sha1 of b"blob <size>\0" + bytes), for files a git-backed hub
    # publishes without a sha256. The source verifies it while fetching, and the
    # cache reuses a blob already fetched under the same id.
    git_sha1: str | None = None

    @property
    def checksum_kind(self) -> str:
        if self.sha256:
            return "sha256"
        return "git-sha1" if self.git_sha1 else "md5" if self.md5 else "size"


@dataclass
class Listing:
    files: list[RemoteFile]
    revision: str | None = None  # what the origin's ref resolved to (a commit, a version)
    notes: list[str] = field(default_factory=list)  # warnings for the cache's events
    # Every file of the commit as a Hugging Face-style hub lists it (also the ones
    # include/exclude leave out): written to hub/<repo>/trees/<commit>.json.
    hub_tree: Mapping[str, TreeEntry] | None = None


class Source(ABC):
    """An origin of files. Instances are cheap; listing and fetching do the work."""

    schemes: ClassVar[tuple[str, ...]] = ()
    # Option names this source accepts (beyond the URI); others are refused.
    options: ClassVar[tuple[str, ...]] = ()

    #: canonical URI without credentials, stored in the cache's spec and shown to users
    uri: str

    @classmethod
    @abstractmethod
    def from_uri(cls, uri: str, options: Mapping[str, Any], settings: Settings) -> Source:
        """Parse ``uri`` (and source options such as ``endpoint_url``)."""

    @abstractmethod
    def list_files(self) -> Listing:
        """Every file of the model at the origin, with sizes and any checksums."""

    def open(self, file: RemoteFile) -> BinaryIO:
        """A sequential reader of one file (used by the default :meth:`fetch`)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement open()")

    def fetch(
        self, file: RemoteFile, store: Store, on_bytes: Callable[[int], None]
    ) -> BlobRef:
        """Bring one file into the blob store, verified; returns its blob."""
        with self.open(file) as reader:
            return store.blobs.write_stream(
                reader,
                expected_size=file.size,
                expected_sha256=file.sha256,
                hint=file.path.rsplit("/", 1)[-1],
                on_bytes=on_bytes,
            )

    def hub_repo(self) -> HubRepo | None:
        """The Hugging Face repo (and branch or tag) whose cache layout under
        ``hub/`` shows this source's files; None for origins that are not a hub."""
        return None

    def default_name(self) -> str:
        """A cache name derived from the URI, when the user gives none."""
        tail = self.uri.rstrip("/").rsplit("/", 1)[-1] or "cache"
        return safe_name(tail)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def safe_name(text: str) -> str:
    """Turn any text into a valid cache name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:128]
    return name or "cache"


def check_options(source: type[Source], options: Mapping[str, Any]) -> None:
    unknown = sorted(k for k, v in options.items() if v is not None and k not in source.options)
    if unknown:
        accepted = ", ".join(source.options) or "none"
        raise InvalidInputError(
            f"{source.schemes[0]}:// sources do not take option(s) {', '.join(unknown)}"
            f" (accepted: {accepted})"
        )
