"""What each error of ``cachemesh.errors`` looks like from outside, as the code answers today.

One row per scenario a user can cause: the error class the core raises for it,
the HTTP status (KServe V2 REST, the control API, the OpenAI API: one mapping),
the gRPC status code, and the exit code of the command line. ``None`` where that
surface cannot reach the scenario. test_error_table.py provokes the rows of the
shared server and of the command line, test_error_limits.py those that need a
server with tight limits; each checks every surface its rows name.

Errors that no request or command can cause from outside are listed in
:data:`NOT_PROVOKED`, each with the reason, so that the table plus that list
covers the whole hierarchy (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

from cachemesh import errors as e


@dataclass(frozen=True)
class Row:
    error: type[e.CachemeshError]
    http: int | None  # status of the REST adapter, the control API and the OpenAI API
    grpc: str | None  # grpc.StatusCode name
    exit: int | None  # `cachemesh` exit code


TABLE: dict[str, Row] = {
    # The request is malformed.
    "malformed-request": Row(e.InvalidInputError, 400, "INVALID_ARGUMENT", 2),
    "unsafe-path": Row(e.UnsafePathError, 400, "INVALID_ARGUMENT", 2),
    "unknown-scheme": Row(e.UnknownSourceError, 400, "INVALID_ARGUMENT", 2),
    "input-refused": Row(e.InferenceInputError, 400, "INVALID_ARGUMENT", None),
    "unknown-runtime": Row(e.UnknownRuntimeError, 400, "INVALID_ARGUMENT", None),
    "body-too-large": Row(e.RequestTooLargeError, 413, "RESOURCE_EXHAUSTED", 2),
    "json-too-deep": Row(e.RequestTooLargeError, 413, None, None),
    # Credentials.
    "no-token": Row(e.UnauthorizedError, 401, "UNAUTHENTICATED", 6),
    "unknown-token": Row(e.UnauthorizedError, 401, "UNAUTHENTICATED", 6),
    "token-of-other-scope": Row(e.ForbiddenError, 403, "PERMISSION_DENIED", 6),
    "protected-bucket": Row(e.ForbiddenError, 403, None, 6),
    # Missing things.
    "unknown-model": Row(e.ModelNotFoundError, 404, "NOT_FOUND", 3),
    "unknown-cache": Row(e.CacheNotFoundError, 404, None, 3),
    "unknown-job": Row(e.JobNotFoundError, None, None, 3),
    "origin-has-no-such-file": Row(e.SourceNotFoundError, 404, "NOT_FOUND", 3),
    # Taken or busy.
    "name-taken": Row(e.ConflictError, 409, None, 4),
    "unload-with-requests-in-flight": Row(e.ConflictError, 409, "FAILED_PRECONDITION", None),
    "cache-in-use": Row(e.InUseError, 409, None, 4),
    # Limits.
    "cache-size-limit": Row(e.CapacityError, None, None, 5),
    "model-over-budget": Row(e.ModelTooLargeError, 507, "RESOURCE_EXHAUSTED", 5),
    # Bytes and origins.
    "checksum-mismatch": Row(e.IntegrityError, 500, "INTERNAL", 1),
    "origin-refuses": Row(e.AccessDeniedError, 502, "UNAVAILABLE", 6),
    "origin-fails": Row(e.TransientSourceError, 502, "UNAVAILABLE", 1),
    "store-unusable": Row(e.StoreError, None, None, 1),
    "store-from-the-future": Row(e.StoreVersionError, None, None, 1),
    "converter-fails": Row(e.ConversionError, None, None, 1),
    # The model or its worker.
    "load-raises": Row(e.ModelLoadError, 500, "INTERNAL", 1),
    "model-marked-failed": Row(e.ModelFailedError, 503, "UNAVAILABLE", None),
    "predict-raises": Row(e.InferenceError, 500, "INTERNAL", None),
    "worker-dies": Row(e.WorkerCrashedError, 500, "INTERNAL", None),
    # The server cannot take it now.
    "load-queue-full": Row(e.UnavailableError, 503, "UNAVAILABLE", None),
    "too-many-in-flight": Row(e.OverloadedError, 429, "RESOURCE_EXHAUSTED", None),
    "draining": Row(e.DrainingError, 503, "UNAVAILABLE", None),
    "request-deadline": Row(e.RequestTimeoutError, 504, "DEADLINE_EXCEEDED", None),
    "server-unreachable": Row(e.CachemeshError, None, None, 1),
}

# Classes no row raises, and why they cannot be caused from outside.
NOT_PROVOKED: dict[type[e.CachemeshError], str] = {
    e.NotFoundError: "only its subclasses are raised",
    e.SourceError: "only its subclasses are raised",
    e.ModelError: "only its subclasses are raised",
    e.LoadError: "raised by the Python loader (cachemesh.load_state_dict) and inside a worker,"
                 " where a failed load reaches users as ModelLoadError (row load-raises)",
    e.RefetchedError: "needs an origin whose bytes fail verification while iter_tensors"
                      " streams them (Python API only)",
    e.SourceChangedError: "needs an object that changes at the origin during a pull; not"
                          " reproducible from outside without a race",
    # The cluster's errors need a real etcd: tests/cluster provokes them against one
    # (a node name taken: exit 4; etcd stopped: declarations 503; If-Match: 409).
    **{cls: "needs a real etcd: provoked by tests/cluster (issue 17)" for cls in (
        e.ClusterError, e.ClusterUnavailableError, e.NodeNameTakenError, e.LeaseLostError,
        e.RevisionConflictError, e.HistoryLostError)},
    # Forwarding between nodes needs several nodes: tests/cluster/test_failover.py kills
    # the node holding a request (NodeLostError: 503, not replayed) and one that refuses
    # connections (NodeUnreachableError: sent to another copy, never seen by a client).
    **{cls: "needs several cluster nodes: provoked by tests/cluster/test_failover.py" for cls
       in (e.ForwardError, e.NodeUnreachableError, e.NodeLostError)},
}
