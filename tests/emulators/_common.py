"""Parts shared by the hub emulators: file contents, a git-like repo model, an
HTTP/1.1 server in a thread (plain or TLS), and a signed-URL blob origin (the CDN).

Everything here is a test double of a real service, written to the protocol the
real clients speak; it keeps state in memory (file contents may live on disk)
and counts every byte it serves, so tests can assert what was fetched.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

COPY_CHUNK = 1024 * 1024
# Files the hubs keep in LFS by default (as .gitattributes of a typical model repo does).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx",
                ".gguf", ".model", ".npz", ".pkl", ".tflite", ".ot", ".zip", ".tar")
LFS_MIN_SIZE = 10 * 1024 * 1024


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Content:
    """The bytes of one file: in memory, or a file on disk (for large benchmark repos)."""

    def __init__(self, source: bytes | Path) -> None:
        self.source = source
        if isinstance(source, bytes):
            self.size = len(source)
            self.sha256 = hashlib.sha256(source).hexdigest()
            self.git_oid = git_blob_id(source)
        else:
            st = os.stat(source)
            self.size = st.st_size
            sha, git = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % st.st_size)
            with open(source, "rb") as f:
                while chunk := f.read(COPY_CHUNK):
                    sha.update(chunk)
                    git.update(chunk)
            self.sha256, self.git_oid = sha.hexdigest(), git.hexdigest()

    @classmethod
    def of(cls, value: bytes | Path | Content) -> Content:
        return value if isinstance(value, Content) else cls(value)

    def read(self, start: int, end: int) -> Iterable[bytes]:
        """Bytes [start, end) in chunks."""
        if isinstance(self.source, bytes):
            for pos in range(start, end, COPY_CHUNK):
                yield self.source[pos:min(end, pos + COPY_CHUNK)]
            return
        with open(self.source, "rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                chunk = f.read(min(COPY_CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk

    def lfs_pointer(self) -> bytes:
        return (b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n"
                % (self.sha256.encode(), self.size))


def default_lfs_rule(path: str, content: Content) -> bool:
    return path.endswith(LFS_SUFFIXES) or content.size >= LFS_MIN_SIZE


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, Content]
    timestamp: float
    changed: frozenset[str]  # paths added or modified by this commit


@dataclass
class Repo:
    """A git-like repository: commits of whole trees, branches and tags."""

    repo_id: str
    repo_type: str = "model"
    default_branch: str = "main"
    private: bool = False
    gated: bool = False
    readers: set[str] = field(default_factory=set)  # tokens that may read it (private/gated)
    lfs_rule: Callable[[str, Content], bool] = default_lfs_rule
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    tag_times: dict[str, float] = field(default_factory=dict)

    def commit(
        self,
        files: Mapping[str, bytes | Path | Content] | None = None,
        *,
        branch: str | None = None,
        delete: Iterable[str] = (),
        message: str = "update",
        replace: bool = False,
    ) -> str:
        """Commit ``files`` on top of the branch head (or replace the whole tree)."""
        branch = branch or self.default_branch
        parent = self.branches.get(branch)
        tree = {} if replace or parent is None else dict(self.commits[parent].files)
        changed = set()
        for path, value in (files or {}).items():
            tree[path] = Content.of(value)
            changed.add(path)
        for path in delete:
            tree.pop(path, None)
        digest = hashlib.sha1(f"{parent}\n{message}\n{time.time_ns()}\n".encode())
        for path in sorted(tree):
            digest.update(f"{path}\0{tree[path].git_oid}\n".encode())
        sha = digest.hexdigest()
        self.commits[sha] = Commit(sha, parent, message, tree, time.time(), frozenset(changed))
        self.branches[branch] = sha
        return sha

    def tag(self, name: str, revision: str | None = None) -> str:
        sha = self.resolve(revision or self.default_branch)
        assert sha is not None, revision
        self.tags[name] = sha
        self.tag_times[name] = time.time()
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if re.fullmatch(r"[0-9a-f]{40}", revision) and revision in self.commits:
            return revision
        return None

    def last_change(self, sha: str, path: str) -> str:
        """The latest commit (at or before ``sha``) that changed ``path``."""
        current: str | None = sha
        while current is not None:
            commit = self.commits[current]
            if path in commit.changed or commit.parent is None:
                return current
            current = commit.parent
        return sha

    def is_lfs(self, path: str, content: Content) -> bool:
        return self.lfs_rule(path, content)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """``Range: bytes=a-b`` -> (start, end exclusive); None without one; "bad" if unsatisfiable."""
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not match or (not match.group(1) and not match.group(2)):
        return None  # multiple or malformed ranges: serve the whole file, as servers may
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    else:
        start, end = max(size - int(last), 0), size
    if start >= size or end <= start:
        return "bad"
    return start, end


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; the emulator object answers via ``self.server.app``."""

    protocol_version = "HTTP/1.1"
    server_version = "emulator/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def handle(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError):
                return  # a client that does not trust the test CA hangs up here
        super().handle()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, ssl.SSLError, TimeoutError):
            self.close_connection = True

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        self.server.app.handle(self, self.command, parts.path, parse_qs(parts.query))  # type: ignore[attr-defined]

    do_GET = do_HEAD = _dispatch

    # -- answers -----------------------------------------------------------------

    def drain(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    def send_body(self, status: int, body: bytes, headers: Mapping[str, str] | None = None,
                  content_type: str = "application/octet-stream") -> None:
        self.drain()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> None:
        self.send_body(status, json.dumps(obj).encode(), headers, "application/json")

    def send_content(
        self,
        content: Content,
        headers: Mapping[str, str],
        *,
        corrupt: bool = False,
        count: Callable[[int], None] | None = None,
        cut: int | None = None,
    ) -> None:
        """Serve a file with Range support; ``corrupt`` flips one byte (the same one each
        time); ``cut`` closes the connection after that many bytes of the body."""
        self.drain()
        rng = parse_range(self.headers.get("Range"), content.size)
        if rng == "bad":
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{content.size}")
            self.send_header("Content-Length", "0")
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            return
        start, end = rng if isinstance(rng, tuple) else (0, content.size)
        self.send_response(206 if isinstance(rng, tuple) else 200)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if isinstance(rng, tuple):
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{content.size}")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        flip_at = content.size // 2 if corrupt else -1
        stop_at = end if cut is None else min(end, start + cut)
        pos = start
        for chunk in content.read(start, end):
            if pos <= flip_at < pos + len(chunk):
                buf = bytearray(chunk)
                buf[flip_at - pos] ^= 0xFF
                chunk = bytes(buf)
            chunk = chunk[:stop_at - pos]
            self.wfile.write(chunk)
            pos += len(chunk)
            if count is not None:
                count(len(chunk))
            if pos >= stop_at:
                break
        if pos < end:
            # Cut mid-body: the client sees a short response on a closed connection.
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], app: Any, tls: ssl.SSLContext | None) -> None:
        super().__init__(address, Handler)
        self.app = app
        self.tls = tls

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away mid-answer is normal (a cancelled or failed download).
        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError, TimeoutError)):
            super().handle_error(request, client_address)

    def get_request(self):  # type: ignore[no-untyped-def]
        sock, addr = super().get_request()
        if self.tls is not None:
            # The handshake happens in the handler's thread (Handler.handle), not here.
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


class ServerThread:
    """A real HTTP(S) server on loopback, serving ``app.handle(...)`` in threads."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0,
                 tls: ssl.SSLContext | None = None) -> None:
        self._server = _Server((host, port), app, tls)
        self.host, self.port = self._server.server_address[:2]
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://{self.host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name=f"emulator-{self.port}",
                                        daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class BlobOrigin:
    """The CDN a hub redirects large files to: ``/<prefix>/<sha256>?Expires=…&Signature=…``.

    URLs are signed (HMAC over path and expiry) and checked, as a CDN does; an
    expired or tampered URL gets 403. Requests are recorded with their headers,
    so a test can check that no credential ever reached it.

    Faults: ``cut_after[sha256] = [n1, n2, ...]``: the next responses for that
    blob close the connection after n1, n2, ... bytes of their body.
    """

    def __init__(self, prefix: str = "repos", *, tls: ssl.SSLContext | None = None,
                 host: str = "127.0.0.1", port: int = 0, external_url: str | None = None,
                 ttl_s: float = 3600.0) -> None:
        self.prefix = prefix.strip("/")
        self.blobs: dict[str, Content] = {}
        self.corrupted: set[str] = set()
        self.served: Counter[str] = Counter()  # sha256 -> bytes served
        self.cut_after: dict[str, list[int]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.ttl_s = ttl_s
        self._secret = os.urandom(16)
        self._lock = threading.Lock()
        self.external_url = external_url.rstrip("/") if external_url else None
        self._server = ServerThread(self, host, port, tls)
        self.url = self._server.url

    def start(self) -> BlobOrigin:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def add(self, content: Content) -> None:
        self.blobs[content.sha256] = content

    def rotate_key(self) -> None:
        """Change the signing key: every URL signed so far is refused (403), as expired."""
        self._secret = os.urandom(16)

    def _path(self, sha: str) -> str:
        if self.external_url is not None:
            return f"/{sha}"
        return f"/{self.prefix}/{sha[:2]}/{sha[2:4]}/{sha}"

    def _sign(self, path: str, expires: int) -> str:
        return hmac.new(self._secret, f"{path}|{expires}".encode(), "sha256").hexdigest()[:40]

    def signed_url(self, sha: str, filename: str) -> str:
        path = self._path(sha)
        expires = int(time.time() + self.ttl_s)
        query = (f"response-content-disposition={quote(f'inline; filename={filename}')}"
                 f"&Expires={expires}&Signature={self._sign(path, expires)}&Key-Pair-Id=EMULATOR")
        base = self.external_url if self.external_url is not None else self.url
        return f"{base}{path}?{query}"

    def export(self, directory: Path) -> None:
        """Write every blob as ``directory/<sha256>`` (for an external origin such as nginx)."""
        directory.mkdir(parents=True, exist_ok=True)
        for sha, content in self.blobs.items():
            target = directory / sha
            if target.exists() and target.stat().st_size == content.size:
                continue
            if isinstance(content.source, Path):
                try:
                    os.link(content.source, target)
                    continue
                except OSError:
                    shutil.copyfile(content.source, target)
                    continue
            target.write_bytes(content.source)

    def handle(self, h: Handler, method: str, path: str, query: dict[str, list[str]]) -> None:
        with self._lock:
            self.requests.append((method, path, {k.lower(): v for k, v in h.headers.items()}))
        sha = path.rsplit("/", 1)[-1]
        content = self.blobs.get(sha)
        if content is None or path != self._path(sha):
            h.send_body(404, b"<Error><Code>NoSuchKey</Code></Error>",
                        content_type="application/xml")
            return
        expires = (query.get("Expires") or ["0"])[0]
        signature = (query.get("Signature") or [""])[0]
        if not expires.isdigit() or int(expires) < time.time() or not hmac.compare_digest(
                signature, self._sign(path, int(expires))):
            h.send_body(403, b"<Error><Code>AccessDenied</Code><Message>Request has expired or"
                             b" the signature does not match</Message></Error>",
                        content_type="application/xml")
            return

        with self._lock:
            cuts = self.cut_after.get(sha)
            cut = cuts.pop(0) if cuts else None

        def count(n: int) -> None:
            with self._lock:
                self.served[sha] += n

        h.send_content(content, {"ETag": f'"{sha}"'}, corrupt=sha in self.corrupted, count=count,
                       cut=cut)


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def unb64(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
