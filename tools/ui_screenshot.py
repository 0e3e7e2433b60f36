"""The README's picture of /ui, made with the browser tests' own parts.

    .venv/bin/python tools/ui_screenshot.py [--out docs/ui.png]

Starts a real server on loopback (tests/serve/conftest.py's RunningServer) over a
fresh store in a temporary folder, with the demo's digits classifier: two
caches of the same files in two buckets (deduplicated), a model with two
versions and a 90/10 traffic split that answers a stream of requests, a second
model not loaded yet, and a pull from a slow local origin
(tests/emulators/http_origin.py) that is still running when the picture is
taken. Then chromium (tests/ui/browser.py) opens /ui and saves a screenshot.
Nothing leaves the machine. Takes about 20 s.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from cachemesh.demo import make_demo_model  # noqa: E402
from tests.emulators.http_origin import HttpOrigin  # noqa: E402
from tests.serve.conftest import RunningServer, serve_settings  # noqa: E402
from tests.ui import browser as ui_browser  # noqa: E402

DIGIT = [0, 0, 0.312, 0.812, 0.562, 0.062, 0, 0, 0, 0, 0.812, 0.938, 0.625, 0.938, 0.312, 0, 0,
         0.188, 0.938, 0.125, 0, 0.688, 0.5, 0, 0, 0.25, 0.75, 0, 0, 0.5, 0.5, 0, 0, 0.312, 0.5,
         0, 0, 0.562, 0.5, 0, 0, 0.25, 0.688, 0, 0.062, 0.75, 0.438, 0, 0, 0.125, 0.875, 0.312,
         0.625, 0.75, 0, 0, 0, 0, 0.375, 0.812, 0.625, 0, 0, 0]


def wait_available(client: httpx.Client, name: str) -> None:
    deadline = time.monotonic() + 60
    while client.get(f"/api/v1/datacaches/{name}").json()["status"] != "Available":
        if time.monotonic() > deadline:
            raise SystemExit(f"the cache {name} did not become Available")
        time.sleep(0.1)


def traffic(url: str, stop: threading.Event) -> None:
    body = {"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP32", "data": DIGIT}]}
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            client.post("/v2/models/digits/infer", json=body)
            time.sleep(0.04)


def small(png: Path) -> None:
    """The same picture in 64 colours (flat colours and text: the difference does not
    show), a third of the bytes in git."""
    from PIL import Image

    with Image.open(png) as image:
        fewer = image.convert("RGB").quantize(64, method=Image.Quantize.MEDIANCUT)
    fewer.save(png, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ui.png")
    args = parser.parse_args()
    why = ui_browser.missing()
    if why:
        raise SystemExit(why)
    work = Path(tempfile.mkdtemp(prefix="cm-"))  # short: its paths show in the picture
    stop = threading.Event()
    try:
        digits = make_demo_model(work / "origin")
        settings = serve_settings(work / "home", workers=2, memory=2 * 1024**3)
        with HttpOrigin() as origin, RunningServer(settings, []) as server:
            client = server.client
            for name, bucket in (("digits-svm", "demo"), ("digits-svm-copy", "team-b")):
                r = client.post("/api/v1/datacaches",
                                json={"name": name, "source": str(digits), "bucket": bucket})
                r.raise_for_status()
                wait_available(client, name)
            doc = {"versions": {"v1": {"source": str(digits)}, "v2": {"source": str(digits)}},
                   "traffic": {"v1": 90, "v2": 10}}
            client.put("/api/v1/models/digits", json=doc, timeout=120).raise_for_status()
            client.post("/api/v1/models", json={"name": "digits-nightly",
                                                "source": str(digits)}).raise_for_status()
            # Two clients: one waiting for a load (v2's first request) leaves the other going.
            senders = [threading.Thread(target=traffic, args=(server.url, stop), daemon=True)
                       for _ in range(2)]
            for sender in senders:
                sender.start()
            # Three ranges of 16 MiB at once, each 64 KiB every 60 ms: about 15 s.
            origin.files["/shards/model-00001-of-00002.safetensors"] = \
                random.Random(1).randbytes(48 * 1024 * 1024)
            origin.delay_s = 0.06
            client.post("/api/v1/datacaches", json={
                "name": "llama-shard", "bucket": "demo", "path": "llama/shard-1",
                "source": origin.url("/shards/model-00001-of-00002.safetensors"),
            }).raise_for_status()
            with ui_browser.launch() as browser:
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.goto(f"{server.url}/ui?interval=500")
                page.wait_for_selector('tr[data-model="digits"]')
                time.sleep(7)  # the chart fills, the pull moves on
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
            small(args.out)
            stop.set()
            for sender in senders:
                sender.join(30)
    finally:
        stop.set()
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
