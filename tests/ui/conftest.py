"""Fixtures of the /ui tests: a real chromium -> a real server on loopback -> a page.

Without chromium or the playwright package the tests skip, saying why; under
``CI=true`` they fail instead, so that CI cannot pass without running them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster.conftest import require_etcd
from tests.cluster.etcd_server import EtcdServer
from tests.cluster.nodes import Cluster
from tests.serve.conftest import RunningServer, serve_settings
from tests.ui import browser as ui_browser

# A custom runtime whose load fails with a hostile message (the error message test).
HOSTILE_RUNTIME = '''
from cachemesh.runtimes import Runtime

class Hostile(Runtime):
    def load(self):
        raise RuntimeError(open(__file__.replace("hostile.py", "message.txt")).read())
'''


def payload(n: int) -> str:
    """Markup that, if a page ever parsed it, would record ``n`` in window.__pwned."""
    return f'<img src=x onerror="window.__pwned=(window.__pwned||[]).concat({n})">'


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Per module: Playwright's sync API runs an event loop on this thread while it is
    open, and a test after it that calls asyncio.run would fail; it closes with the
    module."""
    why = ui_browser.missing()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser tests cannot run: {why}")
        pytest.skip(why)
    with ui_browser.launch() as b:
        yield b


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    from tests.serve.conftest import toy_model

    root = tmp_path_factory.mktemp("ui-models")
    broken = root / "broken"
    broken.mkdir()
    (broken / "hostile.py").write_text(HOSTILE_RUNTIME)
    (broken / "message.txt").write_text(f"refused: {payload(3)}")
    (broken / "weights.bin").write_bytes(b"\0" * 1024)
    from cachemesh.serve.core.registry import ModelSpec

    specs = [toy_model(root, "echo"),
             ModelSpec(name="broken", source=str(broken), runtime="custom",
                       parameters={"class": "hostile:Hostile"})]
    settings = serve_settings(tmp_path_factory.mktemp("ui-home"), workers=1,
                              memory=512 * 1024**2)
    with RunningServer(settings, specs) as running:
        yield running


# A node label is user input too (CACHEMESH_NODE_LABELS: no comma, at most 63 characters).
HOSTILE_LABEL = "<img src=x onerror=window.__pwned=4>"


@pytest.fixture(scope="module")
def ui_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EtcdServer, Cluster]]:
    """A real etcd of the module's own (a test stops it) and two real ``cachemesh serve
    --cluster`` nodes on it, ``a`` and ``b`` (tests/cluster/nodes.py: 2 s leases, 1 GiB
    each); ``b`` carries the labels ``zone=eu-1`` and ``note=<hostile markup>``."""
    require_etcd()
    root = tmp_path_factory.mktemp("ui-cluster")
    etcd = EtcdServer(root / "etcd")
    etcd.start()
    cluster = Cluster(root, etcd.url, "/ui-test/")
    try:
        cluster.start_all(["a", "b"], b={
            "CACHEMESH_NODE_LABELS": f"zone=eu-1,note={HOSTILE_LABEL}"})
        yield etcd, cluster
    finally:
        cluster.stop()
        etcd.stop()


@pytest.fixture
def context_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Options of the browser context; a test adds its own by indirect parametrisation."""
    return {"viewport": {"width": 1400, "height": 1000}, **getattr(request, "param", {})}


@pytest.fixture
def page(browser: Any, context_options: dict[str, Any],
         request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh page; a screenshot of it lands in .artifacts/ui/ whatever the outcome."""
    context = browser.new_context(**context_options)
    page = context.new_page()
    page.set_default_timeout(15_000)
    # What the page's own CSP blocks (the page must work within it): recorded here.
    page.add_init_script("window.__csp = []; document.addEventListener("
                         "'securitypolicyviolation', (e) => window.__csp.push("
                         "e.violatedDirective + ' ' + e.blockedURI));")
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors  # type: ignore[attr-defined]
    try:
        yield page
    finally:
        ui_browser.ARTIFACTS.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^\w.-]+", "_", request.node.name)
        try:
            page.screenshot(path=str(ui_browser.ARTIFACTS / f"{name}.png"), full_page=True)
        finally:
            context.close()
