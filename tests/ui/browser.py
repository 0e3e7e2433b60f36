"""A real browser for the /ui tests and tools/ui_screenshot.py: Debian's chromium, driven
by Playwright (the Python package only: Playwright's own browser downloads are never used).

Screenshots go to ``.artifacts/ui/`` (git-ignored): test artifacts, not committed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".artifacts" / "ui"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def missing() -> str | None:
    """Why a browser cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing (pip install -c constraints.txt -e '.[test]')"
    if chromium() is None:
        return "chromium is not installed (Debian: apt-get install chromium; tools/system-deps.sh)"
    return None


@contextmanager
def launch() -> Iterator[Any]:
    """A headless chromium (a Playwright ``Browser``), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI and the dev machines run as root, where chromium's sandbox
        # refuses to start; the pages it opens are our own, on loopback.
        browser = p.chromium.launch(executable_path=chromium(), headless=True,
                                    args=["--no-sandbox", "--disable-gpu",
                                          "--disable-dev-shm-usage"],
                                    env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")})
        try:
            yield browser
        finally:
            browser.close()
