"""HTTP plumbing shared by the hub sources (``hf``, ``ms``).

Listing calls are small JSON requests: :func:`send` retries them a few times on
connection errors, 429 and 5xx. File bytes go through :func:`open_stream`, a
sequential reader that :meth:`Source.fetch`'s default path copies into a blob;
it follows the hub's redirect to its CDN and drops the credentials when the
redirect leaves the hub's host (the CDN URL is signed; a token must never reach
it). Each source also describes every file as an :class:`HttpRequest`, which is
what the shared parallel fetcher (``cachemesh.fetch``) needs to fetch it instead.

Credentials live only in request headers, in memory: they are never part of a
URL, an error message or a ``repr``. URLs in messages are shown without their
query string (a signed CDN URL is a short-lived credential too).
"""

from __future__ import annotations

import hashlib
import io
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from ..errors import CachemeshError, IntegrityError, SourceError

if TYPE_CHECKING:
    from ..config import Settings

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_REDIRECTS = 5
CHUNK = 1024 * 1024
# Headers that carry credentials: dropped when a redirect leaves the origin.
SENSITIVE_HEADERS = frozenset({"authorization", "cookie"})


@dataclass(frozen=True)
class HttpRequest:
    """How to GET one file: the URL at the hub, and the headers to send there.

    A fetcher follows redirects itself and sends the :data:`SENSITIVE_HEADERS`
    only to the hub's own host (scheme, host and port), never to the CDN the hub
    redirects to. Ranged GETs (``Range: bytes=a-b``) work on both.
    """

    url: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)

    def headers_for(self, url: str) -> dict[str, str]:
        """The headers to send to ``url`` (a redirect target, or the URL itself)."""
        if same_origin(url, self.url):
            return dict(self.headers)
        return {k: v for k, v in self.headers.items() if k.lower() not in SENSITIVE_HEADERS}


def redact(url: str) -> str:
    """``url`` without its query string and fragment, for messages."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    default = {"http": 80, "https": 443}
    return (pa.scheme, pa.hostname, pa.port or default.get(pa.scheme)) == (
        pb.scheme, pb.hostname, pb.port or default.get(pb.scheme))


def new_client(settings: Settings) -> httpx.Client:
    """An HTTP client configured from the settings, not from ``os.environ``."""
    verify: ssl.SSLContext | bool = True
    if settings.ca_bundle:
        try:
            verify = ssl.create_default_context(cafile=settings.ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(f"cannot load the CA bundle {settings.ca_bundle}: {exc}") from exc
    from .. import __version__

    return httpx.Client(
        verify=verify,
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(60.0, connect=15.0),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        headers={"User-Agent": f"cachemesh/{__version__}"},
    )


def send(
    client: httpx.Client,
    url: str,
    headers: Mapping[str, str],
    *,
    what: str,
    params: Mapping[str, str] | None = None,
    method: str = "GET",
    attempts: int = 3,
) -> httpx.Response:
    """One small request, retried on connection errors, 429 and 5xx. Never raises for a status."""
    error: Exception | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(min(0.25 * 2**attempt, 2.0))
        try:
            response = client.request(method, url, headers=dict(headers), params=params)
        except httpx.TransportError as exc:
            error = exc
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                break  # retrying will not make the certificate trusted
            continue
        if response.status_code in RETRY_STATUS and attempt < attempts - 1:
            error = None
            continue
        return response
    raise SourceError(f"cannot reach {redact(url)} ({what}): {_describe(error)}") from error


def _describe(exc: Exception | None) -> str:
    if exc is None:
        return "the server kept failing"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


ErrorMapper = Callable[[httpx.Response, bool], CachemeshError]


def open_stream(
    client: httpx.Client,
    request: HttpRequest,
    *,
    what: str,
    on_error: ErrorMapper,
    size: int,
    git_sha1: str | None = None,
) -> BinaryIO:
    """GET ``request`` as a sequential reader, following redirects to the CDN.

    ``on_error(response, redirected)`` turns a failed response into the
    source's error (``redirected``: the response came from the CDN). With
    ``git_sha1``, the git blob id of the bytes is checked at the end of the
    stream, and a mismatch raises :class:`IntegrityError` before the caller
    can commit anything.
    """
    url = request.url
    for _ in range(MAX_REDIRECTS + 1):
        built = client.build_request("GET", url, headers=request.headers_for(url))
        try:
            response = client.send(built, stream=True)
        except httpx.TransportError as exc:
            raise SourceError(f"cannot fetch {what} from {redact(url)}: {_describe(exc)}") from exc
        if response.is_redirect:
            response.close()
            url = urljoin(url, response.headers["Location"])
            continue
        if response.status_code != 200:
            try:
                response.read()
            except httpx.HTTPError:
                pass
            finally:
                response.close()
            raise on_error(response, url != request.url)
        return io.BufferedReader(_ResponseReader(response, what, size, git_sha1), CHUNK)  # type: ignore[return-value]
    raise SourceError(f"too many redirects fetching {what} from {redact(request.url)}")


class _ResponseReader(io.RawIOBase):
    """Raw reader over a streamed response; translates transport errors."""

    def __init__(self, response: httpx.Response, what: str, size: int,
                 git_sha1: str | None) -> None:
        self._response = response
        self._chunks = response.iter_bytes(CHUNK)
        self._pending = memoryview(b"")
        self._what = what
        self._read = 0
        self._git_sha1 = git_sha1
        self._git = hashlib.sha1(b"blob %d\0" % size) if git_sha1 else None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._finish()
                return 0
            except httpx.HTTPError as exc:
                raise SourceError(f"{self._what}: the connection broke after {self._read}"
                                  f" bytes ({_describe(exc)})") from exc
            self._pending = memoryview(chunk)
            if self._git is not None:
                self._git.update(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self._read += n
        return n

    def _finish(self) -> None:
        if self._git is not None:
            actual = self._git.hexdigest()
            self._git = None
            if actual != self._git_sha1:
                raise IntegrityError(
                    f"{self._what}: git blob id {actual} does not match {self._git_sha1}"
                    f" ({self._read} bytes received)"
                )

    def close(self) -> None:
        if not self.closed:
            self._response.close()
        super().close()
