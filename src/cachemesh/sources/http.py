"""Single files over ``https://`` (and ``http://``).

``cachemesh pull https://host/path/model.safetensors [--sha256 HEX]`` makes a
cache holding one file, named after the last segment of the URL's path. The
server is probed with a ranged GET of the first byte: a 206 means parallel
ranged reads and resume; a 200 means one stream, restarted from the start if
it is cut. With ``--sha256`` the bytes are verified against it before they
become visible; without it only the size can be checked, and the cache says
so in its events.

The URL is kept as given (a presigned URL needs its query to be read again),
but every message, event and ``repr`` shows it with its query values and user
info redacted. Credentials in the user-info part are refused: they would be
stored with the cache's spec.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from ..errors import InvalidInputError
from ..fetch import http as fetch_http
from ..fetch.http import Probe, redact_url
from .base import Listing, RemoteFile, RemoteSource, check_options, safe_name

if TYPE_CHECKING:
    import httpx

    from ..config import Settings

_HEX = set("0123456789abcdef")


def check_sha256_option(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip().lower()
    if len(text) != 64 or not set(text) <= _HEX:
        raise InvalidInputError(f"--sha256 must be 64 hexadecimal digits, got {value!r}")
    return text


def file_name(url: str) -> str:
    """The file's name in the cache: the URL path's last segment, decoded and made safe."""
    path = urlsplit(url).path
    last = unquote(path.rstrip("/").rsplit("/", 1)[-1]) if path.strip("/") else ""
    name = "".join("_" if c in "/\\" or ord(c) < 32 or ord(c) == 127 else c for c in last)
    return name if name not in ("", ".", "..") else "download"


class HttpSource(RemoteSource):
    schemes = ("https", "http")
    options = ("sha256",)
    digests_from = "--sha256"  # the only digest this source knows is the user's

    def __init__(self, url: str, settings: Settings, *, sha256: str | None = None) -> None:
        super().__init__(settings)
        self.uri = url
        self.url = url
        self.sha256 = sha256
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()
        self._probe: Probe | None = None

    @classmethod
    def from_uri(cls, uri: str, options: Mapping[str, Any], settings: Settings) -> HttpSource:
        check_options(cls, options)
        try:
            parts = urlsplit(uri)
        except ValueError:
            raise InvalidInputError("not a valid URL") from None
        if parts.scheme.lower() not in cls.schemes or not parts.hostname:
            raise InvalidInputError(f"not an http(s) URL with a host: {redact_url(uri)}")
        if parts.username is not None or parts.password is not None:
            raise InvalidInputError(
                f"{redact_url(uri)}: credentials in the URL are not accepted (they would be"
                " stored with the cache); use a presigned URL or a token the server accepts"
            )
        # The fragment is never sent to a server; drop it so it does not change the spec.
        url = urlunsplit((parts.scheme.lower(), parts.netloc, parts.path or "/", parts.query, ""))
        return cls(url, settings, sha256=check_sha256_option(options.get("sha256")))

    @property
    def display_uri(self) -> str:
        return redact_url(self.uri)

    def default_name(self) -> str:
        return safe_name(file_name(self.url))

    def object_name(self, file: RemoteFile) -> str:
        return self.display_uri

    @property
    def client(self) -> httpx.Client:
        with self._client_lock:
            if self._client is None:
                self._client = fetch_http.make_client(self.settings)
            return self._client

    def _probed(self) -> Probe:
        if self._probe is None:
            self._probe = self.retry.call(
                lambda: fetch_http.probe(self.client, self.url, what=self.display_uri))
        return self._probe

    def list_files(self) -> Listing:
        probe = self._probed()
        notes = []
        if not probe.ranged:
            notes.append(f"{self.display_uri}: the server does not serve byte ranges;"
                         " downloading in one stream, without resume")
        file = RemoteFile(file_name(self.url), probe.size, sha256=self.sha256,
                          origin_tag=probe.origin_tag, locator=self.url)
        return Listing([file], revision=probe.etag, notes=notes)

    def accepts_ranges(self, file: RemoteFile) -> bool:
        return self._probed().ranged

    def read_range(self, file: RemoteFile, start: int, end: int) -> Iterator[bytes]:
        probe = self._probed()
        return fetch_http.read_range(
            self.client, file.locator, start, end, size=file.size, ranged=probe.ranged,
            validator=probe.validator, what=self.display_uri,
        )

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None
