"""The peer protocol over HTTP: what a node serves to the others, and the client that asks.

A node serves the blobs it holds, and the landed pieces of those it is fetching, on its
one HTTP port (``serve/adapters/blobs.py``)::

    HEAD /api/v1/blobs/sha256/{hex}          what it has, in headers only
    GET  /api/v1/blobs/sha256/{hex}          Range: bytes=a-b -> 206 with those bytes
    GET  /api/v1/blobs/sha256/{hex}/pieces   the piece list of a verified blob (pieces.py)

    Authorization: Bearer <CACHEMESH_CLUSTER_TOKEN>     every call
    X-Cachemesh-Bucket-Token: <t1>[, <t2>]              a protected bucket's blob needs one
                                                        of its buckets' tokens

    X-Cachemesh-Blob: verified | fetching | partial     answer headers (HEAD, GET, 416)
    X-Cachemesh-Size: <bytes of the whole blob>
    X-Cachemesh-Ranges: 0-4194303,8388608-16777215      the bytes it can serve now
                                                        (inclusive, as in Range headers)


    GET /api/v1/blobs/sha256/{hex}/watch     application/x-ndjson, one line per change:
        {"state": "fetching", "size": 268435456, "ranges": [[0, 8388608]]}
        {"state": "absent"}                     (not here, or not for this asker)
    the last line again every WATCH_HEARTBEAT_S; the stream ends once the blob is
    verified there (after saying so) or after WATCH_MAX_S. A fetch sees a piece land on
    a peer within one of the peer's checkpoints, with one request per peer, not a poll.

``verified`` is a blob of the store; ``fetching`` and ``partial`` are the landed ranges
of a fetch (running now, or stopped), **not verified**: the asker checks every byte
(piece hashes, then the blob's sha256). A range that has not landed answers 416 with
the headers above; a blob the node does not hold, or holds only for protected buckets
whose token the asker lacks, answers 404; a node with as many uploads running as it
allows, or asked for a range it is sending to another peer right now, answers 503 with
``Retry-After`` and ``X-Cachemesh-Busy: node | range`` (serve/adapters/sharing.py).

:class:`PeerClient` is the asking side, one per fetcher. Its errors are the fetcher's
own: :class:`~cachemesh.errors.SourceNotFoundError` (not there, or not landed),
:class:`~cachemesh.errors.AccessDeniedError` (token refused), :class:`PeerBusy`,
:class:`~cachemesh.errors.TransientSourceError` (cut, timeout, unreachable),
``reads.TooSlow`` (under the peers' low-speed limit).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from ..errors import (
    AccessDeniedError,
    IntegrityError,
    SourceError,
    SourceNotFoundError,
    TransientSourceError,
)
from .http import _raise_read_size, user_agent
from .peers import Peer, PeerState
from .pieces import PieceList
from .reads import LowSpeed

if TYPE_CHECKING:
    from ..config import Settings

ROUTE = "/api/v1/blobs/sha256/"
STATE_HEADER = "X-Cachemesh-Blob"
SIZE_HEADER = "X-Cachemesh-Size"
RANGES_HEADER = "X-Cachemesh-Ranges"
BUCKET_TOKEN_HEADER = "X-Cachemesh-Bucket-Token"
BUSY_HEADER = "X-Cachemesh-Busy"
# A watch sends its last line again this often (so a dead peer is noticed by the read
# timeout), and ends after WATCH_MAX_S (the asker watches again if it still needs to).
WATCH_HEARTBEAT_S = 2.0
WATCH_MAX_S = 120.0

# A peer gets this long to accept a connection, and to send the next bytes.
PEER_CONNECT_TIMEOUT_S = 2.0
PEER_READ_TIMEOUT_S = 5.0
# A piece that comes slower than this (bytes/s, over the window) is dropped, and its
# peer with it: the piece is fetched elsewhere.
PEER_LOW_SPEED = 256 * 1024
PEER_LOW_SPEED_WINDOW_S = 3.0


def format_ranges(ranges: Iterable[tuple[int, int]]) -> str:
    """Half-open ``[start, end)`` ranges as the header writes them: ``0-99,200-299``."""
    return ",".join(f"{s}-{e - 1}" for s, e in ranges if e > s)


def parse_ranges(text: str, size: int) -> tuple[tuple[int, int], ...]:
    """The header's ranges as half-open ``[start, end)``; ValueError if malformed."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        first, sep, last = item.partition("-")
        start, end = int(first), int(last) + 1
        if not sep or not 0 <= start < end <= size:
            raise ValueError(f"bad range {item!r} of a {size}-byte blob")
        out.append((start, end))
    return tuple(sorted(out))


class PeerBusy(TransientSourceError):
    """The peer will not send this now (503): ``what`` is ``node`` (it sends as many
    ranges as it allows) or ``range`` (this range is on its way to another peer, which
    will have it shortly). Ask another holder, or again soon."""

    def __init__(self, message: str, what: str, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.what = what


@dataclass(frozen=True)
class Availability:
    """What one peer said it has of one blob."""

    state: PeerState
    size: int | None = None
    ranges: tuple[tuple[int, int], ...] = ()

    def covers(self, start: int, end: int) -> bool:
        return any(s <= start and end <= e for s, e in self.ranges)


class PeerClient:
    """Asks peers for blobs (see the module docstring). Thread-safe."""

    def __init__(self, settings: Settings) -> None:
        _raise_read_size()  # 1 MiB socket reads, as for origins (fetch/http.py)
        token = settings.cluster.token or ""
        headers = {"Authorization": f"Bearer {token}", "User-Agent": user_agent(),
                   "Accept-Encoding": "identity"}
        if settings.bucket_tokens:
            headers[BUCKET_TOKEN_HEADER] = ", ".join(settings.bucket_tokens)
        connections = 2 * settings.range_concurrency + 16
        self._client = httpx.Client(
            trust_env=False, headers=headers,
            timeout=httpx.Timeout(connect=PEER_CONNECT_TIMEOUT_S, read=PEER_READ_TIMEOUT_S,
                                  write=PEER_READ_TIMEOUT_S, pool=None),
            limits=httpx.Limits(max_connections=connections,
                                max_keepalive_connections=connections))
        # Watches hold a connection each for as long as a fetch runs: a pool of their own,
        # so that they never keep a piece's read waiting for a connection.
        self._watches = httpx.Client(
            trust_env=False, headers=headers,
            timeout=httpx.Timeout(connect=PEER_CONNECT_TIMEOUT_S,
                                  read=PEER_READ_TIMEOUT_S + WATCH_HEARTBEAT_S, write=5.0,
                                  pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))

    def close(self) -> None:
        self._client.close()
        self._watches.close()

    @staticmethod
    def url(peer: Peer, sha256: str) -> str:
        return f"{peer.url}{ROUTE}{sha256}"

    def probe(self, peer: Peer, sha256: str) -> Availability:
        """What ``peer`` has of the blob now (a HEAD); ``dead`` when it does not answer."""
        try:
            r = self._client.head(self.url(peer, sha256))
        except httpx.HTTPError:
            return Availability("dead")
        if r.status_code != 200:
            return Availability("absent")  # 404, or a token it refused
        return _availability(r) or Availability("absent")

    def watch(self, peer: Peer, sha256: str) -> Iterator[Availability]:
        """What ``peer`` has of the blob, each time it changes (see the module docstring).

        Ends when the peer ends the stream; raises TransientSourceError if it cannot be
        reached or goes silent."""
        what = f"peer {peer.name} ({peer.url})"
        try:
            with self._watches.stream("GET", f"{self.url(peer, sha256)}/watch") as r:
                if r.status_code != 200:
                    yield Availability("absent")
                    return
                for line in r.iter_lines():
                    if line.strip():
                        yield parse_watch_line(line)
        except httpx.HTTPError as exc:
            raise TransientSourceError(f"{what}: {type(exc).__name__}") from exc

    def read(self, peer: Peer, sha256: str, start: int, end: int,
             stop: threading.Event) -> bytearray:
        """Bytes ``[start, end)`` of the blob from ``peer``, whole, or an error."""
        what = f"peer {peer.name} ({peer.url}), blob {sha256[:12]}"
        buf = bytearray(end - start)
        view = memoryview(buf)
        got = 0
        speed = LowSpeed(what, PEER_LOW_SPEED, PEER_LOW_SPEED_WINDOW_S, who="the peer",
                         settings="")
        try:
            with self._client.stream("GET", self.url(peer, sha256),
                                     headers={"Range": f"bytes={start}-{end - 1}"}) as r:
                _check_status(r, what)
                if r.headers.get("Content-Range", "").split("/")[0].strip() != \
                        f"bytes {start}-{end - 1}":
                    raise SourceError(f"{what}: asked for bytes {start}-{end - 1}, got"
                                      f" {r.headers.get('Content-Range')!r}")
                for data in r.iter_raw():
                    n = len(data)
                    if got + n > len(buf):
                        raise IntegrityError(f"{what}: sent more than the {len(buf)} bytes"
                                             " asked for")
                    view[got:got + n] = data
                    got += n
                    if stop.is_set():
                        raise TransientSourceError(f"{what}: stopped")
                    speed.check(n)
        except httpx.HTTPError as exc:
            raise TransientSourceError(f"{what}: {type(exc).__name__}") from exc
        if got != len(buf):
            raise TransientSourceError(f"{what}: the response ended after {got} of"
                                       f" {len(buf)} bytes")
        return buf

    def pieces(self, peer: Peer, sha256: str, size: int) -> PieceList | None:
        """The blob's piece list from a peer that holds it verified; None if it has none."""
        try:
            r = self._client.get(f"{self.url(peer, sha256)}/pieces")
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        try:
            found = PieceList.from_json(r.content)
        except ValueError:
            return None
        return found if (found.sha256, found.size) == (sha256, size) else None


def watch_line(available: Availability | None) -> bytes:
    """The line a watch sends for what a node has (None: nothing, for this asker)."""
    if available is None or available.state in ("absent", "dead"):
        return b'{"state": "absent"}\n'
    return json.dumps({"state": available.state, "size": available.size,
                       "ranges": [list(r) for r in available.ranges]}).encode() + b"\n"


def parse_watch_line(line: str) -> Availability:
    try:
        raw = json.loads(line)
        state = raw["state"]
        if state == "absent":
            return Availability("absent")
        if state not in ("verified", "fetching", "partial"):
            raise ValueError(state)
        size = int(raw["size"])
        ranges = tuple(sorted((int(s), int(e)) for s, e in raw["ranges"]))
        if any(not 0 <= s < e <= size for s, e in ranges):
            raise ValueError("bad range")
        return Availability(state, size, ranges)
    except (ValueError, KeyError, TypeError) as exc:
        raise TransientSourceError(f"a peer's watch sent a bad line: {exc}") from None


def _availability(r: httpx.Response) -> Availability | None:
    state = r.headers.get(STATE_HEADER, "")
    if state not in ("verified", "fetching", "partial"):
        return None
    try:
        size = int(r.headers.get(SIZE_HEADER, ""))
        ranges = parse_ranges(r.headers.get(RANGES_HEADER, ""), size)
    except ValueError:
        return None
    return Availability(state, size, ranges)  # type: ignore[arg-type]


def _check_status(r: httpx.Response, what: str) -> None:
    code = r.status_code
    if code == 206:
        return
    if code in (404, 416):
        raise SourceNotFoundError(f"{what}: not there (HTTP {code})")
    if code in (401, 403):
        raise AccessDeniedError(f"{what}: the peer refused the cluster token (HTTP {code})")
    if code == 503:
        raise PeerBusy(f"{what}: busy", r.headers.get(BUSY_HEADER, "node"),
                       retry_after=_seconds(r.headers.get("Retry-After")))
    if code >= 500 or code in (408, 429):
        raise TransientSourceError(f"{what}: HTTP {code}")
    raise SourceError(f"{what}: unexpected HTTP {code}")


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
