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

Remote origins subclass :class:`RemoteSource` instead, and only say how to
read a byte range of one object: the shared fetcher (``cachemesh.fetch``)
does the rest (parallel ranges, retries, resume, verification, single-flight).
Local sources stream through :meth:`Source.open`. A fake beside the real ones
lives in the tests.
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

from ..errors import InvalidInputError

if TYPE_CHECKING:
    from ..config import Settings
    from ..fetch import Fetcher, FetchRequest, RetryPolicy
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
    # A local file that not every local user may read (its own mode, or a folder on its
    # path): a view in an open bucket would widen that, so the cache refuses it there.
    restricted: bool = False

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

    @property
    def display_uri(self) -> str:
        """The URI for events and messages (a presigned URL's query redacted)."""
        return self.uri

    def close(self) -> None:
        """Release clients and connections; the cache calls it after a pull."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.display_uri!r})"


class RemoteSource(Source):
    """An origin reached over the network, fetched by the shared fetcher.

    A new origin (Hugging Face, ModelScope, …) implements, besides
    ``schemes``, ``options`` and ``from_uri``:

    :meth:`list_files`
        Every file, as :class:`RemoteFile`: its ``path`` in the cache, ``size``,
        the checksum the origin publishes (``sha256``: Hugging Face and
        ModelScope LFS files; ``git_sha1``: a Hub's other files; ``md5``: a
        single-part S3 ETag), ``origin_tag`` (the version: ETag, commit) and a
        ``locator`` (the URL or key to read).
    :meth:`read_range`
        The bytes ``[start, end)`` of one object, as an iterator of chunks,
        raising :class:`~cachemesh.errors.TransientSourceError` for what is
        worth retrying (a cut connection, a timeout, a 5xx) and other
        :class:`~cachemesh.errors.SourceError` subclasses for the rest.
        ``cachemesh.fetch.http.read_range`` does this for HTTP(S) URLs.

    and may override :meth:`accepts_ranges` (an origin that can only stream
    a whole object), :meth:`identity`, :meth:`object_name` and :meth:`close`.
    Parallel ranged reads, retries, resume, verification against the
    published digests (or the size alone, which the cache reports in its
    events), single-flight and progress are the fetcher's. A Hugging Face
    source, for example, is its listing plus::

        def read_range(self, file, start, end):
            return fetch.http.read_range(self.client, file.locator, start, end,
                                         size=file.size, ranged=True,
                                         headers=self.auth_headers())

    with ``self.client = fetch.http.make_client(settings)`` (it follows the
    Hub's redirect to its CDN and drops the token when the redirect leaves
    the Hub's host).
    """

    # Who gives the listed files' digests, for messages: None for the origin itself,
    # else the user's option that did (the https source's "--sha256").
    digests_from: str | None = None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._fetchers: dict[str, Fetcher] = {}
        self._fetchers_lock = threading.Lock()

    @abstractmethod
    def read_range(self, file: RemoteFile, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of ``file`` (all of it, from 0, if ranges are not accepted)."""

    def accepts_ranges(self, file: RemoteFile) -> bool:
        """Whether the origin serves byte ranges of ``file`` (resume and parallel reads need it)."""
        return True

    def identity(self, file: RemoteFile) -> str:
        """What names the bytes before they are hashed; equal identities, equal bytes.

        Fetches of equal identities share one download (single-flight) and one
        partial file. A published sha256 names the bytes whatever the origin;
        otherwise the object's locator, its version and its size do, so the
        locator should be absolute (a URL, an endpoint with bucket and key).
        """
        if file.sha256:
            from ..fetch.landing import content_identity

            return content_identity(file.sha256)  # found by a peer from the sha256 alone
        if file.git_sha1:
            return f"git-sha1:{file.git_sha1.lower()}:{file.size}"
        return f"{self.schemes[0]}\n{file.locator}\n{file.origin_tag}\n{file.size}"

    def object_name(self, file: RemoteFile) -> str:
        """The object for messages: no credentials, no query secrets."""
        return f"{self.display_uri.rstrip('/')} ({file.path})"

    @property
    def retry(self) -> RetryPolicy:
        """The retry policy for listing and probing (reads are retried by the fetcher)."""
        from ..fetch import RetryPolicy

        return RetryPolicy(self.settings.fetch_retries, self.settings.retry_backoff_s)

    def fetcher(self, store: Store) -> Fetcher:
        """The fetcher of this source for ``store``, shared by the files of a pull."""
        from ..fetch import Fetcher

        key = str(store.home)
        with self._fetchers_lock:
            fetcher = self._fetchers.get(key)
            if fetcher is None:
                fetcher = self._fetchers[key] = Fetcher(store, self.settings)
            return fetcher

    def fetch_request(self, file: RemoteFile) -> FetchRequest:
        from ..fetch import FetchRequest

        def read(start: int, end: int) -> Iterator[bytes]:
            return self.read_range(file, start, end)

        return FetchRequest(
            identity=self.identity(file),
            size=file.size,
            read=read,
            ranged=self.accepts_ranges(file),
            sha256=file.sha256,
            md5=file.md5,
            git_sha1=file.git_sha1,
            name=self.object_name(file),
            versioned=bool(file.sha256 or file.git_sha1 or file.origin_tag),
            digests_from=self.digests_from,
        )

    def fetch(
        self, file: RemoteFile, store: Store, on_bytes: Callable[[int], None]
    ) -> BlobRef:
        return self.fetcher(store).fetch(self.fetch_request(file), on_bytes)


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
