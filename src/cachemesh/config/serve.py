"""Settings of ``cachemesh serve`` (CACHEMESH_SERVE_*)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidInputError
from .values import _bool, _float, _int, _path, _port, _size


@dataclass(frozen=True)
class ServeSettings:
    """Settings of ``cachemesh serve``. The command's flags override the variables."""

    # CACHEMESH_SERVE_HOST: address to listen on; 0.0.0.0 in a container.
    host: str = "127.0.0.1"
    # CACHEMESH_SERVE_PORT: the one HTTP port (KServe V2, control API, /metrics).
    port: int = 8008
    # CACHEMESH_SERVE_GRPC_PORT: KServe V2 over gRPC, on the same host; 0 turns it off.
    grpc_port: int = 8033
    # CACHEMESH_SERVE_WORKERS: worker processes that hold the models (None: one per two cores).
    workers: int | None = None
    # CACHEMESH_SERVE_MEMORY: budget for everything the workers hold ("8GiB"). None: the
    # container's memory limit (cgroup) or the physical memory, less a buffer.
    memory: int | None = None
    # CACHEMESH_SERVE_MEMORY_FACTOR: predicted size of a model before it loads = bytes on disk x this.
    memory_factor: float = 1.5
    # CACHEMESH_SERVE_WORKER_MEMORY_LIMIT: per-worker address-space limit (RLIMIT_AS); None: none.
    worker_memory_limit: int | None = None
    # CACHEMESH_SERVE_WORKER_THREADS: BLAS/OpenMP threads per worker (several workers share the cores).
    worker_threads: int = 1
    # CACHEMESH_SERVE_LOAD_CONCURRENCY: model loads running at once.
    load_concurrency: int = 2
    # CACHEMESH_SERVE_LOAD_QUEUE: loads that may wait; more answer 503 with Retry-After.
    load_queue: int = 256
    # CACHEMESH_SERVE_LOAD_ATTEMPTS: failed loads before a model is marked failed.
    load_attempts: int = 3
    # CACHEMESH_SERVE_FAILED_TTL: seconds a failed mark lasts; then the next request tries again.
    failed_ttl_s: float = 60.0
    # CACHEMESH_SERVE_MAX_INFLIGHT: requests in the server at once; more answer 429.
    max_inflight: int = 1024
    # CACHEMESH_SERVE_VERIFY_LOADS: hash every file of a model as it loads (load/integrity.py).
    # Off: only files whose size or modification time betray a change are hashed.
    verify_loads: bool = False
    # CACHEMESH_SERVE_PARSE_MEMORY: memory that inference bodies being parsed may use at
    # once (estimated per body); past it 503 + Retry-After, 413 for a body over all of it.
    # None: 8 x max_body (one largest numeric body parses; the attack of issue 22 is one).
    parse_memory: int | None = None
    # CACHEMESH_SERVE_REQUEST_TIMEOUT: seconds a request may take, waiting for its load included.
    request_timeout_s: float = 60.0
    # CACHEMESH_SERVE_DRAIN_TIMEOUT: seconds SIGTERM waits for requests in flight.
    drain_timeout_s: float = 30.0
    # CACHEMESH_SERVE_MIN_RESIDENT: a model loaded this recently is not evicted (loads wait).
    min_resident_s: float = 0.0
    # CACHEMESH_SERVE_COPY_RATE: requests/s per copy above which a model gets another copy,
    # on another worker, in free memory only (0: one copy each). A model's document may override
    # it and the two below ("scaling"); see docs/mesh.md.
    copy_rate: float = 50.0
    # CACHEMESH_SERVE_MAX_COPIES: copies of one model at most (None: one per worker).
    max_copies: int | None = None
    # CACHEMESH_SERVE_COPY_COOLDOWN: seconds the rate must stay low before an extra copy goes.
    copy_cooldown_s: float = 60.0
    # CACHEMESH_URL: the server that `cachemesh models ...` talks to.
    url: str = "http://127.0.0.1:8008"
    # CACHEMESH_SERVE_MAX_BODY: largest request body (inference), counted as it streams in
    # and again once decompressed; more answers 413. Raise it for large binary tensors.
    # Also the largest gRPC message the server takes (RESOURCE_EXHAUSTED past it).
    max_body: int = 64 * 1024**2
    # CACHEMESH_SERVE_MAX_CONTROL_BODY: largest body of a control request (/api/...).
    max_control_body: int = 1024**2
    # CACHEMESH_SERVE_SOURCE_ROOTS: directories (':'-separated) that a local or NAS path
    # given over the API (models, datacaches, the repository extension) must lie in,
    # symlinks resolved. Empty (the default): no local path over the API, only the store's
    # own views and hub/. Models given on the command line or in --config are not
    # checked: the operator wrote them.
    source_roots: tuple[Path, ...] = ()
    # CACHEMESH_SERVE_TLS_CERT and CACHEMESH_SERVE_TLS_KEY: PEM certificate (chain) and key:
    # the HTTP port speaks HTTPS (a cluster node whose advertise URL is https). Both or neither.
    tls_cert: Path | None = None
    tls_key: Path | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ServeSettings:
        workers = env.get("CACHEMESH_SERVE_WORKERS")
        tls_cert, tls_key = _path(env, "CACHEMESH_SERVE_TLS_CERT"), _path(env, "CACHEMESH_SERVE_TLS_KEY")
        if (tls_cert is None) != (tls_key is None):
            raise InvalidInputError("CACHEMESH_SERVE_TLS_CERT and CACHEMESH_SERVE_TLS_KEY go"
                                    " together: give both or neither")
        return cls(
            tls_cert=tls_cert, tls_key=tls_key,
            host=env.get("CACHEMESH_SERVE_HOST") or "127.0.0.1",
            port=_int(env, "CACHEMESH_SERVE_PORT", 8008),
            grpc_port=_port(env, "CACHEMESH_SERVE_GRPC_PORT", 8033),
            workers=_int(env, "CACHEMESH_SERVE_WORKERS", 1) if workers else None,
            memory=_size(env, "CACHEMESH_SERVE_MEMORY"),
            memory_factor=_float(env, "CACHEMESH_SERVE_MEMORY_FACTOR", 1.5),
            worker_memory_limit=_size(env, "CACHEMESH_SERVE_WORKER_MEMORY_LIMIT"),
            worker_threads=_int(env, "CACHEMESH_SERVE_WORKER_THREADS", 1),
            load_concurrency=_int(env, "CACHEMESH_SERVE_LOAD_CONCURRENCY", 2),
            load_queue=_int(env, "CACHEMESH_SERVE_LOAD_QUEUE", 256),
            load_attempts=_int(env, "CACHEMESH_SERVE_LOAD_ATTEMPTS", 3),
            failed_ttl_s=_float(env, "CACHEMESH_SERVE_FAILED_TTL", 60.0),
            max_inflight=_int(env, "CACHEMESH_SERVE_MAX_INFLIGHT", 1024),
            request_timeout_s=_float(env, "CACHEMESH_SERVE_REQUEST_TIMEOUT", 60.0),
            drain_timeout_s=_float(env, "CACHEMESH_SERVE_DRAIN_TIMEOUT", 30.0),
            min_resident_s=_float(env, "CACHEMESH_SERVE_MIN_RESIDENT", 0.0),
            copy_rate=_float(env, "CACHEMESH_SERVE_COPY_RATE", 50.0),
            max_copies=(_int(env, "CACHEMESH_SERVE_MAX_COPIES", 1)
                        if env.get("CACHEMESH_SERVE_MAX_COPIES") else None),
            copy_cooldown_s=_float(env, "CACHEMESH_SERVE_COPY_COOLDOWN", 60.0),
            url=(env.get("CACHEMESH_URL") or "http://127.0.0.1:8008").rstrip("/"),
            max_body=_size(env, "CACHEMESH_SERVE_MAX_BODY") or 64 * 1024**2,
            max_control_body=_size(env, "CACHEMESH_SERVE_MAX_CONTROL_BODY") or 1024**2,
            parse_memory=_size(env, "CACHEMESH_SERVE_PARSE_MEMORY"),
            verify_loads=_bool(env, "CACHEMESH_SERVE_VERIFY_LOADS", False),
            source_roots=tuple(Path(p).expanduser() for p in
                               (env.get("CACHEMESH_SERVE_SOURCE_ROOTS") or "").split(":") if p),
        )

    def parse_budget(self) -> int:
        return self.parse_memory or 8 * self.max_body

    def worker_count(self) -> int:
        if self.workers is not None:
            return self.workers
        return max(1, (os.cpu_count() or 2) // 2)
