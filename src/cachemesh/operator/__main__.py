"""``python -m cachemesh.operator``: run the operator in every namespace (kopf)."""

from __future__ import annotations

import kopf

from . import main  # noqa: F401  (registers the handlers)

if __name__ == "__main__":
    kopf.run(clusterwide=True, liveness_endpoint="http://0.0.0.0:8080/healthz")
