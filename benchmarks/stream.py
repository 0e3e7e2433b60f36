"""Streaming from the origin: time to the first tensor and to the last, against pulling first.

    .venv/bin/python benchmarks/stream.py                          # 2 GB, loopback, 5 rounds
    .venv/bin/python benchmarks/stream.py --rate 25MB              # 25 MB/s per connection
    .venv/bin/python benchmarks/stream.py --size 128MB --rounds 2  # smoke run

One safetensors file of bf16 tensors of 8 MiB each (``--size`` in all) is made
under ``.bench/stream/`` and served by nginx on loopback (sendfile, ranges;
``--rate`` sets nginx's ``limit_rate`` per connection, to stand in for a remote
origin; cachemesh opens ``--parallel`` ranged connections). Each round runs, in
a rotating order, each in a fresh process with a fresh ``CACHEMESH_HOME``:

- ``stream``: ``cachemesh.iter_tensors("http://…/model.safetensors")``: the
  pull starts and tensors are read from the fetcher's partial file as they
  land; the stream ends once the file was checked and committed;
- ``pull, then load``: the same call with ``stream_origin=False``: the pull
  (verified, committed), then the loader reads the cached file;
- ``pull only`` (reference): ``cachemesh.pull`` of the same URL, the download alone.

Times are from the call to the first tensor handed out ("first") and to the
end of the iteration ("total"), inside the worker after its imports (torch and
cachemesh are imported before the clock starts, for every tool alike). The
origin's file is read before every run, so nginx serves it from the page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench" / "stream"
TENSOR_BYTES = 8 * 1024 * 1024
TOOLS = ("stream", "pull, then load", "pull only")


def make_model(total: int) -> Path:
    """The origin's file, made once per size."""
    path = BENCH / "origin" / "model.safetensors"
    stamp = BENCH / "origin" / "model.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("total") == total and path.exists():
        path.chmod(0o644)
        return path
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    n = max(1, total // TENSOR_BYTES)
    tensors = {f"layers.{i:04d}.weight": torch.randn(2048, 2048, generator=gen).bfloat16()
               for i in range(n)}
    save_file(tensors, path)
    path.chmod(0o644)  # nginx's workers read it as another user
    stamp.write_text(json.dumps({"total": total}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    def __init__(self, root: Path, rate: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cachemesh-bench-stream-"))
        self.root, self.rate, self.port = root, rate, free_port()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        limit = f"limit_rate {self.rate};" if self.rate else ""
        (self.dir / "nginx.conf").write_text(f"""
worker_processes 2;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  keepalive_requests 100000;
  default_type application/octet-stream;
  server {{ listen 127.0.0.1:{self.port}; root {self.root}; {limit} }}
}}
""")
        self.proc = subprocess.Popen(["/usr/sbin/nginx", "-c", str(self.dir / "nginx.conf"),
                                      "-p", str(self.dir)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not start") from None
                time.sleep(0.05)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the worker: one load in a fresh process -------------------------------------------------

def _worker(tool: str, url: str) -> None:
    import torch  # noqa: F401 - imported before the clock, for every tool alike

    import cachemesh
    import cachemesh.load.origin  # noqa: F401
    import cachemesh.load.stream  # noqa: F401

    t0 = time.perf_counter()
    first = None
    tensors = nbytes = 0
    if tool == "pull only":
        cachemesh.pull(url)
    else:
        with cachemesh.iter_tensors(url, stream_origin=(tool == "stream")) as stream:
            for _, tensor in stream:
                if first is None:
                    first = time.perf_counter() - t0
                tensors += 1
                nbytes += tensor.nbytes
    total = time.perf_counter() - t0
    print(json.dumps({"first": first, "total": total, "tensors": tensors, "bytes": nbytes}))


def run_tool(tool: str, url: str, parallel: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix="cachemesh-bench-stream-home-"))
    env = {**os.environ, "CACHEMESH_HOME": str(home),
           "CACHEMESH_RANGE_CONCURRENCY": str(parallel)}
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", tool, url],
                              env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed: {proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(home, ignore_errors=True)
        subprocess.run(["sync"], check=False)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2GB", help="model size (default 2GB)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=8, help="cachemesh's ranged connections")
    parser.add_argument("--rate", default="0",
                        help="nginx limit_rate per connection, e.g. 25MB (default: none)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(*args.worker)
        return

    from cachemesh.config import parse_size

    total = parse_size(args.size)
    rate = parse_size(args.rate) if args.rate not in ("0", "") else 0
    path = make_model(total)
    size = path.stat().st_size
    print(f"model: {size / 1e9:.2f} GB in {max(1, total // TENSOR_BYTES)} tensors at {path}",
          flush=True)
    results: dict[str, list[dict]] = {t: [] for t in TOOLS}
    loads = []
    with Nginx(path.parent, rate) as nginx:
        url = nginx.url(path.name)
        for r in range(args.rounds):
            order = TOOLS[r % len(TOOLS):] + TOOLS[:r % len(TOOLS)]
            for tool in order:
                warm(path)
                loads.append(os.getloadavg()[0])
                out = run_tool(tool, url, args.parallel)
                results[tool].append(out)
                first = "" if out["first"] is None else f"first {out['first']:.2f} s, "
                print(f"round {r + 1} {tool}: {first}total {out['total']:.2f} s", flush=True)
    report(args, size, rate, results, loads)


def report(args: argparse.Namespace, size: int, rate: int, results: dict[str, list[dict]],
           loads: list[float]) -> None:
    med = _report.median
    pull = med([o["total"] for o in results["pull only"]])
    rows = []
    for tool in TOOLS:
        runs = results[tool]
        first = [o["first"] for o in runs if o["first"] is not None]
        total = med([o["total"] for o in runs])
        rows.append([
            tool,
            f"{med(first):.2f}" if first else "",
            f"{med(first) / pull:.2f}" if first else "",
            f"{total:.2f}",
            f"{min(o['total'] for o in runs):.2f}–{max(o['total'] for o in runs):.2f}",
            f"{size / total / 1e6:.0f}",
        ])
    smoke = (" A smoke run at a small size: the default is `--size 2GB`."
             if size < 1e9 else "")
    origin = (f"nginx on loopback, `limit_rate {rate / 1e6:.0f} MB/s` per connection"
              if rate else "nginx on loopback, no rate limit")
    body = f"""
{size / 1e9:.2f} GB in one safetensors file (bf16 tensors of 8 MiB), {origin}; cachemesh
opens {args.parallel} ranged connections. {args.rounds} round(s), tools in a rotating order,
each in a fresh process and a fresh `CACHEMESH_HOME`; medians. The origin's file is in the
page cache. Times run from the call (imports done) to the first tensor and to the end of the
iteration; every tool ends after the file was checked (plain http publishes no checksum: the
size; the sha256 is computed in every case, it names the blob) and committed. "first / pull"
is the time to the first tensor over the download alone (`pull only`, the reference).

{_report.table(["tool", "first tensor s", "first / pull", "total s", "min–max", "MB/s"], rows)}

Load average during the runs: median {med(loads):.1f} on {os.cpu_count()} cores (other sessions
share this machine; timings are noisy).{smoke}

What bounds the first tensor: a tensor is handed out once every byte of it landed. The
fetcher cuts the head of an object that a loader watches into pieces of 256 KiB, doubling up
to its 16 MiB chunk, so the header and the first tensors arrive first even with
{args.parallel} connections in flight; with a per-connection rate limit the piece that ends
the first 8 MiB tensor (4 MiB) still takes 4 MiB / rate. What bounds the total: the
download. The loader copies what the fetcher just wrote out of the page cache (the origin
serves every byte once, `tests/load/test_stream_origin.py` counts them), and the stream ends
only after the fetcher verified and committed the file, as a pull does.
"""
    print(body)
    if not args.no_write:
        _report.write_section("stream", "Loading from the origin: streaming vs pull first", body)


if __name__ == "__main__":
    main()
