"""Request limits: body size as it streams in, tensor shapes, and parsing memory.

Body size (:class:`BodyLimit`, ASGI middleware on the root app). A body larger
than its limit gets 413:

- a declared ``Content-Length`` over the limit is refused before a byte of the
  body is read, and the app never runs;
- a chunked body (no length declared) is counted as it arrives; the message that
  crosses the limit answers 413 at once, and the app, still reading, gets a
  :class:`~cachemesh.errors.RequestTooLargeError` from ``receive()`` (whatever it
  answers after that is dropped);
- a declared length within the limit is passed through untouched: the HTTP
  server (h11 or httptools under uvicorn) never delivers more body than the
  declared length, so the inference hot path pays no per-message wrapper.

After an early answer (413 here, 401/403 in ``auth.py``) uvicorn discards the
rest of the body as it arrives and keeps the connection, so a client that is
still sending gets to read the answer; closing at once would reset the
connection under it and lose the answer. A body announced larger than
:data:`DRAIN_MAX` is not worth discarding: that answer says ``Connection:
close``. (Found by the fuzzer: clients saw "connection reset" instead of 413.)

Control requests (``/api/...`` and everything else of class control, see
``serve/adapters/auth.py``) have a smaller limit than inference. A compressed body is
held to the same limit once inflated (``v2_rest.py``), so a small gzip bomb
does not become gigabytes.

The shape of JSON values kept or passed on (how deep, how many values) is
``jsonshape.py``'s.

Tensor shapes (``v2_codec.check_shape``, for every request form and gRPC), before
anything is reshaped: non-negative integers, at most :data:`MAX_TENSOR_DIMS`
dimensions, and at most as many elements as the body limit has bytes (every
element takes at least a byte on the wire), a zero dimension counted as one:
an empty tensor named ``[2**62, 2**62, 0]`` was a 500 from numpy.

Parsing memory (:class:`ParseBudget`). A body's size does not bound what parsing
it costs: orjson made about 2 GB of Python lists of a 62 MiB body of
``[[0],[0],...]``. Large inference bodies are parsed in a thread, off the event
loop, and each holds a share of one budget while it is parsed: an estimate of
what its parse will use (``v2_codec.parse_cost``). A body whose estimate is over
the whole budget gets 413; one that does not fit beside those being parsed gets
503 with Retry-After.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ...errors import InferenceInputError, RequestTooLargeError, UnavailableError

MAX_TENSOR_DIMS = 32
# The elements of one tensor when the caller does not pass its body limit (the default one).
MAX_TENSOR_ELEMENTS = 64 * 1024**2
# Past this announced length an early answer closes the connection (see above).
DRAIN_MAX = 64 * 1024**2


def close_after_early_answer(headers: Any) -> bool:
    """Whether an answer sent before the body was read should close the connection."""
    for key, value in headers:
        if key == b"content-length":
            return not value.isdigit() or int(value) > DRAIN_MAX
    return False


class ParseBudget:
    """Bytes of memory that request bodies being parsed may use at once. Taken without
    waiting: a request that does not fit now is told to come back (503)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()  # parses run in threads

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        if nbytes > self.limit:
            raise RequestTooLargeError(
                f"parsing this body would take about {_mib(nbytes)} of memory, over the"
                f" {_mib(self.limit)} that parsing may use (CACHEMESH_SERVE_PARSE_MEMORY);"
                " send large tensors flat and numeric, or in the binary extension",
                self.limit)
        with self._lock:
            if self.used + nbytes > self.limit:
                raise UnavailableError(
                    f"the server is parsing other large requests ({_mib(self.used)} of"
                    f" {_mib(self.limit)}); try again", retry_after=1.0)
            self.used += nbytes
        try:
            yield
        finally:
            with self._lock:
                self.used -= nbytes


def _mib(n: int) -> str:
    return f"{n / 1024**2:.0f} MiB"


def whole(value: Any) -> int | None:
    """``value`` as a non-negative integer: an int, an integral float (``256.0``) or a
    string of digits (protobuf's JSON writes 64-bit integers as strings); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        n = int(value)
    else:
        return None
    return n if n >= 0 else None


def check_shape(value: Any, where: str, max_elements: int = MAX_TENSOR_ELEMENTS
                ) -> tuple[int, ...]:
    """A shape of non-negative integers, at most :data:`MAX_TENSOR_DIMS` of them, whose
    elements (a zero dimension counted as one, so that an empty tensor cannot name
    dimensions nothing could hold) number at most ``max_elements``: checked before
    anything is reshaped. Byte size is then bounded too (8 bytes an element at most)."""
    if not isinstance(value, list | tuple):
        raise InferenceInputError(f"{where}: shape must be a list of integers")
    if len(value) > MAX_TENSOR_DIMS:
        raise InferenceInputError(f"{where}: a shape of {len(value)} dimensions has more"
                                  f" than {MAX_TENSOR_DIMS} dimensions")
    shape = []
    extent = 1
    for d in value:
        n = whole(d)
        if n is None:
            raise InferenceInputError(
                f"{where}: shape {list(value)!r}: {d!r} is not a non-negative integer")
        shape.append(n)
        extent *= max(n, 1)
        if extent > max_elements:
            raise InferenceInputError(
                f"{where}: shape {list(value)!r} declares more elements than the limit of"
                f" {max_elements} (the body limit's bytes)")
    return tuple(shape)


# Memory that parsing takes, measured with tracemalloc on 2M-value bodies (issue 22):
# the numeric path (json_tensors) 3.5 bytes a body byte for [[0],[0],...] as FP32 (8-byte
# types: about 5), 1.0 for flat floats; orjson and numpy 115-280 bytes a value (nested
# lists, strings, floats).
NUMERIC_COST = 8
VALUE_COST = 256
_SMALL = 64 * 1024  # bodies below this are not worth counting


def parse_cost(text: bytes) -> int:
    """What parsing ``text`` with orjson (and numpy after it) may take, at most."""
    if len(text) < _SMALL:
        return 0
    return len(text) + VALUE_COST * (text.count(b",") + 1)


def held(budget: ParseBudget | None, nbytes: int) -> contextlib.AbstractContextManager:
    return budget.hold(nbytes) if budget is not None and nbytes else contextlib.nullcontext()


def _reply(status: int, message: bytes, close: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    body = b'{"error":"' + message + b'"}'
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for a body over its limit, declared or chunked. ``limit_of(scope)`` gives
    the limit of one request in bytes."""

    def __init__(self, app: Any, limit_of: Any) -> None:
        self.app = app
        self.limit_of = limit_of

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit: int = self.limit_of(scope)
        declared = None
        chunked = False
        for key, value in scope["headers"]:
            if key == b"content-length":
                declared = value
            elif key == b"transfer-encoding":
                chunked = True
        if declared is not None and not chunked:
            if not declared.isdigit():
                for message in _reply(400, b"Content-Length is not a number", True):
                    await send(message)
                return
            if int(declared) > limit:
                for message in _reply(413, b"the request body is over the limit of %d bytes"
                                      % limit, int(declared) > DRAIN_MAX):
                    await send(message)
                return
            await self.app(scope, receive, send)  # the server delivers no more than declared
            return
        await self._counted(scope, receive, send, limit)

    async def _counted(self, scope: Any, receive: Any, send: Any, limit: int) -> None:
        received = 0
        started = answered = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal received, answered
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not started and not answered:
                        answered = True
                        for reply in _reply(413, b"the request body is over the limit of %d"
                                            b" bytes" % limit, False):
                            await send(reply)
                    raise RequestTooLargeError(
                        f"the request body is over the limit of {limit} bytes", limit)
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if answered:
                return  # the 413 went out already
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except RequestTooLargeError:
            if not answered:
                raise  # a response had started before the body ran over: cut the connection
