"""Tests that need network namespaces: skipped where they cannot be made, unless CI says
they must run (``CACHEMESH_REQUIRE_NETNS=1``, set by ``.ci/run``), which makes that a failure."""

from __future__ import annotations

import os

import pytest

from tests.netns.net import unavailable


@pytest.fixture(scope="session")
def netns() -> None:
    why = unavailable()
    if why is None:
        return
    if os.environ.get("CACHEMESH_REQUIRE_NETNS") == "1":
        pytest.fail(f"CACHEMESH_REQUIRE_NETNS=1, but {why}")
    pytest.skip(f"{why} (CACHEMESH_REQUIRE_NETNS=1 makes this a failure)")
