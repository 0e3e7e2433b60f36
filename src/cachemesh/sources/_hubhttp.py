"""HTTP plumbing shared by the hub sources (``hf``, ``ms``).

Listing calls are small JSON requests: :func:`send` retries them a few times on
connection errors, 429 and 5xx. File bytes go through the shared fetcher
(``cachemesh.fetch``: parallel ranges, retries, resume, verification,
single-flight): each source describes a file as an :class:`HttpRequest` and
reads its byte ranges with a :class:`RangeReader`, which follows the hub's
redirect to its CDN and drops the credentials when the redirect leaves the
hub's host (the CDN URL is signed; a token must never reach it).

Credentials live only in request headers, in memory: they are never part of a
URL, an error message or a ``repr``. URLs in messages are shown without their
query string (a signed CDN URL is a short-lived credential too).
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from ..errors import CachemeshError, SourceError, TransientSourceError

if TYPE_CHECKING:
    from ..config import Settings

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_REDIRECTS = 5
CHUNK = 1024 * 1024
# Transport errors that the same request always meets again: not worth a retry.
_PERMANENT = (httpx.UnsupportedProtocol, httpx.InvalidURL)

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
    from ..fetch.http import _raise_read_size

    _raise_read_size()  # 1 MiB socket reads for file bytes (see fetch/http.py)
    # Every range slot of the fetcher, and each file's first request to the hub.
    connections = settings.range_concurrency + settings.fetch_concurrency
    return httpx.Client(
        verify=verify,
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(settings.fetch_timeout_s, connect=min(15.0, settings.fetch_timeout_s)),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        headers={"User-Agent": f"cachemesh/{__version__}"},
    )


class HubConnection:
    """The HTTP client of one hub source and the :class:`RangeReader` over it, made on
    first use (after ``check``, which may refuse the endpoint) and closed with the
    source. Thread-safe: the fetcher reads ranges from many threads at once."""

    def __init__(self, settings: Settings, check: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self._check = check
        self._client: httpx.Client | None = None
        self._reader: RangeReader | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                if self._check is not None:
                    self._check()
                self._client = new_client(self.settings)
            return self._client

    @property
    def reader(self) -> RangeReader:
        client = self.client
        with self._lock:
            if self._reader is None or self._reader.client is not client:
                self._reader = RangeReader(client)
            return self._reader

    def close(self) -> None:
        with self._lock:
            client, self._client, self._reader = self._client, None, None
        if client is not None:
            client.close()

    def __del__(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001, S110 - at interpreter exit anything may fail
                pass


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
            if "CERTIFICATE_VERIFY_FAILED" in str(exc) or isinstance(exc, _PERMANENT):
                break  # retrying will not make the certificate trusted, nor the URL valid
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
# Statuses worth retrying when reading file bytes (the fetcher backs off and resumes).
_TRANSIENT_READ = frozenset({408, 425, 429, 500, 502, 503, 504})
# A CDN answers these for a signed URL that expired: resolve the file again.
_EXPIRED = frozenset({401, 403, 410})


class RangeReader:
    """Byte ranges of hub files, for the shared fetcher (``RemoteSource.read_range``).

    The first read of a file GETs its resolve URL at the hub (with the
    credentials) and follows the redirect by hand, sending the credentials
    only while the URL stays on the hub's origin (:meth:`HttpRequest.headers_for`;
    httpx would keep ``Authorization`` on an http -> https redirect to another
    port of the same host). The URL the redirect ends at (a signed CDN URL) is
    remembered per file, so the other ranges of the file go straight to the CDN
    instead of paying one more round trip to the hub each. When the CDN refuses
    a remembered URL (401/403/410: the signature expired), the file is
    resolved again once; a second refusal is an error.

    Errors: transport errors and 408/425/429/5xx are
    :class:`TransientSourceError` (the fetcher retries and resumes); other
    statuses go through the source's ``on_error(response, from_cdn)``.
    """

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self._resolved: dict[str, str] = {}
        self._lock = threading.Lock()

    def forget(self, url: str) -> None:
        with self._lock:
            self._resolved.pop(url, None)

    def read(self, request: HttpRequest, start: int, end: int, *, size: int, what: str,
             on_error: ErrorMapper) -> Iterator[bytes]:
        """Yield bytes ``[start, end)`` of the file ``request`` names (``size`` bytes)."""
        for attempt in range(2):
            with self._lock:
                cached = self._resolved.get(request.url)
            response, url = self._open(request, cached or request.url, start, end, what)
            from_cdn = url != request.url
            try:
                status = response.status_code
                if status in _EXPIRED and cached is not None and attempt == 0:
                    self.forget(request.url)
                    continue  # the signed URL expired: ask the hub for a new one
                if status in _TRANSIENT_READ:
                    raise TransientSourceError(
                        f"{what}: {redact(url)} answered {status}",
                        retry_after=_retry_after(response))
                if status == 206:
                    expected = f"bytes {start}-{end - 1}/{size}"
                    got = (response.headers.get("Content-Range") or "").strip()
                    if got != expected:
                        raise SourceError(f"{what}: asked for {expected}, the server sent"
                                          f" {got or 'no Content-Range'}")
                elif status == 200:
                    if start != 0 or end != size:
                        raise SourceError(f"{what}: {redact(url)} ignored a"
                                          " Range request")
                else:
                    _read_quietly(response)
                    raise on_error(response, from_cdn)
                if from_cdn:
                    with self._lock:
                        self._resolved[request.url] = url
                encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise SourceError(f"{what}: the server sent {encoding}-encoded bytes")
                try:
                    yield from response.iter_raw()  # as it arrives: a cut keeps what came
                except httpx.HTTPError as exc:
                    raise TransientSourceError(f"{what}: the connection broke"
                                               f" ({_describe(exc)})") from exc
                return
            finally:
                response.close()
        raise AssertionError("unreachable")

    def _open(self, request: HttpRequest, url: str, start: int, end: int,
              what: str) -> tuple[httpx.Response, str]:
        """GET ``url`` with the range, following redirects: the streaming response
        and the URL that answered it."""
        for _ in range(MAX_REDIRECTS + 1):
            headers = request.headers_for(url)
            headers["Accept-Encoding"] = "identity"
            if end > start:
                headers["Range"] = f"bytes={start}-{end - 1}"
            built = self.client.build_request("GET", url, headers=headers)
            try:
                response = self.client.send(built, stream=True)
            except httpx.TransportError as exc:
                if "CERTIFICATE_VERIFY_FAILED" in str(exc) or isinstance(exc, _PERMANENT):
                    raise SourceError(f"cannot fetch {what} from {redact(url)}:"
                                      f" {_describe(exc)}") from exc
                raise TransientSourceError(f"cannot fetch {what} from {redact(url)}:"
                                           f" {_describe(exc)}") from exc
            if not response.is_redirect:
                return response, url
            _read_quietly(response)
            response.close()
            url = urljoin(url, response.headers["Location"])
            if urlsplit(url).scheme.lower() not in ("http", "https"):
                # Permanent: asking again leads to the same place (and never to a local file).
                raise SourceError(f"cannot fetch {what}: {redact(request.url)} redirects to"
                                  f" {redact(url)}; only http:// and https:// are followed")
        raise SourceError(f"too many redirects fetching {what} from {redact(request.url)}")


def _read_quietly(response: httpx.Response) -> None:
    """Read a (small) error body so that ``on_error`` can look at it."""
    try:
        response.read()
    except httpx.HTTPError:
        pass


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None
