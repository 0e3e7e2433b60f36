"""``python -m cachemesh.operator``: run the operator in every namespace (kopf).

Standalone: the chart runs one replica (Recreate), so kopf's peering, which needs its
own CRDs, has nothing to arbitrate.
"""

from __future__ import annotations

import kopf

from . import main  # noqa: F401  (registers the handlers)

if __name__ == "__main__":
    kopf.run(clusterwide=True, standalone=True, liveness_endpoint="http://0.0.0.0:8080/healthz")
