"""Errors -> HTTP status, gRPC status code and ``cachemesh`` exit code: the one table.

The core raises :mod:`cachemesh.errors` and knows no status codes; the adapters
answer with the row of the first class below that the error is an instance of
(most specific first), or with :data:`OTHER`. Who reads it: the HTTP adapters
through ``serve/adapters/http_errors.py`` (KServe V2 REST, the control API, the OpenAI
API), the gRPC adapter (``serve/adapters/v2_grpc.py``), and the command line (``cli/``).
The gRPC code is kept as its name, which the gRPC adapter resolves to
``grpc.StatusCode``: the command line reads this table without importing grpc.

What the request got wrong is a 4xx; a fault of the model, the origin or the
server is a 5xx; there is no catch-all that turns every error into 400. The exit
codes: 2 bad input, 3 not found, 4 conflict or in use, 5 capacity, 6 access denied
(by an origin, or by the server's tokens), 1 anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import errors as e


@dataclass(frozen=True)
class Codes:
    """How one kind of error looks from outside."""

    http: int
    grpc: str  # a grpc.StatusCode name
    exit: int


TABLE: tuple[tuple[type[BaseException], Codes], ...] = (
    (e.RequestTooLargeError, Codes(413, "RESOURCE_EXHAUSTED", 2)),
    # InferenceInputError, UnknownRuntimeError, UnsafePathError, UnknownSourceError
    (e.InvalidInputError, Codes(400, "INVALID_ARGUMENT", 2)),
    (e.UnauthorizedError, Codes(401, "UNAUTHENTICATED", 6)),
    (e.ForbiddenError, Codes(403, "PERMISSION_DENIED", 6)),
    # The origin refused us: the server's fault to a client (502), the user's to fix.
    (e.AccessDeniedError, Codes(502, "UNAVAILABLE", 6)),
    (e.NotFoundError, Codes(404, "NOT_FOUND", 3)),  # SourceNotFoundError too
    (e.ConflictError, Codes(409, "FAILED_PRECONDITION", 4)),  # in use, taken with another spec
    (e.OverloadedError, Codes(429, "RESOURCE_EXHAUSTED", 1)),
    (e.RequestTimeoutError, Codes(504, "DEADLINE_EXCEEDED", 1)),
    # etcd unreachable in cluster mode: declarations wait, serving goes on.
    (e.ClusterUnavailableError, Codes(503, "UNAVAILABLE", 1)),
    (e.UnavailableError, Codes(503, "UNAVAILABLE", 1)),  # draining, load queue full
    (e.ModelFailedError, Codes(503, "UNAVAILABLE", 1)),
    (e.CapacityError, Codes(507, "RESOURCE_EXHAUSTED", 5)),  # ModelTooLargeError too
    (e.SourceError, Codes(502, "UNAVAILABLE", 1)),
    (e.ModelError, Codes(500, "INTERNAL", 1)),  # the model raised or its worker crashed
)
#: Every other error, ours or not.
OTHER = Codes(500, "INTERNAL", 1)


def codes_of(exc: BaseException) -> Codes:
    for cls, codes in TABLE:
        if isinstance(exc, cls):
            return codes
    return OTHER
