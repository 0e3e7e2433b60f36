"""An S3-compatible server on loopback: moto's server mode behind a counting,
fault-injecting WSGI layer.

moto's ``ThreadedMotoServer`` is ``werkzeug.serving.make_server`` around moto's
``DomainDispatcherApplication``; this builds the same server with one more
layer in front of the app, so boto3 talks the real S3 protocol (SigV4, XML,
ranges, ``If-Match``, checksums) and tests can still ask "how many bytes of
this key did the server send" and make it misbehave. Faults, per object key:

- ``cut_after[key] = [n1, ...]``: the next GETs of ``key`` close the connection
  after that many body bytes;
- ``corrupt[key] = k``: the next k GETs flip one byte of their body;
- ``errors[key] = [503, ...]``: the next requests for ``key`` get an S3 error
  (503 SlowDown, 500 InternalError, 403 AccessDenied);
- ``delay_s``: sleep before each 64 KiB of a GET body.

Keys are counted as ``bucket/key``. Path-style addressing only (there is no
DNS for virtual-host buckets on loopback).
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import unquote

from werkzeug.serving import make_server

BLOCK = 64 * 1024
_ERRORS = {
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


class S3Origin:
    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        self._moto = DomainDispatcherApplication(create_backend_app)
        self.served: Counter[str] = Counter()  # "bucket/key" -> GET body bytes sent
        self.gets: Counter[str] = Counter()  # "bucket/key" -> GET requests
        self.cut_after: dict[str, list[int]] = {}
        self.corrupt: Counter[str] = Counter()
        self.errors: dict[str, list[int]] = {}
        self.delay_s = 0.0
        self.lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> S3Origin:
        from moto.moto_server.werkzeug_app import MotoRequestHandler

        class Quiet(MotoRequestHandler):
            def log_request(self, *a: object, **k: object) -> None:
                pass

        self._server = make_server("127.0.0.1", 0, self, threaded=True, request_handler=Quiet)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def reset_faults(self) -> None:
        with self.lock:
            self.served.clear()
            self.gets.clear()
            self.cut_after.clear()
            self.corrupt.clear()
            self.errors.clear()
            self.delay_s = 0.0

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    # -- the WSGI layer ---------------------------------------------------------------

    def _take(self, table: dict[str, list[int]], key: str) -> int | None:
        with self.lock:
            queue = table.get(key)
            if queue:
                return queue.pop(0)
        return None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        method = environ["REQUEST_METHOD"]
        bucket, _, rest = path.lstrip("/").partition("/")
        key = f"{bucket}/{unquote(rest)}" if rest else None
        is_object = key is not None and method in ("GET", "HEAD") and not query.startswith(
            ("uploads", "tagging", "acl", "attributes"))
        if is_object:
            status = self._take(self.errors, key)  # type: ignore[arg-type]
            if status is not None:
                code, message = _ERRORS.get(status, ("InternalError", "injected"))
                body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{message}</Message></Error>").encode()
                start_response(f"{status} {code}", [("Content-Type", "application/xml"),
                                                    ("Content-Length", str(len(body)))])
                return [body if method == "GET" else b""]
        result = self._moto(environ, start_response)
        if not (is_object and method == "GET"):
            return result
        with self.lock:
            self.gets[key] += 1  # type: ignore[index]
        return self._body(result, key, environ)  # type: ignore[arg-type]

    def _body(self, result: Iterable[bytes], key: str, environ: dict[str, Any]) -> Iterator[bytes]:
        data = bytearray(b"".join(result))
        if hasattr(result, "close"):
            result.close()  # type: ignore[attr-defined]
        with self.lock:
            corrupt = self.corrupt[key] > 0
            if corrupt:
                self.corrupt[key] -= 1
        if corrupt and data:
            data[len(data) // 2] ^= 0xFF
        cut = self._take(self.cut_after, key)
        limit = len(data) if cut is None else min(cut, len(data))
        pos = 0
        while pos < limit:
            if self.delay_s:
                time.sleep(self.delay_s)
            piece = bytes(data[pos:min(pos + BLOCK, limit)])
            # Counted before it is handed over: once written, the client may
            # finish before this generator runs again.
            with self.lock:
                self.served[key] += len(piece)
            yield piece
            pos += len(piece)
        if limit < len(data):
            sock = environ.get("werkzeug.socket")
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            raise ConnectionResetError("s3 origin: injected cut")
