"""/ui of a node in a real cluster: a real etcd, two real ``cachemesh serve --cluster``
nodes (the ``ui_cluster`` fixture), chromium on node a's page."""

from __future__ import annotations

import shutil
import time
from typing import Any

import pytest

from tests.cluster.etcd_server import EtcdServer
from tests.cluster.nodes import Cluster, ServeNode, toy_spec, wait_until
from tests.ui import browser as ui_browser
from tests.ui.conftest import HOSTILE_LABEL
from tests.ui.test_ui import INTERVAL_MS, wait_for

HOSTILE_DIR = "<img src=x onerror=window.__pwned=5>"  # a folder name: no '/'
NODE_HEALTH = """(want) => Object.entries(want).every(([node, health]) => {
    const badge = document.querySelector(`tr[data-node="${node}"] .state`);
    return badge && badge.textContent === health;
})"""


def open_ui(page: Any, node: ServeNode) -> None:
    page.goto(f"{node.url}/ui?interval={INTERVAL_MS}")


def node_cell(page: Any, node: str, column: int) -> str:
    return page.locator(f'tr[data-node="{node}"] > td:nth-child({column})').inner_text()


# Without the page's CSP, as the hostile text test of one node: markup made from the
# label would run and be caught.
@pytest.mark.parametrize("context_options", [{"bypass_csp": True}], indirect=True,
                         ids=["without-csp"])
def test_nodes_their_health_memory_and_copies(page: Any,
                                              ui_cluster: tuple[EtcdServer, Cluster]):
    _, cluster = ui_cluster
    a, b = cluster["a"], cluster["b"]
    r = a.http.post("/api/v1/models", json=toy_spec(cluster.origin, "toy"))
    assert r.status_code == 201, r.text
    # A model whose local source then goes: every node says it cannot load it, and why
    # (the path, markup in it, is user input).
    ghost = toy_spec(cluster.origin, HOSTILE_DIR)
    ghost["name"] = "ghost"
    r = a.http.post("/api/v1/models", json=ghost)
    assert r.status_code == 201, r.text
    shutil.rmtree(ghost["source"])
    wait_until(lambda: b.model("toy").status_code == 200, 10, "b to know toy")
    assert b.infer("toy").status_code == 200  # a copy on b only

    open_ui(page, a)
    wait_for(page, NODE_HEALTH, {"a": "ok", "b": "ok"})
    assert page.locator("#node-rows > tr").count() == 2  # every node, once
    assert "this node" in node_cell(page, "a", 1) and "this node" not in node_cell(page, "b", 1)
    assert node_cell(page, "b", 2) == b.url
    # Each node's memory against its budget (a node's first record, written as it joins,
    # has none yet; the next comes at most 5 s later).
    for name in ("a", "b"):
        wait_for(page, "(n) => document.querySelector(`tr[data-node=\"${n}\"] > td:nth-child(6)`)"
                       ".textContent.endsWith(' of 1.0 GiB')", name, timeout=20_000)
        assert page.get_attribute(f'tr[data-node="{name}"] meter', "max") == str(1024**3)
    # The model names the node holding its copy; b's row says what it holds (its record
    # is written at most every 5 s: wait for it).
    wait_for(page, """() => {
        const row = document.querySelector('tr[data-model="toy"]');
        const held = document.querySelector('tr[data-node="b"] li[data-model="toy"]');
        return row && row.querySelector('td.nodes li[data-node="b"]') && held
            && held.textContent.includes('ready')
            && document.querySelector('tr[data-node="b"] > td:nth-child(8)')
                .textContent.includes('ghost');
    }""", timeout=20_000)
    model_nodes = page.locator('tr[data-model="toy"] td.nodes li').all_inner_texts()
    assert model_nodes == ["b"], model_nodes
    assert page.locator('tr[data-model="toy"] .state').inner_text() == "Unloaded"  # on a
    assert "toy" not in node_cell(page, "a", 7)
    assert page.locator("#model-nodes").is_visible()
    assert page.locator("#caches h2").inner_text().startswith("Caches on node a")
    # The hostile label and reason, as text; a few more renders, then nothing has run.
    labels = page.locator('tr[data-node="b"] ul.labels li').all_inner_texts()
    assert sorted(labels) == [f"note={HOSTILE_LABEL}", "zone=eu-1"], labels
    for name in ("a", "b"):
        assert f"ghost: version default: local source {ghost['source']} does not exist" \
            in node_cell(page, name, 8)
    time.sleep(3 * INTERVAL_MS / 1000)
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0
    assert not page.errors


def test_a_cache_declared_for_every_node_shows_each_nodes_pull(
        page: Any, ui_cluster: tuple[EtcdServer, Cluster]):
    _, cluster = ui_cluster
    a, b = cluster["a"], cluster["b"]
    folder = cluster.origin / "spread"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"w" * 300_000)
    r = b.http.post("/api/v1/datacaches", json={"name": "spread", "source": str(folder),
                                                "nodes": "all"})
    assert r.status_code == 202, r.text
    open_ui(page, a)  # declared on b: a pulls it too, and its page shows both pulls
    wait_for(page, """() => {
        const items = [...document.querySelectorAll('tr[data-cache="spread"] ul.nodes li')];
        return items.length === 2 && items.every((li) => li.textContent.endsWith('Available 100%'));
    }""", timeout=20_000)
    names = page.locator('tr[data-cache="spread"] ul.nodes li code').all_inner_texts()
    assert names == ["a", "b"], names
    assert page.evaluate("window.__csp") == []
    assert not page.errors


def test_a_node_without_etcd_shows_itself_degraded_and_the_others_stale(
        page: Any, ui_cluster: tuple[EtcdServer, Cluster]):
    etcd, cluster = ui_cluster
    open_ui(page, cluster["a"])
    wait_for(page, NODE_HEALTH, {"a": "ok", "b": "ok"})
    assert page.locator("#cluster-warning").is_hidden()
    etcd.stop()
    try:
        wait_for(page, NODE_HEALTH, {"a": "degraded", "b": "stale record"})
        warning = page.locator("#cluster-warning")
        assert warning.is_visible() and "Node a cannot reach etcd" in warning.inner_text()
        ui_browser.ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ui_browser.ARTIFACTS / "cluster-degraded.png"), full_page=True)
    finally:
        etcd.start()
    # etcd is back: a resyncs by itself, and the page follows.
    wait_for(page, NODE_HEALTH, {"a": "ok", "b": "ok"}, timeout=20_000)
    assert page.locator("#cluster-warning").is_hidden()
    assert page.evaluate("window.__csp") == []  # it works within its own policy
    assert not page.errors
