"""Settings of cluster mode (CACHEMESH_CLUSTER*, CACHEMESH_NODE_*, CACHEMESH_ETCD_*), and the
parsers of cluster addresses, node names, labels and peers."""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import InvalidInputError
from .serve import ServeSettings
from .values import _int, _path, _secret

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
