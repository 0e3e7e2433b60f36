"""Every environment variable cachemesh reads, in one place.

Nothing reads the environment at import time: :meth:`Settings.from_env` builds a
typed, frozen object at start-up and it is passed down from there. Tests build
their own ``Settings`` (see ``tests/conftest.py``).

Variables of the ecosystem (``HF_ENDPOINT``, ``HF_TOKEN``, ``MODELSCOPE_DOMAIN``,
``AWS_*``) are read by the sources that use them, through ``Settings.environ``;
each source's module docstring lists the ones it reads.

The package: ``values.py`` (parsers), ``serve.py`` (ServeSettings), ``cluster.py``
(ClusterSettings and the cluster parsers), ``operator.py`` (OperatorSettings); here,
:class:`Settings`, which holds them, and every name re-exported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .cluster import (  # noqa: F401 (re-exported)
    MIN_CLUSTER_TOKEN,
    ClusterSettings,
    parse_advertise_url,
    parse_cluster_url,
    parse_labels,
    parse_node_name,
    parse_peers,
)
from .operator import (  # noqa: F401 (re-exported)
    OperatorSettings,
)
from .serve import (  # noqa: F401 (re-exported)
    ServeSettings,
)
from .values import (  # noqa: F401 (re-exported)
    _int,
    _positive,
    _secret,
    default_home,
    format_size,
    parse_size,
    worker_threads,
)


@dataclass(frozen=True)
class Settings:
    # CACHEMESH_HOME: root of the store (blobs/, buckets/, hub/, meta.db).
    home: Path
    # CACHEMESH_MAX_SIZE: store-wide size limit ("500GiB"); None means only the disk limits it.
    max_store_bytes: int | None = None
    # CACHEMESH_FETCH_CONCURRENCY: files fetched at once by one pull.
    fetch_concurrency: int = 8
    # CACHEMESH_RANGE_CONCURRENCY: ranged reads in flight at once, shared by the files of
    # one pull (a single large file may use all of them).
    range_concurrency: int = 8
    # CACHEMESH_CHUNK_SIZE: size of one ranged read.
    chunk_size: int = 16 * 1024 * 1024
    # CACHEMESH_FETCH_RETRIES: retries of one ranged read that makes no progress
    # (cut connection, timeout, 5xx, throttling) before the file fails. Bytes that a
    # restart throws away (an origin without ranges starts again at byte 0) are no progress.
    fetch_retries: int = 5
    # CACHEMESH_RETRY_BACKOFF: first backoff in seconds; doubles per retry, with jitter, at most 30 s.
    retry_backoff_s: float = 0.5
    # CACHEMESH_FETCH_TIMEOUT: seconds without a byte from the origin before a read is retried.
    fetch_timeout_s: float = 60.0
    # CACHEMESH_FETCH_LOW_SPEED_LIMIT and CACHEMESH_FETCH_LOW_SPEED_TIME: a response that
    # brings fewer than this many bytes/s ("1KiB") averaged over that many seconds is
    # dropped and counts as a failed attempt, bytes or not (curl's --speed-limit and
    # --speed-time): a trickling origin cannot hold a pull for ever. 0 turns it off.
    fetch_low_speed_bytes: int = 1024
    fetch_low_speed_time_s: float = 60.0
    # CACHEMESH_DB_BUSY_TIMEOUT: seconds a write waits for another process's transaction
    # on meta.db before it fails with "locked by another process".
    db_busy_timeout_s: float = 30.0
    # CACHEMESH_API_TOKEN: bearer token for the control API, the repository extension
    # and /metrics; it is also accepted wherever the inference token is (None: the
    # control API is open). See docs/security.md.
    api_token: str | None = field(default=None, repr=False)
    # CACHEMESH_INFERENCE_TOKEN: bearer token for inference (/v2/models/..., /v1/...);
    # None: inference is open. Health endpoints stay open either way.
    inference_token: str | None = field(default=None, repr=False)
    # CACHEMESH_METRICS_TOKEN: read-only bearer token for /metrics (for a scraper).
    # /metrics needs it, or the control token, as soon as either is set.
    metrics_token: str | None = field(default=None, repr=False)
    # CACHEMESH_BUCKET_TOKEN: tokens of protected buckets (','-separated) that
    # `cachemesh models ...` sends; the server reads bucket tokens from the store.
    bucket_tokens: tuple[str, ...] = field(default=(), repr=False)
    # CACHEMESH_CA_BUNDLE, else SSL_CERT_FILE, else REQUESTS_CA_BUNDLE: a PEM file of
    # the certificate authorities trusted for HTTPS origins (a private mirror);
    # None: the certifi bundle.
    ca_bundle: str | None = None
    # Settings of the model server (CACHEMESH_SERVE_*).
    serve: ServeSettings = field(default_factory=ServeSettings)
    # Settings of cluster mode (CACHEMESH_CLUSTER*, CACHEMESH_NODE_*, CACHEMESH_ETCD_*).
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    # The environment the settings were read from, for sources that honour the
    # ecosystem's own variables (HF_ENDPOINT, HF_TOKEN, AWS_*). Not printed.
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = dict(os.environ if environ is None else environ)
        max_size = env.get("CACHEMESH_MAX_SIZE")
        settings = cls(
            home=default_home(env),
            max_store_bytes=parse_size(max_size) if max_size else None,
            fetch_concurrency=_int(env, "CACHEMESH_FETCH_CONCURRENCY", 8),
            range_concurrency=_int(env, "CACHEMESH_RANGE_CONCURRENCY", 8),
            chunk_size=_int(env, "CACHEMESH_CHUNK_SIZE", 16 * 1024 * 1024),
            fetch_retries=_int(env, "CACHEMESH_FETCH_RETRIES", 5),
            retry_backoff_s=_positive(env, "CACHEMESH_RETRY_BACKOFF", 0.5),
            fetch_timeout_s=_positive(env, "CACHEMESH_FETCH_TIMEOUT", 60.0),
            fetch_low_speed_bytes=(parse_size(env["CACHEMESH_FETCH_LOW_SPEED_LIMIT"])
                                   if env.get("CACHEMESH_FETCH_LOW_SPEED_LIMIT") else 1024),
            fetch_low_speed_time_s=_positive(env, "CACHEMESH_FETCH_LOW_SPEED_TIME", 60.0),
            db_busy_timeout_s=_positive(env, "CACHEMESH_DB_BUSY_TIMEOUT", 30.0),
            api_token=_secret(env, "CACHEMESH_API_TOKEN"),
            inference_token=_secret(env, "CACHEMESH_INFERENCE_TOKEN"),
            metrics_token=_secret(env, "CACHEMESH_METRICS_TOKEN"),
            bucket_tokens=tuple(t.strip() for t in (env.get("CACHEMESH_BUCKET_TOKEN") or "")
                                .split(",") if t.strip()),
            ca_bundle=(env.get("CACHEMESH_CA_BUNDLE") or env.get("SSL_CERT_FILE")
                       or env.get("REQUESTS_CA_BUNDLE") or None),
            serve=ServeSettings.from_env(env),
            cluster=ClusterSettings.from_env(env),
            environ=env,
        )
        return replace(settings, **overrides) if overrides else settings
