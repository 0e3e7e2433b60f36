"""Settings of the Kubernetes operator (``python -m cachemesh.operator``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .cluster import parse_node_name
from .values import _int


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
