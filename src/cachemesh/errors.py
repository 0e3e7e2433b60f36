"""The one error hierarchy of cachemesh.

Core code raises these; only the protocol adapters (the CLI, the HTTP and gRPC
servers) map them to exit codes and status codes. Errors from libraries (boto,
HTTP clients, sqlite) are translated at the boundary with ``raise ... from``.
Messages name the thing that failed: the cache, the file, the URL, the model.
Credentials never appear in a message.

    CachemeshError
    ├── InvalidInputError          the caller asked for something malformed
    │   ├── UnsafePathError        a name or path would escape the store
    │   └── UnknownSourceError     a source URI nobody understands
    ├── NotFoundError              a cache, model, job or blob does not exist
    │   ├── CacheNotFoundError
    │   └── JobNotFoundError
    ├── ConflictError              exists already, or is in use
    │   └── InUseError
    ├── CapacityError              a size limit or the disk would be exceeded
    ├── IntegrityError             bytes do not match their checksum or size
    ├── SourceError                the origin failed or refused
    │   ├── SourceNotFoundError    the origin has no such repo/object/revision
    │   ├── AccessDeniedError      the origin wants credentials we lack
    │   ├── TransientSourceError   a cut connection, a timeout, a 5xx: worth retrying
    │   └── SourceChangedError     the object changed at the origin during a pull
    ├── StoreError                 the store on disk is unusable
    │   └── StoreVersionError      written by a newer cachemesh
    ├── LoadError                  weights could not be read into memory
    └── ConversionError            a converter failed on an input it accepted
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
    """Bytes that do not match the size or checksum they were promised to have."""


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


class ConversionError(CachemeshError):
    """A converter (CTranslate2, the ONNX exporter, the tensor-parallel splitter)
    failed on an input it had accepted. The job's log holds the details."""
