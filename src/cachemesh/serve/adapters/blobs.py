"""The peer route: ``/api/v1/blobs/sha256/{hex}``, this node's blobs for the other nodes.

A thin adapter over :class:`~.sharing.BlobShare`; the protocol (methods, headers, status
codes) is drawn in ``fetch/peer_http.py``, beside the client that speaks it::

    HEAD /api/v1/blobs/sha256/{hex}           200 + X-Cachemesh-Blob/-Size/-Ranges, or 404
    GET  /api/v1/blobs/sha256/{hex}           Range: bytes=a-b -> 206; a range that has not
                                              landed -> 416; no Range: 200, verified only
    GET  /api/v1/blobs/sha256/{hex}/pieces    the piece list of a verified blob (JSON)
    GET  /api/v1/blobs/sha256/{hex}/watch     a line of JSON each time what it has changes

Authentication is the cluster token, checked here (``auth.RULES`` leaves the path to
this route: peers hold the cluster token, not the control token). ``/metrics`` gains::

    cachemesh_peer_served_bytes_total             bytes this node sent to peers
    cachemesh_peer_requests_total{outcome}        peer calls: ok, partial, probe, not_found,
                                                  not_landed, busy_node, busy_range, ...
    cachemesh_peer_fetched_bytes_total{peer}      bytes this node's pulls took from each peer
    cachemesh_peer_faults_total{peer,kind}        peers dropped or blamed: bad-piece, bad-blob,
                                                  slow, unreachable (fetch/ledger.py)

``CACHEMESH_PEER_FAULT=flip`` (tests only) flips the first byte of every range sent.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from ...errors import InvalidInputError, NotFoundError
from ...fetch.ledger import PeerLedger
from ...fetch.peer_http import (
    BUSY_HEADER,
    RANGES_HEADER,
    SIZE_HEADER,
    STATE_HEADER,
    WATCH_HEARTBEAT_S,
    WATCH_MAX_S,
    Availability,
    format_ranges,
    watch_line,
)
from .auth import credentials
from .sharing import BlobShare, Offer

router = APIRouter()
_HEX = re.compile(r"^[0-9a-f]{64}$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")
READ_BYTES = 1024 * 1024
# How often a watch looks at the fetch's record (a stat).
CHANGE_POLL_S = 0.05


def install(api: FastAPI, service: Any) -> None:
    """Serve this node's blobs to peers on ``api``, with their counts in ``/metrics``."""
    share = BlobShare(service.caches.store, service.settings)
    api.state.blob_share = share
    api.include_router(router)
    try:
        service.metrics.registry.register(_PeerCollector(share))
    except ValueError:
        pass  # a second app over the same service: its collector is there already


def _share(request: Request) -> tuple[BlobShare, list[str]]:
    share: BlobShare = request.app.state.blob_share
    bearer, others = credentials(request.scope["headers"])
    try:
        share.authenticate(bearer)
    except Exception:
        share.count("unauthorized")
        raise
    return share, others


def _sha(hex_: str) -> str:
    if not _HEX.match(hex_):
        raise InvalidInputError(f"not a lowercase sha256 hex digest: {hex_[:80]!r}")
    return hex_


def _headers(offer: Offer) -> dict[str, str]:
    return {STATE_HEADER: offer.state, SIZE_HEADER: str(offer.size),
            RANGES_HEADER: format_ranges(offer.ranges), "Accept-Ranges": "bytes"}


@router.api_route("/api/v1/blobs/sha256/{hex_}", methods=["GET", "HEAD"],
                  include_in_schema=False)
async def get_blob(hex_: str, request: Request) -> Response:
    share, tokens = _share(request)
    sha = _sha(hex_)
    try:
        offer = await anyio.to_thread.run_sync(share.offer, sha, tokens)
    except NotFoundError:
        share.count("not_found")
        raise
    headers = _headers(offer)
    if request.method == "HEAD":
        share.count("probe")
        return Response(status_code=200, headers=headers)
    wanted = request.headers.get("range")
    if wanted is None:
        start, end = 0, offer.size
        if offer.state != "verified":
            return _unsatisfiable(share, offer, headers)
    else:
        match = _RANGE.match(wanted.strip())
        if not match:
            raise InvalidInputError("one range, bytes=FIRST-LAST, is all a peer may ask for")
        start, end = int(match.group(1)), int(match.group(2)) + 1
        if not (start < end <= offer.size and offer.covers(start, end)):
            return _unsatisfiable(share, offer, headers)
    busy = share.begin_upload(sha, start, end)
    if busy is not None:
        share.count(f"busy_{busy}")
        return Response(status_code=503, headers={**headers, BUSY_HEADER: busy,
                                                  "Retry-After": "1"})
    fd = await anyio.to_thread.run_sync(_open, share, sha, offer)
    if fd is None:
        share.end_upload(sha, start, end, 0)
        share.count("not_found")
        raise NotFoundError(f"blob sha256:{sha} is not on this node")
    share.count("ok" if offer.state == "verified" else "partial")
    headers["Content-Length"] = str(end - start)
    status = 200
    if wanted is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{offer.size}"
        status = 206
    return StreamingResponse(_body(share, sha, fd, start, end), status_code=status,
                             headers=headers,
                             media_type="application/octet-stream")


def _open(share: BlobShare, sha: str, offer: Offer) -> int | None:
    """The offer's file, open; a partial that went since the offer was made (its fetch
    committed the blob) is read from the blob instead. None if neither is there."""
    try:
        return os.open(offer.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        if offer.state == "verified":
            return None
    again = share.find(sha)
    if again is None or again.state != "verified":
        return None
    try:
        return os.open(again.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


@router.get("/api/v1/blobs/sha256/{hex_}/watch", include_in_schema=False)
async def watch_blob(hex_: str, request: Request) -> Response:
    share, tokens = _share(request)
    sha = _sha(hex_)
    share.count("watch")
    return StreamingResponse(_changes(share, sha, tokens), media_type="application/x-ndjson")


async def _changes(share: BlobShare, sha: str, tokens: list[str]) -> AsyncIterator[bytes]:
    """One line each time what this node has of the blob changes (a stat of its record every
    CHANGE_POLL_S; the record read only when it changed), the same line again every
    WATCH_HEARTBEAT_S, until the blob is verified here or WATCH_MAX_S passed."""
    start = anyio.current_time()
    stamp: object = None
    state, line, sent_at = None, b"", 0.0
    allowed = False
    while anyio.current_time() - start < WATCH_MAX_S:
        now = share.stamp(sha)
        if now != stamp:
            stamp = now
            found = await anyio.to_thread.run_sync(share.find, sha)
            if found is not None and found.state != state:  # who may see it can change too
                allowed = await anyio.to_thread.run_sync(share.may_read, sha, tokens)
            state = found.state if found is not None else None
            fresh = watch_line(Availability(found.state, found.size, found.ranges)
                               if found is not None and allowed else None)
            if fresh != line:
                line, sent_at = fresh, anyio.current_time()
                yield line
            if found is not None and allowed and found.state == "verified":
                return
        if anyio.current_time() - sent_at >= WATCH_HEARTBEAT_S:
            sent_at = anyio.current_time()
            yield line
        await anyio.sleep(CHANGE_POLL_S)


def _unsatisfiable(share: BlobShare, offer: Offer, headers: dict[str, str]) -> Response:
    share.count("not_landed")
    return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{offer.size}"})


async def _body(share: BlobShare, sha: str, fd: int, start: int,
                end: int) -> AsyncIterator[bytes]:
    sent = 0
    try:
        for pos in range(start, end, READ_BYTES):
            data = await anyio.to_thread.run_sync(os.pread, fd, min(READ_BYTES, end - pos), pos)
            if not data:
                return  # the file is shorter than its record said: the peer sees a short body
            if pos == start and share.fault == "flip":
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            yield data
            sent += len(data)
    finally:
        os.close(fd)
        share.end_upload(sha, start, end, sent)


@router.get("/api/v1/blobs/sha256/{hex_}/pieces", include_in_schema=False)
async def get_pieces(hex_: str, request: Request) -> Response:
    share, tokens = _share(request)
    sha = _sha(hex_)
    pieces = await anyio.to_thread.run_sync(share.pieces, sha, tokens)
    share.count("pieces")
    return Response(pieces.to_json(), media_type="application/json")


class _PeerCollector(Collector):
    """The peer counts of ``/metrics``: this server's uploads, and the store's pulls' peers."""

    def __init__(self, share: BlobShare) -> None:
        self.share = share
        self.ledger = PeerLedger(share.store.home)

    def collect(self) -> Iterator[CounterMetricFamily]:
        served = CounterMetricFamily("cachemesh_peer_served_bytes",
                                     "Bytes this node sent to peers.")
        served.add_metric([], self.share.served_bytes)
        yield served
        requests = CounterMetricFamily("cachemesh_peer_requests", "Peer calls, by outcome.",
                                       labels=["outcome"])
        for outcome, n in sorted(self.share.requests.items()):
            requests.add_metric([outcome], n)
        yield requests
        counts = self.ledger.read()
        fetched = CounterMetricFamily("cachemesh_peer_fetched_bytes",
                                      "Bytes this node's pulls took from each peer.",
                                      labels=["peer"])
        for peer, n in sorted(counts["fetched_bytes"].items()):
            fetched.add_metric([peer], n)
        yield fetched
        faults = CounterMetricFamily("cachemesh_peer_faults",
                                     "Peers dropped or blamed by this node's pulls, by kind.",
                                     labels=["peer", "kind"])
        for peer, kinds in sorted(counts["faults"].items()):
            for kind, n in sorted(kinds.items()):
                faults.add_metric([peer, kind], n)
        yield faults
