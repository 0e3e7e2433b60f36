"""Every environment variable cachemesh reads, in one place.

Nothing reads the environment at import time: :meth:`Settings.from_env` builds a
typed, frozen object at start-up and it is passed down from there. Tests build
their own ``Settings`` (see ``tests/conftest.py``).

Variables of the ecosystem (``HF_ENDPOINT``, ``HF_TOKEN``, ``MODELSCOPE_DOMAIN``,
``AWS_*``) are read by the sources that use them, through ``Settings.environ``;
each source's module docstring lists the ones it reads.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import InvalidInputError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Parse ``"20GiB"``, ``"1.5G"``, ``"512Mi"`` or a number of bytes into bytes."""
    if isinstance(text, bool):
        raise InvalidInputError(f"not a size: {text!r}")
    if isinstance(text, int | float):
        if text < 0:
            raise InvalidInputError(f"a size cannot be negative: {text!r}")
        return int(text)
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise InvalidInputError(
            f"not a size: {text!r} (examples: 512MiB, 20GiB, 1.5G, 1000000)"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(n: int | float) -> str:
    """Bytes as a short human string with binary units: ``1.5 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _port(environ: Mapping[str, str], name: str, default: int) -> int:
    """A TCP port, 0 included (for the ports that 0 turns off)."""
    return _int(environ, name, default, minimum=0, maximum=65535)


def _int(environ: Mapping[str, str], name: str, default: int, *, minimum: int = 1,
         maximum: int | None = None) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInputError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise InvalidInputError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidInputError(f"{name} must be at most {maximum}, got {value}")
    return value


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInputError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise InvalidInputError(f"{name} cannot be negative, got {value}")
    return value


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (environ.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise InvalidInputError(f"{name} must be true or false, got {raw!r}")


def _positive(environ: Mapping[str, str], name: str, default: float) -> float:
    value = _float(environ, name, default)
    if not value > 0:
        raise InvalidInputError(f"{name} must be positive, got {value}")
    return value


def _size(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    return parse_size(raw) if raw else None


def _secret(environ: Mapping[str, str], name: str) -> str | None:
    # Surrounding whitespace is a pasting accident (a trailing newline from a file).
    raw = (environ.get(name) or "").strip()
    return raw or None


def _path(environ: Mapping[str, str], name: str) -> Path | None:
    raw = (environ.get(name) or "").strip()
    return Path(raw).expanduser() if raw else None


def default_home(environ: Mapping[str, str]) -> Path:
    # CACHEMESH_HOME wins; else XDG_CACHE_HOME/cachemesh; else ~/.cache/cachemesh.
    if environ.get("CACHEMESH_HOME"):
        return Path(environ["CACHEMESH_HOME"]).expanduser()
    xdg = environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cachemesh"


def worker_threads(environ: Mapping[str, str] | None = None) -> int:
    """A worker's thread budget: OMP_NUM_THREADS, which the server sets in each worker's
    environment from ``ServeSettings.worker_threads`` (serve/workers.py); read in the
    worker, where runtimes pass it to libraries with pools of their own (onnxruntime,
    CTranslate2) that do not all read it. 0 when unset or malformed: the library picks."""
    raw = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "0")
    try:
        return max(int(raw), 0)
    except ValueError:
        return 0


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


_NODE_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
_HOST_PORT_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})$")
# Shorter tokens are guessable; the token admits a caller to every node of the cluster.
MIN_CLUSTER_TOKEN = 16


def parse_cluster_url(text: str) -> tuple[str, ...]:
    """``etcd://HOST:PORT[,HOST:PORT...]`` -> ``("HOST:PORT", ...)``."""
    raw = text.strip()
    if not raw.startswith("etcd://"):
        raise InvalidInputError(
            f"cluster address must look like etcd://HOST:PORT[,HOST:PORT...], got {text!r}")
    endpoints = []
    for part in raw[len("etcd://"):].split(","):
        part = part.strip().rstrip("/")
        match = _HOST_PORT_RE.match(part)
        if not match or not 0 < int(match.group(3)) < 65536:
            raise InvalidInputError(
                f"cluster address {text!r}: {part!r} is not HOST:PORT (e.g. etcd://10.0.0.5:2379)")
        endpoints.append(part)
    return tuple(dict.fromkeys(endpoints))


def parse_advertise_url(text: str) -> str:
    """``http(s)://ADDR:PORT``: where the other nodes reach this one."""
    raw = text.strip().rstrip("/")
    scheme, sep, rest = raw.partition("://")
    match = _HOST_PORT_RE.match(rest) if sep else None
    if scheme not in ("http", "https") or not match or not 0 < int(match.group(3)) < 65536:
        raise InvalidInputError(
            f"advertise URL must look like http(s)://ADDR:PORT, got {text!r}")
    if match.group(1) in ("0.0.0.0", "[::]"):
        raise InvalidInputError(
            f"advertise URL {text!r} names a wildcard address: give one the other nodes can reach")
    return raw


def parse_node_name(text: str) -> str:
    name = text.strip()
    if not _NODE_NAME_RE.match(name):
        raise InvalidInputError(
            f"node name must be lowercase letters, digits, '-' and '.', at most 63 characters,"
            f" starting and ending with a letter or digit; got {text!r}")
    return name


def parse_labels(text: str) -> dict[str, str]:
    """``zone=a,rack=r3`` -> ``{"zone": "a", "rack": "r3"}``."""
    labels: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not _LABEL_KEY_RE.match(key) or len(value) > 63:
            raise InvalidInputError(f"node label must be KEY=VALUE, got {item.strip()!r}")
        labels[key] = value
    return labels


def parse_peers(text: str) -> tuple[tuple[str, str], ...]:
    """``a=http://10.0.0.1:8008,b=http://10.0.0.2:8008`` -> ``(("a", url), ("b", url))``."""
    peers: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, url = item.partition("=")
        if not sep:
            raise InvalidInputError(f"a peer must be NAME=URL, got {item.strip()!r}")
        peers[parse_node_name(name)] = parse_advertise_url(url)
    return tuple(sorted(peers.items()))


_PEER_FAULTS = ("flip",)


def _prefix(raw: str | None) -> str:
    prefix = raw or "/cachemesh/v1/"
    if not prefix.startswith("/") or not prefix.endswith("/") or "//" in prefix:
        raise InvalidInputError(
            f"CACHEMESH_CLUSTER_PREFIX must start and end with '/', got {prefix!r}")
    return prefix


@dataclass(frozen=True)
class ClusterSettings:
    """Settings of cluster mode. Off (``endpoints`` empty) unless CACHEMESH_CLUSTER is set.

    ``from_env`` checks each value's form; :meth:`check` checks that the whole is
    enough to join (a token), and is what a joining node calls, after the command's
    flags were applied.
    """

    # CACHEMESH_CLUSTER: etcd://HOST:PORT[,HOST:PORT...]; the etcd endpoints (empty: one node).
    endpoints: tuple[str, ...] = ()
    # CACHEMESH_NODE_NAME: this node's name in the cluster (default: the host name).
    node_name: str | None = None
    # CACHEMESH_ADVERTISE: http(s)://ADDR:PORT where the other nodes reach this one
    # (default: the serve host and port, when the host is not a wildcard).
    advertise: str | None = None
    # CACHEMESH_CLUSTER_TOKEN: the secret node-to-node calls carry; required in cluster mode.
    token: str | None = field(default=None, repr=False)
    # CACHEMESH_CLUSTER_LEASE_TTL: seconds a node's lease (and so its record) outlives
    # its last keep-alive; a dead node is forgotten this long after it died.
    lease_ttl_s: int = 10
    # CACHEMESH_CLUSTER_PREFIX: every key of the cluster lives under it (versioned, so a
    # later schema can roll out beside this one).
    prefix: str = "/cachemesh/v1/"
    # CACHEMESH_NODE_LABELS: KEY=VALUE[,...] published in the node record (e.g. zone=a).
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    # CACHEMESH_ETCD_CACERT: PEM of the CA that signed etcd's certificate; set, etcd is
    # reached over HTTPS.
    etcd_cacert: Path | None = None
    # CACHEMESH_ETCD_CERT and CACHEMESH_ETCD_KEY: this node's client certificate and key
    # for an etcd started with --client-cert-auth (both or neither).
    etcd_cert: Path | None = None
    etcd_key: Path | None = field(default=None, repr=False)
    # CACHEMESH_CLUSTER_CA: PEM of the CA that signed the nodes' HTTPS certificates, for
    # calls between nodes whose advertise URLs are https (default: the system's CAs).
    ca: Path | None = None
    # CACHEMESH_PEERS: NAME=URL[,NAME=URL...]: the nodes this one asks for blobs before
    # their origin (each one's advertise URL): a static list, until the blob index in
    # etcd finds them. This node's own name may be in it (one list for all): it is skipped.
    # Needs CACHEMESH_CLUSTER_TOKEN, which the peers' blob route asks for.
    peers: tuple[tuple[str, str], ...] = ()
    # CACHEMESH_PEER_FAULT: for tests and benchmarks only: "flip" makes this node flip
    # one byte of every range of a blob it serves to peers (a bad peer).
    peer_fault: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.endpoints)

    @property
    def peering(self) -> bool:
        """Whether this node fetches from peers (a static list for now; etcd later)."""
        return bool(self.peers)

    @property
    def tls(self) -> bool:
        return self.etcd_cacert is not None or self.etcd_cert is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ClusterSettings:
        url = (env.get("CACHEMESH_CLUSTER") or "").strip()
        name = env.get("CACHEMESH_NODE_NAME")
        advertise = env.get("CACHEMESH_ADVERTISE")
        settings = cls(
            endpoints=parse_cluster_url(url) if url else (),
            node_name=parse_node_name(name) if name else None,
            advertise=parse_advertise_url(advertise) if advertise else None,
            token=_secret(env, "CACHEMESH_CLUSTER_TOKEN"),
            lease_ttl_s=_int(env, "CACHEMESH_CLUSTER_LEASE_TTL", 10, minimum=2, maximum=3600),
            prefix=_prefix(env.get("CACHEMESH_CLUSTER_PREFIX")),
            labels=parse_labels(env.get("CACHEMESH_NODE_LABELS") or ""),
            etcd_cacert=_path(env, "CACHEMESH_ETCD_CACERT"),
            etcd_cert=_path(env, "CACHEMESH_ETCD_CERT"),
            etcd_key=_path(env, "CACHEMESH_ETCD_KEY"),
            ca=_path(env, "CACHEMESH_CLUSTER_CA"),
        )
        peers = env.get("CACHEMESH_PEERS")
        fault = (env.get("CACHEMESH_PEER_FAULT") or "").strip() or None
        if fault is not None and fault not in _PEER_FAULTS:
            raise InvalidInputError(f"CACHEMESH_PEER_FAULT must be one of {_PEER_FAULTS},"
                                    f" got {fault!r}")
        settings = replace(settings, peers=parse_peers(peers) if peers else (), peer_fault=fault)
        if settings.peers and len(settings.token or "") < MIN_CLUSTER_TOKEN:
            raise InvalidInputError(
                "CACHEMESH_PEERS needs CACHEMESH_CLUSTER_TOKEN (at least"
                f" {MIN_CLUSTER_TOKEN} characters): peers serve blobs only to callers that carry it")
        if (settings.etcd_cert is None) != (settings.etcd_key is None):
            raise InvalidInputError(
                "CACHEMESH_ETCD_CERT and CACHEMESH_ETCD_KEY go together: give both or neither")
        return settings

    def check(self) -> None:
        """Raise unless this is enough to join a cluster: endpoints, and a long enough token."""
        if not self.enabled:
            raise InvalidInputError("cluster mode needs CACHEMESH_CLUSTER (or --cluster)"
                                    " = etcd://HOST:PORT[,HOST:PORT...]")
        if not self.token:
            raise InvalidInputError(
                "cluster mode needs CACHEMESH_CLUSTER_TOKEN: the secret every node of the cluster"
                " shares to authenticate node-to-node calls (e.g. `openssl rand -hex 32`)")
        if len(self.token) < MIN_CLUSTER_TOKEN:
            raise InvalidInputError(
                f"CACHEMESH_CLUSTER_TOKEN is too short: at least {MIN_CLUSTER_TOKEN} characters")
        for path in (self.etcd_cacert, self.etcd_cert, self.etcd_key):
            if path is not None and not path.is_file():
                raise InvalidInputError(f"etcd TLS file not found: {path}")
        if self.ca is not None and not self.ca.is_file():
            raise InvalidInputError(f"CACHEMESH_CLUSTER_CA not found: {self.ca}")

    def name_or_host(self) -> str:
        """The node name: CACHEMESH_NODE_NAME, else this host's name, lowercased."""
        if self.node_name:
            return self.node_name
        return parse_node_name(socket.gethostname().lower())

    def advertise_url(self, serve: ServeSettings) -> str:
        """CACHEMESH_ADVERTISE, else the serve address when the others can reach it."""
        if self.advertise:
            return self.advertise
        if serve.host in ("0.0.0.0", "::", ""):
            raise InvalidInputError(
                f"the server listens on {serve.host or 'every address'}: give the address the"
                " other nodes reach it at with --advertise or CACHEMESH_ADVERTISE")
        host = f"[{serve.host}]" if ":" in serve.host else serve.host
        return parse_advertise_url(f"http://{host}:{serve.port}")


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


@dataclass(frozen=True)
class OperatorSettings:
    """Settings of the Kubernetes operator (``python -m cachemesh.operator``).

    It reaches the control API as the CLI does (CACHEMESH_URL, CACHEMESH_API_TOKEN,
    CACHEMESH_BUCKET_TOKEN: :class:`Settings`), and the Kubernetes API as any Pod does.
    """

    # CACHEMESH_OPERATOR_NODE: the Kubernetes node of the one cachemesh node that
    # CACHEMESH_URL reaches when the API lists no nodes (a lone node, no cluster mode).
    lone_node: str | None = None
    # KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT: the API server, as Kubernetes
    # tells every Pod (None: not in a cluster).
    kube_host: str | None = None
    kube_port: int = 443
    # The Pod's service account: token, CA and namespace (a path, never an env variable).
    service_account: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount")

    @property
    def kube_url(self) -> str | None:
        if not self.kube_host:
            return None
        host = f"[{self.kube_host}]" if ":" in self.kube_host else self.kube_host
        return f"https://{host}:{self.kube_port}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        env = dict(os.environ if environ is None else environ)
        node = (env.get("CACHEMESH_OPERATOR_NODE") or "").strip()
        return cls(
            lone_node=parse_node_name(node) if node else None,
            kube_host=(env.get("KUBERNETES_SERVICE_HOST") or "").strip() or None,
            kube_port=_int(env, "KUBERNETES_SERVICE_PORT", 443, maximum=65535),
        )
