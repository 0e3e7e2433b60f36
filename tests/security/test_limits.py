"""Request limits: body size (declared, chunked, lied about, compressed) and JSON shape.

The shared ``secured`` server has a 4 MiB inference limit and a 64 KiB control
limit. Raw sockets are used where a well-behaved client (httpx) would not send
what an attacker sends.
"""

from __future__ import annotations

import gzip
import json
import resource
import select
import socket
import time
import zlib

import pytest

from cachemesh.config import Settings
from cachemesh.errors import RequestTooLargeError
from cachemesh.serve.adapters.limits import DRAIN_MAX
from cachemesh.serve.core.jsonshape import MAX_JSON_DEPTH, MAX_JSON_ITEMS, check_json
from tests.security.conftest import AS_CONTROL, AS_INFERENCE, INFERENCE_TOKEN

LIMIT = 4 * 1024**2
CONTROL_LIMIT = 64 * 1024
V2 = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}
AUTH = f"Authorization: Bearer {INFERENCE_TOKEN}\r\n".encode()


def connect(secured) -> socket.socket:
    host, port = secured.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=15)
    return s


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def infer_head(length: int | None, extra: bytes = b"") -> bytes:
    framing = (b"Content-Length: %d\r\n" % length if length is not None
               else b"Transfer-Encoding: chunked\r\n")
    return (b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\n" + AUTH
            + b"Content-Type: application/json\r\n" + framing + extra + b"\r\n")


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(secured):
    with connect(secured) as s:
        s.sendall(infer_head(LIMIT + 1))
        started = time.monotonic()
        status, headers, body = read_response(s)  # no byte of the body was sent
        assert status == 413 and time.monotonic() - started < 5
        assert b"limit of 4194304 bytes" in body
        assert headers.get("connection") != "close"
        # The client may still send what it announced; the server discards it and
        # the connection goes on (closing would reset it under the client).
        s.sendall(b" " * (LIMIT + 1))
        payload = json.dumps(V2).encode()
        s.sendall(infer_head(len(payload)) + payload)
        status, _, body = read_response(s)
        assert status == 200, body
    with connect(secured) as s:
        s.sendall(infer_head(DRAIN_MAX + 1))
        status, headers, _ = read_response(s)
        assert status == 413 and headers.get("connection") == "close"


def test_a_chunked_body_is_cut_off_as_it_crosses_the_limit(secured):
    """No length declared: the server counts, and answers 413 after about the limit,
    long before the 64 MiB the client meant to send."""
    with connect(secured) as s:
        s.sendall(infer_head(None))
        chunk = b"%x\r\n%s\r\n" % (65536, b"[" * 65536)
        sent = 0
        while sent < 64 * 1024**2:
            readable, _, _ = select.select([s], [], [], 0)
            if readable:
                break
            s.sendall(chunk)
            sent += 65536
        status, _, body = read_response(s)
    assert status == 413, body
    # Socket buffers on both sides hold several MiB sent before the answer is seen.
    assert LIMIT <= sent < LIMIT + 16 * 1024**2, sent


@pytest.mark.parametrize("path,extra", [
    ("/api/v1/models", b""),  # FastAPI reads the body itself
    ("/v2/repository/models/echo/load", b""),  # a Starlette handler reads it in a try
])
def test_chunked_control_bodies_get_413_not_400_whoever_reads_them(secured, path, extra):
    with connect(secured) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode()
                  + f"Authorization: Bearer {secured_token()}\r\n".encode()
                  + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        body = b'{"parameters": {"x": "' + b"a" * (2 * CONTROL_LIMIT) + b'"}}'
        for i in range(0, len(body), 8192):
            part = body[i:i + 8192]
            s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        s.sendall(b"0\r\n\r\n")
        status, _, answer = read_response(s)
    assert status == 413, answer


def secured_token() -> str:
    from tests.security.conftest import CONTROL_TOKEN

    return CONTROL_TOKEN


def test_control_requests_have_the_smaller_limit(secured):
    c = secured.client
    big = {"name": "big", "source": "/nope", "parameters": {"x": "a" * CONTROL_LIMIT}}
    assert c.post("/api/v1/models", json=big, headers=AS_CONTROL).status_code == 413
    # The same size is fine for inference.
    data = {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                        "data": ["a" * CONTROL_LIMIT]}]}
    assert c.post("/v2/models/echo/infer", json=data, headers=AS_INFERENCE).status_code == 200


def test_a_client_that_declares_less_than_it_sends(secured):
    """The app gets exactly the declared bytes; the rest is not a request."""
    payload = json.dumps(V2).encode()
    with connect(secured) as s:
        s.sendall(infer_head(10) + payload + b"garbage that follows" * 1000)
        status, _, body = read_response(s)
        # The app's answer, or the server's own when it parses the leftovers first
        # (httptools reads them in the same segment and closes).
        assert status == 400 and (b"not valid JSON" in body
                                  or b"Invalid HTTP request" in body), body
        try:
            status, _, _ = read_response(s)  # the leftovers, read as a request
            assert status == 400
        except ConnectionError:
            pass  # or the connection closes: either way, no 5xx
    assert secured.client.get("/v2/health/ready").status_code == 200


def test_a_client_that_declares_more_than_it_sends_and_hangs_up(secured):
    with connect(secured) as s:
        s.sendall(infer_head(1000) + b'{"inputs": ')
        s.shutdown(socket.SHUT_WR)
        time.sleep(0.3)
    ok = secured.client.post("/v2/models/echo/infer", json=V2, headers=AS_INFERENCE)
    assert ok.status_code == 200


@pytest.mark.parametrize("framing", [
    b"Content-Length: abc\r\n", b"Content-Length: -1\r\n", b"Content-Length: 1e3\r\n",
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n", b"Transfer-Encoding: identity\r\n",
])
def test_malformed_framing_is_a_4xx_or_a_closed_connection(secured, framing):
    with connect(secured) as s:
        s.sendall(b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\n" + AUTH + framing
                  + b"\r\n0\r\n\r\n")
        try:
            status, _, _ = read_response(s)
            assert 400 <= status < 500
        except (ConnectionError, TimeoutError, OSError):
            pass
    assert secured.client.get("/v2/health/ready").status_code == 200


def bomb(inflated: int, encoding: str = "gzip") -> bytes:
    """Zeros that inflate to ``inflated`` bytes, compressed piece by piece."""
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    piece = b"\0" * 1024**2
    out = [packer.compress(piece) for _ in range(inflated // len(piece))]
    return b"".join(out) + packer.flush()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_body_is_held_to_the_limit_once_inflated(secured, encoding):
    c = secured.client
    payload = bomb(512 * 1024**2, encoding)
    assert len(payload) < LIMIT  # small on the wire...
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    r = c.post("/v2/models/echo/infer", content=payload, headers={
        **AS_INFERENCE, "Content-Encoding": encoding, "Content-Type": "application/json"})
    assert r.status_code == 413 and "inflates past the limit" in r.json()["error"]
    assert time.monotonic() - started < 5
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    assert grown < 64 * 1024, f"the server grew by {grown} KiB inflating a bomb"
    # Within the limit, a compressed body works.
    small = json.dumps(V2).encode()
    packed = gzip.compress(small) if encoding == "gzip" else zlib.compress(small)
    r = c.post("/v2/models/echo/infer", content=packed, headers={
        **AS_INFERENCE, "Content-Encoding": encoding, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    # Truncated or not compressed at all: 400.
    for broken in (packed[:-4], small):
        r = c.post("/v2/models/echo/infer", content=broken, headers={
            **AS_INFERENCE, "Content-Encoding": encoding})
        assert r.status_code == 400, r.text


# -- JSON shape ------------------------------------------------------------------------

def test_check_json_is_iterative_and_counts():
    check_json({"a": [1, 2, {"b": None}]}, "x")
    deep: dict = {}
    node = deep
    for _ in range(100_000):  # far past the recursion limit: no RecursionError here
        node["a"] = {}
        node = node["a"]
    with pytest.raises(RequestTooLargeError, match="deeper than"):
        check_json(deep, "parameters")
    with pytest.raises(RequestTooLargeError, match="more than"):
        check_json({"a": list(range(MAX_JSON_ITEMS + 1))}, "parameters")
    check_json(json.loads("[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1)), "x")


def test_deep_or_wide_json_is_refused_everywhere(secured):
    c = secured.client
    deep = "[" * 100_000 + "]" * 100_000  # > every parser's own limit
    for path, headers in (("/v2/models/echo/infer", AS_INFERENCE),
                          ("/v2/repository/models/echo/load", AS_CONTROL),
                          ("/api/v1/models", AS_CONTROL)):
        r = c.post(path, content=deep[:CONTROL_LIMIT // 2] + deep[-CONTROL_LIMIT // 2:],
                   headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == 400, (path, r.text)
    # Model parameters: kept, stored and sent to workers, so held to 32 levels and
    # 10,000 values (the parser alone would allow a thousand levels).
    nested = json.loads('{"a":' * 40 + "1" + "}" * 40)
    spec = {"name": "deep", "source": "/nope", "parameters": nested}
    r = c.post("/api/v1/models", json=spec, headers=AS_CONTROL)
    assert r.status_code == 400 and "deeper than 32" in r.json()["error"]
    spec["parameters"] = {"a": [0] * (MAX_JSON_ITEMS + 1)}
    r = c.post("/api/v1/models", json=spec, headers=AS_CONTROL)
    assert r.status_code == 400 and "more than 10000" in r.json()["error"]
    # Inference parameters too; tensor data is not walked (it becomes an array at once).
    body = {**V2, "parameters": nested}
    r = c.post("/v2/models/echo/infer", json=body, headers=AS_INFERENCE)
    assert r.status_code == 413 and "deeper than 32" in r.json()["error"]
    data = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                        "data": json.loads("[" * 40 + "1" + "]" * 40)}]}
    assert c.post("/v2/models/echo/infer", json=data, headers=AS_INFERENCE).status_code == 400
    wide = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [0] * 500_000}]}
    r = c.post("/v2/models/echo/infer", json=wide, headers=AS_INFERENCE)
    assert r.status_code == 400 and "needs 2 values" in r.json()["error"]


def test_limits_are_settings():
    s = Settings.from_env({"CACHEMESH_SERVE_MAX_BODY": "256MiB",
                           "CACHEMESH_SERVE_MAX_CONTROL_BODY": "2MiB",
                           "CACHEMESH_SERVE_SOURCE_ROOTS": "/srv/models:/mnt/nas"})
    assert s.serve.max_body == 256 * 1024**2 and s.serve.max_control_body == 2 * 1024**2
    assert [str(p) for p in s.serve.source_roots] == ["/srv/models", "/mnt/nas"]
    defaults = Settings.from_env({})
    assert defaults.serve.max_body == 64 * 1024**2 and defaults.serve.source_roots == ()
