"""One HTTP call from inside a namespace, for tests that live outside it.

    python -m tests.netns.call [--method GET] [--header 'K: V' ...] [--json BODY]
                               [--wait SECONDS] URL

Prints ``{"status": ..., "headers": {...}, "size": body bytes, "text": body (if short)}``.
``--wait`` retries a refused connection or a 5xx until the URL answers 200 (exit 1 if
it never does): how a test waits for a server to come up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import httpx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--wait", type=float, default=0.0)
    parser.add_argument("--json", default=None, help="a JSON body to send")
    args = parser.parse_args()
    headers = dict(h.split(": ", 1) for h in args.header)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            r = httpx.request(args.method, args.url, headers=headers, timeout=30,
                              trust_env=False,
                              json=json.loads(args.json) if args.json else None)
            if not args.wait or r.status_code == 200:
                break
        except httpx.HTTPError:
            if not args.wait:
                raise
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.1)
    body = r.content
    print(json.dumps({"status": r.status_code, "headers": dict(r.headers), "size": len(body),
                      "text": body.decode("utf-8", "replace") if len(body) < 1 << 20 else ""}))


if __name__ == "__main__":
    main()
