"""Benchmark: one large JSON body against a running server (issue 22, item 6).

    .venv/bin/python benchmarks/body_attack.py [--baseline REF] [--rounds 2] [--mib 62]
                                               [--concurrent 1 4] [--write-doc]

The attack: a body of ``[[0],[0],...]`` (``--mib`` MiB, under the 64 MiB limit) as
one FP32 tensor of shape ``[n, 1]``, posted to ``/v2/models/digits/infer`` (the
demo's SVM: it refuses one feature, after the tensor has reached its worker),
once, then ``k`` at a time. Meanwhile ``/v2/health/live`` is probed every 20 ms,
and the server process's RSS is sampled every 10 ms (psutil; the workers are
other processes and not counted).

``--baseline REF`` runs the same against the code of a git revision (its ``src/``
taken with ``git archive`` into a temporary folder and put first on PYTHONPATH),
alternated with the working tree round by round, on the same machine. Medians
over rounds.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024**2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def attack_body(mib: float) -> bytes:
    n = int(mib * MiB) // 4
    return (b'{"inputs":[{"name":"x","shape":[%d,1],"datatype":"FP32","data":[' % n
            + b",".join([b"[0]"] * n) + b"]}]}")


def baseline_src(ref: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


class Server:
    def __init__(self, src: Path, home: Path, model: Path) -> None:
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(src), "CACHEMESH_HOME": str(home),
               "CACHEMESH_SERVE_GRPC_PORT": "0"}
        home.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(home.parent / f"serve-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cachemesh", "serve", "--port", str(self.port),
             "--workers", "1", "--model", f"digits={model},eager=true"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        with httpx.Client(timeout=5) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited: {self.log.name}")
                try:
                    if c.get(self.url + "/v2/health/ready").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise RuntimeError("the server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def measure(server: Server, body: bytes, k: int) -> dict:
    process = psutil.Process(server.proc.pid)
    base = process.memory_info().rss
    peak, latencies, done = base, [], threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=120) as c:
            while not done.is_set():
                started = time.monotonic()
                c.get(server.url + "/v2/health/live")
                latencies.append(time.monotonic() - started)
                time.sleep(0.02)

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.01)

    def post(_: int) -> tuple[int, float]:
        started = time.monotonic()
        with httpx.Client(timeout=600) as c:
            r = c.post(server.url + "/v2/models/digits/infer", content=body)
        return r.status_code, time.monotonic() - started

    threads = [threading.Thread(target=probe), threading.Thread(target=sample)]
    for t in threads:
        t.start()
    started = time.monotonic()
    with ThreadPoolExecutor(k) as pool:
        answers = list(pool.map(post, range(k)))
    wall = time.monotonic() - started
    time.sleep(0.2)
    done.set()
    for t in threads:
        t.join()
    latencies.sort()
    return {"base": base, "peak": peak, "wall": wall, "answers": answers,
            "probe_max": latencies[-1], "probe_p50": statistics.median(latencies),
            "probes": len(latencies)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default=None, help="a git revision to compare with")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mib", type=float, default=62)
    ap.add_argument("--concurrent", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args()

    from cachemesh.demo import make_demo_model

    body = attack_body(args.mib)
    results: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="body-attack-") as tmp:
        tmp_path = Path(tmp)
        model = make_demo_model(tmp_path / "origin")
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        versions = {f"this tree ({head})": ROOT / "src"}
        if args.baseline:
            versions[f"baseline {args.baseline}"] = baseline_src(args.baseline, tmp_path)
        for r in range(args.rounds):
            order = list(versions.items())
            if r % 2:
                order.reverse()
            for k in args.concurrent:
                for name, src in order:  # a fresh server for each measurement
                    home = tmp_path / f"home-{r}-{k}-{len(name)}"
                    server = Server(src, home / "store", model)
                    try:
                        m = measure(server, body, k)
                    finally:
                        server.stop()
                    results.setdefault((name, k), []).append(m)
                    codes = ",".join(str(c) for c, _ in m["answers"])
                    print(f"round {r} {name:>20} k={k}: RSS {m['base'] / MiB:.0f} ->"
                          f" {m['peak'] / MiB:.0f} MiB, slowest probe"
                          f" {m['probe_max']:.2f} s (p50 {m['probe_p50'] * 1000:.0f} ms),"
                          f" answers {codes} in {m['wall']:.1f} s", flush=True)

    rows = []
    for (name, k), ms in results.items():
        codes = sorted({c for m in ms for c, _ in m["answers"]})
        rows.append([
            name, k,
            f"{statistics.median(m['base'] for m in ms) / MiB:.0f}",
            f"{statistics.median(m['peak'] for m in ms) / MiB:.0f}",
            f"{max(m['peak'] for m in ms) / MiB:.0f}",
            f"{statistics.median(m['probe_max'] for m in ms):.2f}",
            f"{statistics.median(m['probe_p50'] for m in ms) * 1000:.0f}",
            f"{statistics.median(m['wall'] for m in ms):.1f}",
            " ".join(str(c) for c in codes)])
    text = table(["code", "requests at once", "RSS before MiB", "peak RSS MiB (median)",
                  "peak RSS MiB (max)", "slowest health probe s", "probe p50 ms",
                  "attack wall s", "answers"], rows)
    print(text)
    if args.write_doc:
        body_text = (
            f"A body of `[[0],[0],...]` of {len(body) / MiB:.1f} MiB (one FP32 tensor"
            f" `[{len(body) // 4}, 1]`) posted to the demo's digits SVM, alone and"
            f" {max(args.concurrent)} at once, while `/v2/health/live` is probed every"
            f" 20 ms and the server process's RSS is sampled every 10 ms (workers not"
            f" counted). {args.rounds} rounds, the two versions alternated; medians."
            f" Machine: {machine()}, shared with other work.\n\n{text}\n")
        write_section("body-attack", "Body-size attack: before and after", body_text,
                      doc=ROOT / "docs" / "security.md")


if __name__ == "__main__":
    main()
