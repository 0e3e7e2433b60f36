"""The README's picture of /ui, made with the browser tests' own parts.

    .venv/bin/python tools/ui_screenshot.py [--out docs/ui.png] [--lone]

Starts, over fresh stores in a temporary folder, a real etcd and three real
``cachemesh serve --cluster`` nodes on loopback, ``a``, ``b`` and ``c`` in two zones
(tests/cluster/: EtcdServer, Cluster), or with ``--lone`` one server without a cluster
(tests/serve/conftest.py's RunningServer). On the node the page is taken from (``a``):
the demo's digits classifier (alone: as two caches of the same files in two buckets,
deduplicated; in a cluster, each node caches every declared version), a model with two
versions and a 90/10 traffic split that answers a stream of requests, a second model
(in a cluster, loaded on ``b`` by a request there), and a pull from a slow local origin
(tests/emulators/http_origin.py) still running when the picture is taken. Then chromium
(tests/ui/browser.py) opens /ui and saves a screenshot. Nothing leaves the machine.
Takes about 25 s.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from cachemesh.demo import make_demo_model  # noqa: E402
from tests.cluster.etcd_server import EtcdServer, etcd_binary  # noqa: E402
from tests.cluster.nodes import Cluster, wait_until  # noqa: E402
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


@contextmanager
def lone_server(work: Path) -> Iterator[tuple[str, Path, httpx.Client | None]]:
    """(the page's URL, where model sources may live, None: no second node)."""
    settings = serve_settings(work / "home", workers=2, memory=2 * 1024**3)
    with RunningServer(settings, []) as server:
        yield server.url, work / "origin", None


ZONES = {"a": "eu-1a", "b": "eu-1b", "c": "eu-1b"}


@contextmanager
def three_nodes(work: Path) -> Iterator[tuple[str, Path, httpx.Client | None]]:
    """(node a's URL, the nodes' source root, a client of node b)."""
    if etcd_binary() is None:
        raise SystemExit("etcd is not installed (apt-get install etcd-server), or use --lone")
    etcd = EtcdServer(work / "etcd")
    etcd.start()
    cluster = Cluster(work, etcd.url, "/cachemesh/")
    try:
        for name, zone in ZONES.items():
            cluster.start(name, wait=False, CACHEMESH_NODE_LABELS=f"zone={zone}")
        for name in ZONES:
            wait_until(cluster[name].live, 60, f"node {name} to listen")
        cluster.wait_members(list(ZONES))
        yield cluster["a"].url, cluster.origin, cluster["b"].http
    finally:
        cluster.stop()
        etcd.stop()


def records_complete(client: httpx.Client) -> bool:
    """Every node's record carries its budget, and b's the copy it loaded (records are
    written at most every 5 s)."""
    nodes = client.get("/api/v1/nodes").json()["nodes"]
    return all(n["capacity_bytes"] for n in nodes) and any(
        c["model"] == "digits-nightly" for n in nodes if n["name"] == "b" for c in n["copies"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ui.png")
    parser.add_argument("--lone", action="store_true", help="one server, no cluster")
    args = parser.parse_args()
    why = ui_browser.missing()
    if why:
        raise SystemExit(why)
    work = Path(tempfile.mkdtemp(prefix="cm-"))  # short: its paths show in the picture
    stop = threading.Event()
    start = lone_server if args.lone else three_nodes
    try:
        with HttpOrigin() as origin, start(work) as (url, sources, other):
            digits = make_demo_model(sources)
            client = httpx.Client(base_url=url, timeout=120)
            # In a cluster, every node pulls each declared version into a cache of its own
            # (deduplicated already): two more would only lengthen the picture.
            shared = [] if other is not None else [("digits-svm", "demo"),
                                                   ("digits-svm-copy", "team-b")]
            for name, bucket in shared:
                r = client.post("/api/v1/datacaches",
                                json={"name": name, "source": str(digits), "bucket": bucket})
                r.raise_for_status()
                wait_available(client, name)
            doc = {"versions": {"v1": {"source": str(digits)}, "v2": {"source": str(digits)}},
                   "traffic": {"v1": 90, "v2": 10}}
            client.put("/api/v1/models/digits", json=doc).raise_for_status()
            client.post("/api/v1/models", json={"name": "digits-nightly",
                                                "source": str(digits)}).raise_for_status()
            if other is not None:  # a copy on b: a request there loads it there
                wait_until(lambda: other.get("/api/v1/models/digits-nightly").status_code
                           == 200, 20, "b to know digits-nightly")
                body = {"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP32",
                                    "data": DIGIT}]}
                other.post("/v2/models/digits-nightly/infer", json=body).raise_for_status()
            # Two clients: one waiting for a load (v2's first request) leaves the other going.
            senders = [threading.Thread(target=traffic, args=(url, stop), daemon=True)
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
                page.goto(f"{url}/ui?interval=500")
                page.wait_for_selector('tr[data-model="digits"]')
                time.sleep(7)  # the chart fills, the pull moves on
                if other is not None:
                    wait_until(lambda: records_complete(client), 20, "the node records")
                    time.sleep(1)  # the page's next poll
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
            small(args.out)
            stop.set()
            for sender in senders:
                sender.join(30)
            client.close()
    finally:
        stop.set()
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
