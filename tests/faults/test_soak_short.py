"""A 20-second soak (benchmarks/soak.py): mixed traffic over 12 models at ~80% of
the measured capacity, with models deployed and removed during the run.

Asserts zero errors of any kind, that every deploy and removal was accepted,
and that memory stays bounded: the last interval's RSS (server, workers) is at
most the first interval's x 1.3 plus a little slack.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).parents[2] / "benchmarks" / "soak.py"


@pytest.mark.slow
def test_short_soak_has_no_errors_and_bounded_memory(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    soak = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = soak  # dataclasses look their module up there
    spec.loader.exec_module(soak)
    result = soak.main(["--minutes", "0.33", "--models", "12", "--calibrate", "2",
                        "--churn-every", "3", "--interval", "4", "--work", str(tmp_path)])
    assert result["requests"] > 100, result
    assert result["errors"] == 0, result["errors_by_kind"]
    assert len(result["churn"]) >= 2
    for entry in result["churn"]:
        assert entry.get("deploy_status", 201) == 201 and entry["remove_status"] == 204, entry
    first, last = result["intervals"][0], result["intervals"][-1]
    assert last["requests"] > 0
    for key in ("server_rss_mib", "workers_rss_mib"):
        assert last[key] <= first[key] * 1.3 + 16, (key, result["intervals"])
