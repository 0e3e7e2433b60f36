"""Errors -> HTTP answers: the status of ``error_codes.py``'s table, and its headers.

The core raises :mod:`cachemesh.errors`; the HTTP adapters (V2 REST, the
control API, OpenAI) answer ``{"error": "..."}`` with the status the table gives
(the one table the gRPC adapter and the command line read too).
"""

from __future__ import annotations

import logging
import math

from ... import errors as e
from ...error_codes import codes_of

log = logging.getLogger("cachemesh.serve")
REALM = "cachemesh"


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
    if not isinstance(exc, e.CachemeshError):
        log.exception("unexpected error", exc_info=exc)
    return codes_of(exc).http, headers


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
