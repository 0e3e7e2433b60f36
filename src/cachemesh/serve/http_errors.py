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

# Most specific first.
STATUS: list[tuple[type[BaseException], int]] = [
    (e.InvalidInputError, 400),  # InferenceInputError, UnknownRuntimeError, UnsafePathError
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
    for cls, code in STATUS:
        if isinstance(exc, cls):
            return code, headers
    if not isinstance(exc, e.CachemeshError):
        log.exception("unexpected error", exc_info=exc)
    return 500, headers


def message_of(exc: BaseException) -> str:
    if isinstance(exc, e.CachemeshError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc}"
