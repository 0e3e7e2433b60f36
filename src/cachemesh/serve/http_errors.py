"""Errors -> HTTP status codes: the one place where that mapping lives.

The core raises :mod:`cachemesh.errors`; the HTTP adapters (V2 REST, the
control API, later OpenAI) answer ``{"error": "..."}`` with the status below.
What the request got wrong is a 4xx; a fault of the model or the server is a
5xx; there is no catch-all that turns every error into 400.
"""

from __future__ import annotations

import logging
import math

from .. import errors as e

log = logging.getLogger("cachemesh.serve")
REALM = "cachemesh"

# Most specific first.
STATUS: list[tuple[type[BaseException], int]] = [
    (e.RequestTooLargeError, 413),
    (e.InvalidInputError, 400),  # InferenceInputError, UnknownRuntimeError, UnsafePathError
    (e.UnauthorizedError, 401),
    (e.ForbiddenError, 403),
    (e.NotFoundError, 404),
    (e.ConflictError, 409),
    (e.OverloadedError, 429),
    (e.RequestTimeoutError, 504),
    (e.UnavailableError, 503),  # draining, load queue full
    (e.ModelFailedError, 503),
    (e.ModelTooLargeError, 507),
    (e.CapacityError, 507),
    (e.SourceError, 502),
    (e.ModelError, 500),
]


def status_of(exc: BaseException) -> tuple[int, dict[str, str]]:
    """The status code and extra headers (Retry-After) for an error."""
    headers: dict[str, str] = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    # RFC 6750: the challenge says what was wrong, never what was sent.
    if isinstance(exc, e.UnauthorizedError):
        headers["WWW-Authenticate"] = (f'Bearer realm="{REALM}", error="invalid_token"'
                                       if exc.invalid else f'Bearer realm="{REALM}"')
    elif isinstance(exc, e.ForbiddenError) and exc.scope:
        headers["WWW-Authenticate"] = (f'Bearer realm="{REALM}", error="insufficient_scope",'
                                       f' scope="{exc.scope}"')
    for cls, code in STATUS:
        if isinstance(exc, cls):
            return code, headers
    if not isinstance(exc, e.CachemeshError):
        log.exception("unexpected error", exc_info=exc)
    return 500, headers


def message_of(exc: BaseException) -> str:
    if isinstance(exc, e.CachemeshError):
        return encodable(str(exc))
    return encodable(f"internal error: {type(exc).__name__}: {exc}")


def encodable(text: str) -> str:
    """``text`` as valid UTF-8: a message that quotes a client's input can hold a lone
    surrogate (JSON allows ``"\\ud800"``), which no JSON encoder writes; it became a
    500 (found by the fuzzer)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
