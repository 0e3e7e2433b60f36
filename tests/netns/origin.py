"""The origin of the namespace tests and the fleet benchmark: the Hugging Face emulator,
counting every byte it serves into a file the test reads from outside the namespace.

    python -m tests.netns.origin --host 10.213.0.9 --port 8080 --blob-port 8081 \\
        --repo org/name=/path/to/model [--repo ...] --stats /tmp/origin-stats.json

Prints ``{"endpoint": ..., "blob_origin": ...}`` once it serves, then rewrites the stats
file (``{"served": bytes, "by_sha256": {...}}``, atomically) whenever the count changes,
until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from tests.emulators.hf_hub import HfHubEmulator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--blob-port", type=int, default=8081)
    parser.add_argument("--repo", action="append", default=[], metavar="ORG/NAME=DIR")
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args(argv)
    hub = HfHubEmulator(host=args.host, port=args.port, blob_port=args.blob_port)
    for spec in args.repo:
        repo_id, _, directory = spec.partition("=")
        files = {p.relative_to(directory).as_posix(): p
                 for p in sorted(Path(directory).rglob("*")) if p.is_file()}
        hub.commit(repo_id, files, message="import")
    hub.start()
    print(json.dumps({"endpoint": hub.url, "blob_origin": hub.blob_origin.url}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    last = None
    while not stop.wait(0.05):
        by_sha = dict(hub.blob_origin.served)
        served = sum(by_sha.values()) + sum(hub.served.values())
        if served != last:
            tmp = args.stats.with_name(args.stats.name + ".tmp")
            tmp.write_text(json.dumps({"served": served, "by_sha256": by_sha}))
            os.replace(tmp, args.stats)
            last = served
    hub.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
