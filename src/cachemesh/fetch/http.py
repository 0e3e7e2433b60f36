"""HTTP plumbing shared by every source that reads objects over plain HTTP(S).

The https source uses it as is; Hugging Face and ModelScope sources use it
with their own headers (a token) and URLs. Three pieces:

- :func:`make_client`: one ``httpx.Client`` per source, sized for the
  fetcher's concurrency, following redirects (a hub redirects to its CDN;
  httpx drops ``Authorization`` when a redirect leaves the origin).
- :func:`probe`: size, range support and validator of one URL, from a
  ``GET`` of its first byte (``Range: bytes=0-0``). A ranged GET rather than a
  HEAD because presigned URLs are signed for one method and some servers
  answer HEAD differently from GET.
- :func:`read_range`: the fetcher's ``read(start, end)`` for one URL, with
  ``If-Range`` so that a changed object is noticed instead of mixed.

Every httpx error is translated here into :mod:`cachemesh.errors`, naming
the URL with :func:`redact_url` (no user info, no query values: presigned
URLs carry their signature in the query).
"""

from __future__ import annotations

import email.utils
import re
import ssl
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from ..errors import (
    AccessDeniedError,
    SourceChangedError,
    SourceError,
    SourceNotFoundError,
    TransientSourceError,
)

if TYPE_CHECKING:
    from ..config import Settings

_CONTENT_RANGE = re.compile(r"^bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)$")


def user_agent() -> str:
    try:
        return f"cachemesh/{version('cachemesh')}"
    except PackageNotFoundError:
        return "cachemesh"


def redact_url(url: str) -> str:
    """``url`` safe to print: user info dropped, every query value replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    if ":" in (parts.hostname or ""):  # IPv6 literal
        host = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
    query = urlencode([(k, "***") for k, _ in parse_qsl(parts.query, keep_blank_values=True)],
                      safe="*")
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


# httpcore reads a response 64 KiB per recv(). At hundreds of MB/s the Python
# work per read (h11 events, generator hops, one pwrite each) costs more CPU
# than the copy: 1 MiB reads measured about 40% less CPU per GB on loopback
# (benchmarks/fetch.py). httpcore raised it from 4 KiB to 64 KiB for the same
# reason (encode/httpcore#135, 2020). It is a class attribute, so this raises
# it for every HTTP/1.1 connection of the process; recv() returns what has
# arrived, so small responses are unaffected but for one larger allocation.
# 2026-11: httpcore 1.0.9 has no per-connection setting for it.
HTTP11_READ_BYTES = 1024 * 1024


def _raise_read_size() -> None:
    try:
        from httpcore._sync.http11 import HTTP11Connection
    except ImportError:  # httpcore moved it; the default still works
        return
    if getattr(HTTP11Connection, "READ_NUM_BYTES", 0) < HTTP11_READ_BYTES:
        HTTP11Connection.READ_NUM_BYTES = HTTP11_READ_BYTES


def make_client(settings: Settings, headers: Mapping[str, str] | None = None) -> httpx.Client:
    """A client for one source: enough pooled connections for all its reads.

    Configured from the settings only (``trust_env=False``): certificates are
    checked against ``Settings.ca_bundle`` (certifi's bundle by default).
    Redirects are followed; httpx drops ``Authorization`` and ``Cookie`` when a
    redirect leaves the origin, so a token never reaches a hub's CDN.
    """
    _raise_read_size()
    verify: ssl.SSLContext | bool = True
    if settings.ca_bundle:
        try:
            verify = ssl.create_default_context(cafile=settings.ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(f"cannot load the CA bundle {settings.ca_bundle}: {exc}") from exc
    connections = settings.range_concurrency + settings.fetch_concurrency
    timeout = httpx.Timeout(connect=min(30.0, settings.fetch_timeout_s),
                            read=settings.fetch_timeout_s, write=settings.fetch_timeout_s,
                            pool=None)
    return httpx.Client(
        verify=verify,
        trust_env=False,
        follow_redirects=True,
        timeout=timeout,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        headers={"User-Agent": user_agent(), **(headers or {})},
    )


@dataclass(frozen=True)
class Probe:
    """What a server says about one URL."""

    size: int
    ranged: bool  # answers Range requests with 206
    etag: str | None  # as sent, quotes included
    last_modified: str | None

    @property
    def validator(self) -> str | None:
        """For ``If-Range``: a strong ETag, else Last-Modified (weak ETags may not be used)."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    @property
    def origin_tag(self) -> str | None:
        """The object's version, if the server tells one."""
        if self.etag:
            return self.etag
        return f"last-modified={self.last_modified}" if self.last_modified else None


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("Retry-After")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def status_error(response: httpx.Response, what: str) -> SourceError:
    """The error for an unexpected status, naming ``what`` (a redacted URL or object)."""
    code = response.status_code
    if code in (401, 403):
        return AccessDeniedError(f"{what}: the server refused access (HTTP {code});"
                                 " check the URL or credentials")
    if code in (404, 410):
        return SourceNotFoundError(f"{what}: not found at the origin (HTTP {code})")
    if code == 412:
        return SourceChangedError(f"{what} changed at the origin while it was being pulled;"
                                  " pull again")
    if code in (408, 425, 429) or code >= 500:
        return TransientSourceError(f"{what}: the server answered HTTP {code}",
                                    retry_after=_retry_after(response))
    return SourceError(f"{what}: unexpected HTTP {code} from the server")


def transport_error(exc: httpx.HTTPError, what: str) -> SourceError:
    """Translate an httpx exception (never echoing the URL httpx may put in it)."""
    kind = type(exc).__name__
    if _untrusted_certificate(exc):
        # Not worth retrying: the same certificate comes back.
        return SourceError(f"{what}: the server's TLS certificate is not trusted (set"
                           " CACHEMESH_CA_BUNDLE for a private certificate authority)")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return SourceError(f"{what}: {kind}")
    if isinstance(exc, httpx.TooManyRedirects):
        return SourceError(f"{what}: too many redirects")
    if isinstance(exc, httpx.TransportError):
        return TransientSourceError(f"{what}: {kind} while talking to the server")
    return SourceError(f"{what}: {kind}")


def _untrusted_certificate(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # httpx wraps httpcore, which wraps ssl
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    match = _CONTENT_RANGE.match((value or "").strip())
    if not match:
        return None, None, None
    first, last, total = match.groups()
    return (int(first) if first is not None else None,
            int(last) if last is not None else None,
            int(total) if total != "*" else None)


def _check_identity_encoding(response: httpx.Response, what: str) -> None:
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise SourceError(f"{what}: the server sent {encoding}-encoded bytes although"
                          " identity was asked for")


def probe(client: httpx.Client, url: str, headers: Mapping[str, str] | None = None,
          what: str | None = None) -> Probe:
    """Size, range support and validators of ``url`` (one ranged GET, body not read)."""
    what = what or redact_url(url)
    h = {"Accept-Encoding": "identity", "Range": "bytes=0-0", **(headers or {})}
    try:
        with client.stream("GET", url, headers=h) as r:
            etag = r.headers.get("ETag")
            modified = r.headers.get("Last-Modified")
            if r.status_code == 206:
                _, _, total = _parse_content_range(r.headers.get("Content-Range"))
                if total is None:
                    raise SourceError(f"{what}: the server does not tell the object's size")
                return Probe(total, True, etag, modified)
            if r.status_code == 416:  # an empty object has no byte 0
                _, _, total = _parse_content_range(r.headers.get("Content-Range"))
                if total == 0:
                    return Probe(0, True, etag, modified)
                raise status_error(r, what)
            if r.status_code == 200:
                _check_identity_encoding(r, what)
                length = r.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    raise SourceError(f"{what}: the server sends no Content-Length and no"
                                      " ranges, so the size cannot be known before the download")
                return Probe(int(length), False, etag, modified)
            raise status_error(r, what)
    except httpx.HTTPError as exc:
        raise transport_error(exc, what) from exc


def read_range(
    client: httpx.Client,
    url: str,
    start: int,
    end: int,
    *,
    size: int,
    ranged: bool,
    validator: str | None = None,
    headers: Mapping[str, str] | None = None,
    what: str | None = None,
) -> Iterator[bytes]:
    """Yield bytes ``[start, end)`` of ``url`` (the whole body if not ``ranged``).

    With ``validator`` (an ETag or a Last-Modified date) the request carries
    ``If-Range``: a server whose object changed answers 200 with the new whole
    object, which is refused here as :class:`SourceChangedError`.
    """
    what = what or redact_url(url)
    h = {"Accept-Encoding": "identity", **(headers or {})}
    if ranged:
        h["Range"] = f"bytes={start}-{end - 1}"
        if validator:
            h["If-Range"] = validator
    try:
        with client.stream("GET", url, headers=h) as r:
            if ranged and r.status_code == 206:
                first, last, total = _parse_content_range(r.headers.get("Content-Range"))
                if total is not None and total != size:
                    raise SourceChangedError(f"{what} changed at the origin (now {total} bytes,"
                                             f" listed with {size}); pull again")
                if (first, last) != (start, end - 1):
                    raise SourceError(f"{what}: asked for bytes {start}-{end - 1}, the server"
                                      f" sent {r.headers.get('Content-Range')!r}")
            elif r.status_code == 200:
                if ranged and validator:
                    raise SourceChangedError(f"{what} changed at the origin while it was being"
                                             " pulled; pull again")
                if start != 0 or end != size:
                    raise SourceError(f"{what}: the server ignored a Range request")
            else:
                raise status_error(r, what)
            _check_identity_encoding(r, what)
            yield from r.iter_raw()
    except httpx.HTTPError as exc:
        raise transport_error(exc, what) from exc
