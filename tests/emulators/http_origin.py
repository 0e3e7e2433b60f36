"""An HTTP/1.1 origin on loopback for the fetcher's tests, with fault injection.

Serves files held in memory, with strong ETags, Last-Modified, single byte
ranges (``Range``, ``If-Range``), and counts the body bytes it actually sent
per path, so a test can assert "the origin served this file exactly once".
Faults, per path:

- ``cut_after[path] = [n1, n2, ...]``: the next responses for ``path`` close the
  connection after n1, n2… body bytes (one entry used per response);
- ``corrupt[path] = k``: the next k responses flip one byte of their body;
- ``errors[path] = [503, 503, ...]``: the next requests get these statuses;
- ``delay_s``: sleep this long before each 64 KiB of body (a slow origin);
- ``ranges = False``: ignore ``Range`` and answer 200 (a server without ranges).

Usage::

    with HttpOrigin() as origin:
        origin.files["/m.bin"] = data
        url = origin.url("/m.bin")
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
import time
from collections import Counter
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self

BLOCK = 64 * 1024


class HttpOrigin:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls  # a server context: serve https
        self.files: dict[str, bytes] = {}
        self.ranges = True
        self.send_etag = True
        self.send_last_modified = True
        self.cut_after: dict[str, list[int]] = {}
        self.corrupt: Counter[str] = Counter()
        self.errors: dict[str, list[int]] = {}
        self.delay_s = 0.0
        self.served: Counter[str] = Counter()  # path -> body bytes sent
        self.active = 0  # responses being sent now
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.lock = threading.Lock()
        self._mtime = time.time() - 60
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------

    def url(self, path: str) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{'localhost' if self.tls else host}:{port}{path}"

    def etag(self, path: str) -> str:
        return '"' + hashlib.md5(self.files[path]).hexdigest()[:16] + '"'

    def reset_counters(self) -> None:
        with self.lock:
            self.served.clear()
            self.requests.clear()

    def start(self) -> HttpOrigin:
        origin = self

        class Handler(_Handler):
            pass

        Handler.origin = origin
        self._server = _Server(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True,
                                                       do_handshake_on_connect=False)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- faults, taken one per response ------------------------------------------------

    def _take(self, table: dict[str, list[int]], path: str) -> int | None:
        with self.lock:
            queue = table.get(path)
            if queue:
                return queue.pop(0)
        return None

    def _take_corrupt(self, path: str) -> bool:
        with self.lock:
            if self.corrupt[path] > 0:
                self.corrupt[path] -= 1
                return True
        return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients closing connections early is what these tests do


class _Handler(BaseHTTPRequestHandler):
    origin: HttpOrigin
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        o = self.origin
        with o.lock:
            o.active += 1
        try:
            self._respond(head)
        finally:
            with o.lock:
                o.active -= 1

    def _respond(self, head: bool) -> None:
        o = self.origin
        path = self.path.split("?", 1)[0]
        rng = self.headers.get("Range")
        with o.lock:
            o.requests.append((self.command, self.path, rng))
        # Faults are taken when the request arrives, before any byte of the
        # response is sent (a test may change them as soon as it has a reply).
        status = o._take(o.errors, path)
        cut = corrupt = None
        if status is None and path in o.files and not head:
            cut = o._take(o.cut_after, path)
            corrupt = o._take_corrupt(path)
        if status is not None:
            body = f"injected {status}".encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        data = o.files.get(path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = len(data)
        etag = o.etag(path)
        modified = formatdate(o._mtime, usegmt=True)
        start, end = 0, size  # half-open
        partial = False
        if o.ranges and rng:
            if_range = self.headers.get("If-Range")
            if if_range is None or if_range in (etag, modified):
                parsed = _parse_range(rng, size)
                if parsed is None:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end = parsed
                partial = True
        self.send_response(206 if partial else 200)
        if o.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        if o.send_etag:
            self.send_header("ETag", etag)
        if o.send_last_modified:
            self.send_header("Last-Modified", modified)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if head:
            return
        body = bytearray(data[start:end])
        if body and corrupt:
            body[len(body) // 2] ^= 0xFF
        limit = len(body) if cut is None else min(cut, len(body))
        pos = 0
        while pos < limit:
            if o.delay_s:
                time.sleep(o.delay_s)
            piece = bytes(body[pos:min(pos + BLOCK, limit)])
            # Counted before the write: once written, the client may finish (and
            # the test look at the counter) before this thread runs again.
            with o.lock:
                o.served[path] += len(piece)
            try:
                self.wfile.write(piece)
                self.wfile.flush()
            except OSError:
                with o.lock:
                    o.served[path] -= len(piece)
                return  # the client went away
            pos += len(piece)
        if cut is not None and limit < len(body):
            # Cut the connection mid-body: the client sees a short response.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` -> half-open (start, end), or None."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    if first == "":
        n = int(last)
        if n == 0:
            return None
        return max(0, size - n), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or end <= start:
        return None
    return start, end
