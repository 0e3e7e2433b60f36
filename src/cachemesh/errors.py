"""The one error hierarchy of cachemesh.

Core code raises these; only the protocol adapters (the CLI, the HTTP and gRPC
servers) map them to exit codes and status codes. Errors from libraries (boto,
HTTP clients, sqlite) are translated at the boundary with ``raise ... from``.
Messages name the thing that failed: the cache, the file, the URL, the model.
Credentials never appear in a message.

    CachemeshError
    ├── InvalidInputError          the caller asked for something malformed
    │   ├── UnsafePathError        a name or path would escape the store
    │   ├── UnknownSourceError     a source URI nobody understands
    │   ├── InferenceInputError    a request a model cannot take: shape, datatype, features
    │   ├── UnknownRuntimeError    a runtime name no installed runtime answers to
    │   └── RequestTooLargeError   a body, decompressed body or JSON document over a limit
    ├── UnauthorizedError          no credentials, or credentials nobody issued
    ├── ForbiddenError             valid credentials that do not allow this
    ├── NotFoundError              a cache, model, job or blob does not exist
    │   ├── CacheNotFoundError
    │   ├── JobNotFoundError
    │   └── ModelNotFoundError
    ├── ConflictError              exists already, or is in use
    │   └── InUseError
    ├── CapacityError              a size limit or the disk would be exceeded
    │   └── ModelTooLargeError     a model larger than the whole memory budget
    ├── IntegrityError             bytes do not match their checksum or size
    ├── SourceError                the origin failed or refused
    │   ├── SourceNotFoundError    the origin has no such repo/object/revision
    │   ├── AccessDeniedError      the origin wants credentials we lack
    │   ├── TransientSourceError   a cut connection, a timeout, a 5xx: worth retrying
    │   └── SourceChangedError     the object changed at the origin during a pull
    ├── StoreError                 the store on disk is unusable
    │   └── StoreVersionError      written by a newer cachemesh
    ├── LoadError                  weights could not be read into memory
    │   └── RefetchedError         tensors streamed from an origin came from bytes that failed
    │                              verification and were fetched again
    ├── ConversionError            a converter failed on an input it accepted
    ├── ModelError                 a model (or its worker) failed, not the request
    │   ├── ModelLoadError         a load failed: exception, crash or out of memory
    │   ├── ModelFailedError       a model is marked failed after repeated failed loads
    │   ├── InferenceError         predict raised on a valid request
    │   └── WorkerCrashedError     the worker process died under a request
    ├── UnavailableError           the server cannot take this request now (retry later)
    │   ├── OverloadedError        a bounded queue is full
    │   ├── DrainingError          the server is shutting down
    │   └── RequestTimeoutError    the request waited longer than its deadline
    └── ClusterError               cluster mode: etcd, leases, node records
        ├── ClusterUnavailableError    etcd cannot be reached (also an UnavailableError)
        ├── RevisionConflictError      a compare-and-put lost: the key moved (also a ConflictError)
        ├── NodeNameTakenError         a live node holds this name or store (also a ConflictError)
        ├── ForwardError               a forwarded request got no answer (also an UnavailableError)
        │   ├── NodeUnreachableError       the node never took it: sent to another copy
        │   └── NodeLostError              the node died while it held it: not replayed
        ├── LeaseLostError             a lease expired or was revoked; its keys are gone
        └── HistoryLostError           a watch cannot resume: history compacted, or etcd replaced
"""

from __future__ import annotations


class CachemeshError(Exception):
    """Base class of every error cachemesh raises on purpose."""


class InvalidInputError(CachemeshError, ValueError):
    """The caller asked for something malformed: a bad name, size or option."""


class UnsafePathError(InvalidInputError):
    """A name, bucket or path that would lead outside the store or the source."""


class UnknownSourceError(InvalidInputError):
    """A source URI with a scheme no source handles."""


class RequestTooLargeError(InvalidInputError):
    """A request over a configured limit: its body, its body once decompressed, or the
    nesting or size of a JSON document in it. ``limit`` is the limit, in its unit."""

    def __init__(self, message: str, limit: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit


class UnauthorizedError(CachemeshError):
    """The caller sent no credentials, or credentials that match none issued.

    ``invalid`` tells the two apart (a client retries with a token in one case and
    should fetch a new one in the other). The message never holds the credential.
    """

    def __init__(self, message: str, *, invalid: bool = False) -> None:
        super().__init__(message)
        self.invalid = invalid


class ForbiddenError(CachemeshError):
    """Valid credentials that do not allow this: a token of another scope, or a write
    into a protected bucket without that bucket's token. ``scope`` names what is missing."""

    def __init__(self, message: str, scope: str | None = None) -> None:
        super().__init__(message)
        self.scope = scope


class NotFoundError(CachemeshError, LookupError):
    """A cache, model, job or blob that does not exist."""


class CacheNotFoundError(NotFoundError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no cache named {name!r}")
        self.name = name


class JobNotFoundError(NotFoundError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class ConflictError(CachemeshError):
    """The thing exists already with other settings, or is busy."""


class InUseError(ConflictError):
    """A cache held open by a running process cannot be removed or evicted."""


class CapacityError(CachemeshError):
    """A size limit (the cache's, the store's or the disk's) would be exceeded."""


class IntegrityError(CachemeshError):
    """Bytes that do not match the size or checksum they were promised to have;
    ``sha256``: the blob whose bytes they are, when a cached file is at fault."""

    def __init__(self, message: str, *, sha256: str | None = None) -> None:
        super().__init__(message)
        self.sha256 = sha256


class SourceError(CachemeshError):
    """The origin failed or refused."""


class SourceNotFoundError(SourceError, NotFoundError):
    """The origin has no such repository, object, path or revision."""


class AccessDeniedError(SourceError):
    """The origin refused: private, gated, or missing credentials."""


class TransientSourceError(SourceError):
    """A failure worth retrying: a cut connection, a timeout, a 5xx, a throttle.

    The fetcher retries these with backoff (and resumes where the bytes
    stopped); ``retry_after`` is the origin's own hint in seconds, if it gave one.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SourceChangedError(SourceError):
    """The object changed at the origin while it was being fetched (new ETag).

    The bytes fetched so far belong to the old version and are discarded;
    pulling again lists the new version.
    """


class StoreError(CachemeshError):
    """The store on disk is unusable."""


class StoreVersionError(StoreError):
    """The store's database was written by a newer cachemesh."""


class LoadError(CachemeshError):
    """Weights could not be read into memory: truncated file, bad header, missing shard."""


class RefetchedError(LoadError):
    """Tensors were streamed from an origin's bytes while it was pulled (``iter_tensors``),
    and the fetcher then fetched that file again because its bytes failed verification:
    the tensors already yielded may be wrong. The cache holds the verified bytes now."""


class ConversionError(CachemeshError):
    """A converter (CTranslate2, the ONNX exporter, the tensor-parallel splitter)
    failed on an input it had accepted. The job's log holds the details."""


class InferenceInputError(InvalidInputError):
    """A request a model cannot take: a bad shape, datatype, a missing input, or
    what only the runtime detects (for example a wrong number of features)."""


class UnknownRuntimeError(InvalidInputError):
    """A runtime name that no built-in runtime or installed plugin answers to."""


class ModelNotFoundError(NotFoundError):
    def __init__(self, name: str, version: str | None = None) -> None:
        what = f"{name!r} version {version!r}" if version else repr(name)
        super().__init__(f"no model named {what}")
        self.name = name
        self.version = version


class ModelTooLargeError(CapacityError):
    """A model predicted or measured to be larger than the server's whole memory budget."""


class ModelError(CachemeshError):
    """A model or the worker that holds it failed; the request itself was fine."""


class ModelLoadError(ModelError):
    """One load of a model failed: it raised, its worker crashed, or it ran out of memory.
    ``corrupt_blob``: a cached file's blob whose bytes changed since it was committed
    (``load/integrity.py``); every worker would read the same bytes."""

    def __init__(self, message: str, *, corrupt_blob: str | None = None) -> None:
        super().__init__(message)
        self.corrupt_blob = corrupt_blob


class ModelFailedError(ModelError):
    """A model marked failed after repeated failed loads, until the mark expires."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InferenceError(ModelError):
    """The model raised while predicting on a request that was valid."""


class WorkerCrashedError(ModelError):
    """The worker process died while it held the request; the request is not replayed."""


class UnavailableError(CachemeshError):
    """The server cannot take the request now; ``retry_after`` says when to try again."""

    def __init__(self, message: str, retry_after: float | None = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OverloadedError(UnavailableError):
    """A bounded queue (requests in flight, loads waiting) is full."""


class DrainingError(UnavailableError):
    """The server is draining before it exits and takes no new requests."""


class RequestTimeoutError(UnavailableError):
    """The request waited for a load, a slot or its model longer than its deadline."""



class ClusterError(CachemeshError):
    """Cluster mode failed: etcd, a lease, a node record."""


class ClusterUnavailableError(ClusterError, UnavailableError):
    """etcd cannot be reached, or has no leader. The node keeps serving what it has
    and retries by itself; declarations wait until etcd is back."""


class RevisionConflictError(ClusterError, ConflictError):
    """A compare-and-put lost: ``key`` was not at ``expected`` (0: absent) but at
    ``actual`` (0: absent) when the write arrived. Read again, then decide."""

    def __init__(self, key: str, expected: int, actual: int) -> None:
        want = "absent" if expected == 0 else f"at revision {expected}"
        have = "absent" if actual == 0 else f"at revision {actual}"
        super().__init__(f"{key}: expected {want}, found {have}")
        self.key = key
        self.expected = expected
        self.actual = actual


class ForwardError(ClusterError, UnavailableError):
    """A request forwarded to another node of the cluster got no answer from it."""

    def __init__(self, message: str, node: str, retry_after: float | None = 1.0) -> None:
        super().__init__(message, retry_after)
        self.node = node


class NodeUnreachableError(ForwardError):
    """The node never took the request (connection refused, the node gone before it
    accepted): the one case a forwarded request is sent to another copy."""


class NodeLostError(ForwardError):
    """The node died, or the connection broke, while it held the request: it may have
    run, so it is not replayed (the same rule as for a worker, WorkerCrashedError)."""


class NodeNameTakenError(ClusterError, ConflictError):
    """Another live node holds this node name (or this store), so this one refuses to join."""


class LeaseLostError(ClusterError):
    """A lease expired or was revoked (or etcd lost it with its data); the keys bound
    to it are gone and must be written again under a new lease."""


class HistoryLostError(ClusterError):
    """A watch cannot resume where it stopped: etcd compacted that history, or it is
    another etcd than before (its data lost). Read the prefix again from ``revision``."""

    def __init__(self, message: str, revision: int = 0) -> None:
        super().__init__(message)
        self.revision = revision
