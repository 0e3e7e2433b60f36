"""/ui in a real browser (chromium through Playwright) against a real server on loopback."""

from __future__ import annotations

import dataclasses
import os
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.emulators.http_origin import HttpOrigin
from tests.serve.conftest import RunningServer, serve_settings
from tests.ui.conftest import payload

INTERVAL_MS = 300  # the page's poll interval in these tests (?interval=)


def open_ui(page: Any, server: RunningServer) -> None:
    page.goto(f"{server.url}/ui?interval={INTERVAL_MS}")


def wait_for(page: Any, script: str, arg: Any = None, timeout: float = 15_000) -> Any:
    return page.wait_for_function(script, arg=arg, timeout=timeout).json_value()


def cell_text(page: Any, row: str, column: int) -> str:
    return page.locator(f"{row} > td:nth-child({column})").inner_text()


def test_assets_are_open_and_carry_a_content_security_policy(server: RunningServer):
    with httpx.Client(base_url=server.url) as client:
        for path, kind in (("/ui", "text/html"), ("/ui/ui.js", "text/javascript"),
                           ("/ui/ui.css", "text/css")):
            r = client.get(path)
            assert r.status_code == 200, path
            assert r.headers["content-type"].startswith(kind)
            csp = r.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "default-src 'none'" in csp
            assert "unsafe-inline" not in csp and "http" not in csp
            assert r.headers["x-content-type-options"] == "nosniff"
        page = client.get("/ui").text
        assert "<script src=\"ui/ui.js\"" in page and "<script>" not in page
        assert client.get("/ui/index.html").status_code == 404
        assert client.get("/ui/..%2Fui.py").status_code == 404
        assert client.get("/ui/", follow_redirects=False).headers["location"] == "/ui"


def test_progress_bar_follows_a_pull_to_100(page: Any, server: RunningServer):
    # The fetcher reports progress every 4 MiB: 12 MiB show two steps between 0 and 100.
    data = random.Random(5).randbytes(12 * 1024 * 1024)
    with HttpOrigin() as origin:
        origin.files["/model.bin"] = data
        origin.delay_s = 0.012  # per 64 KiB: about 2.5 s for the file
        requests_seen: list[str] = []
        page.on("request", lambda r: requests_seen.append(r.url))
        open_ui(page, server)
        page.wait_for_selector("#main:not([hidden])")
        # Record every value the bar of this cache shows, as the page re-renders it.
        page.evaluate("""() => {
            window.__seen = [];
            new MutationObserver(() => {
                const bar = document.querySelector('tr[data-cache="slow"] progress');
                if (bar) window.__seen.push(bar.value);
            }).observe(document.getElementById('cache-rows'), {childList: true});
        }""")
        r = server.client.post("/api/v1/datacaches",
                               json={"name": "slow", "source": origin.url("/model.bin")})
        assert r.status_code == 202, r.text
        row = 'tr[data-cache="slow"]'
        wait_for(page, """() => {
            const row = document.querySelector('tr[data-cache="slow"]');
            return row && row.querySelector('progress').value === 100
                && row.querySelector('.state').textContent === 'Available';
        }""", timeout=20_000)
        seen = page.evaluate("window.__seen")
        assert any(0 < v < 100 for v in seen), seen  # it moved, not just jumped to 100
        assert seen == sorted(seen), seen
        assert cell_text(page, row, 6) == "12.0 MiB"
        wait_for(page, "() => document.querySelector('tr[data-cache=\"slow\"] > td:nth-child(7)')"
                       ".textContent === '12.0 MiB / 12.0 MiB'")  # logical / exclusive
        assert cell_text(page, row, 8) == server.client.get(
            "/api/v1/datacaches/slow").json()["view"]
        wait_for(page, """() => document.querySelector('tr[data-cache="slow"] .events')
                                .textContent.includes('1 file(s) fetched')""")
    # The progress came from the event stream, and nothing left this origin.
    assert any(u.endswith("/api/v1/datacaches/slow/events") for u in requests_seen)
    assert all(u.startswith(server.url + "/") for u in requests_seen), requests_seen
    assert page.evaluate("window.__csp") == []  # it works within its own policy
    assert not page.errors


def test_model_state_changes_after_a_request(page: Any, server: RunningServer):
    open_ui(page, server)
    row = 'tr[data-model="echo"]'
    page.wait_for_selector(row)
    assert page.locator(f"{row} .state").inner_text() == "Unloaded"
    assert "none loaded" in cell_text(page, row, 5)
    body = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}
    r = server.client.post("/v2/models/echo/infer", json=body)
    assert r.status_code == 200, r.text
    wait_for(page, """() => {
        const s = document.querySelector('tr[data-model="echo"] .state');
        return s && s.textContent === 'Ready';
    }""")
    worker_id = server.client.get("/api/v1/models/echo").json()["worker"]
    assert f"worker {worker_id} · Ready" in cell_text(page, row, 5)
    wait_for(page, "() => document.querySelector('tr[data-model=\"echo\"] > td:nth-child(8)')"
                   ".textContent === '1'")
    assert cell_text(page, row, 6).endswith("s ago")
    # The chart counted the request and the load since the page opened.
    wait_for(page, "() => Number(document.querySelector('[data-series=requests]')"
                   ".dataset.total) >= 1")
    assert int(page.get_attribute("[data-series=loads]", "data-total")) >= 1
    # The worker holds the model, against the budget.
    wait_for(page, "(w) => document.querySelector(`tr[data-worker=\"${w}\"]`)"
                   ".textContent.includes('echo')", worker_id)
    assert page.locator("#budget").inner_text().endswith("of a budget of 512.0 MiB")
    # One node, no cluster: no nodes section, no nodes column, no "on node" in headings.
    assert page.locator("#nodes").is_hidden() and page.locator("#model-nodes").is_hidden()
    assert page.locator(f"{row} > td").count() == 11
    assert "on node" not in page.locator("main").inner_text()
    assert page.evaluate("window.__csp") == []
    assert not page.errors


# Without the page's CSP: the test must catch markup made from text by itself, even
# where the policy would have stopped the script.
@pytest.mark.parametrize("context_options", [{"bypass_csp": True}], indirect=True,
                         ids=["without-csp"])
def test_hostile_text_is_shown_as_text_and_runs_nothing(page: Any, server: RunningServer,
                                                         tmp_path: Path):
    client = server.client
    # A source path: an http source keeps its URL as given (a local path becomes a
    # percent-encoded file:// URL).
    with HttpOrigin() as origin:
        url = origin.url("/m/" + payload(1))
        origin.files[httpx.URL(url).raw_path.decode()] = b"weights"
        assert client.post("/api/v1/datacaches",
                           json={"name": "hostile-url", "source": url}).status_code == 202
        assert client.post("/api/v1/datacaches", json={
            "name": "hostile-empty", "source": url, "include": ["*.none"]}).status_code == 202
        # A file name: a symlink out of a local source is skipped, with an event naming it.
        local = tmp_path / "origin"
        local.mkdir()
        (local / "config.json").write_text("{}")
        os.symlink("/etc/hostname", local / payload(2))
        assert client.post("/api/v1/datacaches",
                           json={"name": "hostile-file", "source": str(local)}).status_code == 202
        # An error message: a model whose load fails with markup in its message.
        body = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}
        assert client.post("/v2/models/broken/infer", json=body).status_code >= 500

        open_ui(page, server)
        wait_for(page, """() => {
            const state = (sel) => (document.querySelector(sel + ' .state') || {}).textContent;
            return state('tr[data-cache="hostile-url"]') === 'Available'
                && state('tr[data-cache="hostile-file"]') === 'Available'
                && state('tr[data-cache="hostile-empty"]') === 'Failed'
                && state('tr[data-model="broken"]') === 'Failed';
        }""")
    # Everything rendered (the skipped-symlink event among the file's events), then a
    # few more renders: whatever the text could have run has run by now.
    wait_for(page, "() => document.querySelectorAll('tr[data-cache=\"hostile-file\"] .events li')"
                   ".length >= 3")
    time.sleep(3 * INTERVAL_MS / 1000)
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0  # no element was made from the text
    assert cell_text(page, 'tr[data-cache="hostile-url"]', 3) == url  # the source, as text
    events = page.locator('tr[data-cache="hostile-file"] .events').inner_text()
    assert f"skipped symlink {payload(2)} -> /etc/hostname" in events  # a file name
    error = page.locator('tr[data-cache="hostile-empty"] .error').inner_text()
    assert f"no files to pull from {url}" in error  # a cache's error message
    reason = page.locator('tr[data-model="broken"] .error').inner_text()
    assert f"refused: {payload(3)}" in reason  # a model's error message
    assert not page.errors


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    settings = serve_settings(tmp_path_factory.mktemp("ui-locked"), workers=1)
    settings = dataclasses.replace(settings, api_token="ui-test-token-0123456789")
    with RunningServer(settings, []) as running:
        running.client.headers["Authorization"] = "Bearer ui-test-token-0123456789"
        yield running


def test_a_server_with_a_token_shows_nothing_until_the_page_gets_it(page: Any,
                                                                     locked_server: Any,
                                                                     tmp_path: Path):
    source = tmp_path / "secret-model"
    source.mkdir()
    (source / "config.json").write_text('{"a": 1}')
    r = locked_server.client.post("/api/v1/datacaches",
                                  json={"name": "secret", "source": str(source)})
    assert r.status_code == 202, r.text
    sent: list[dict[str, str]] = []
    page.on("request", lambda r: sent.append(r.headers))
    open_ui(page, locked_server)
    page.wait_for_selector("#login:not([hidden])")
    assert page.locator("#main").is_hidden()
    assert "secret" not in page.content()
    page.fill("#token", "not-the-token-at-all")
    page.click("#login button")
    page.wait_for_function(
        "() => document.getElementById('login-error').textContent.includes('not valid')")
    assert page.locator("#main").is_hidden() and "secret-model" not in page.content()
    page.fill("#token", "ui-test-token-0123456789")
    page.click("#login button")
    page.wait_for_selector('tr[data-cache="secret"]')
    # The events come from the stream or the description, both behind the token.
    wait_for(page, """() => {
        const row = document.querySelector('tr[data-cache="secret"]');
        return row.querySelector('.events').textContent.includes('pulling from')
            && row.querySelector('.state').textContent === 'Available';
    }""")
    assert page.locator("#login").is_hidden()
    assert any(h.get("authorization") == "Bearer ui-test-token-0123456789" for h in sent)
    assert not page.errors
