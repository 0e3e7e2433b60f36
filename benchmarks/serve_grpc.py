"""KServe V2 over gRPC against V2 REST, on the same cachemesh server, with tritonclient.

    .venv/bin/python benchmarks/serve_grpc.py [--duration 5] [--rounds 3] [--clients 4] [--no-write]

One ``cachemesh serve`` (one worker) holds two models: the digits SVM (a [1, 64]
FP32 digit in, a label out: the protocol's overhead dominates) and an echo
model (a [262144] FP32 tensor, 1 MiB, in and out: the encoding of large tensors
dominates). ``--clients`` threads, each with its own tritonclient, send
requests back to back for ``--duration`` seconds: tritonclient.grpc (raw
contents) and tritonclient.http (binary tensor extension), alternated over
rounds (reversed every other round); medians of requests/s, p50 and p99.

The clients run in this process, on the same cores as the server (say so when
quoting numbers).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CM = ROOT / ".venv" / "bin" / "cachemesh"
TOY = ROOT / "tests" / "serve" / "toy_models.py"
LARGE = 256 * 1024  # FP32 values: 1 MiB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path) -> tuple[subprocess.Popen, int, int]:
    sys.path.insert(0, str(ROOT / "src"))
    from cachemesh.demo import make_demo_model

    digits = make_demo_model(work / "origin")
    echo = work / "echo"
    echo.mkdir()
    shutil.copy(TOY, echo / "toy.py")
    (echo / "weights.bin").write_bytes(b"\0" * 1024)
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "CACHEMESH_HOME": str(work / "home")}
    log = open(work / "server.log", "a")
    proc = subprocess.Popen(
        [str(CM), "serve", "--port", str(port), "--grpc-port", str(grpc_port), "--workers", "1",
         "--model", f"digits={digits},eager=true",
         "--model", f"echo={echo},runtime=custom,class=toy:Echo,eager=true"],
        env=env, stdout=log, stderr=log, start_new_session=True)
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                return proc, port, grpc_port
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not become ready; see {work / 'server.log'}")


def make_request(kind: str, model: str):  # noqa: ANN201 - tritonclient's own types
    if kind == "grpc":
        import tritonclient.grpc as t
    else:
        import tritonclient.http as t
    if model == "digits":
        data = np.random.default_rng(0).random((1, 64), dtype=np.float32)
        out = "predict"
    else:
        data = np.random.default_rng(0).random(LARGE, dtype=np.float32)
        out = "x"
    inp = t.InferInput("x" if model == "echo" else "predict", list(data.shape), "FP32")
    if kind == "grpc":
        inp.set_data_from_numpy(data)
        outputs = [t.InferRequestedOutput(out)]
    else:
        inp.set_data_from_numpy(data, binary_data=True)
        outputs = [t.InferRequestedOutput(out, binary_data=True)]
    return inp, outputs, out


def measure(kind: str, address: str, model: str, clients: int, duration: float) -> dict:
    if kind == "grpc":
        import tritonclient.grpc as t
    else:
        import tritonclient.http as t
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def run(i: int) -> None:
        client = t.InferenceServerClient(address)
        inp, outputs, out = make_request(kind, model)
        client.infer(model, [inp], outputs=outputs).as_numpy(out)  # warm the connection
        start.wait()
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            client.infer(model, [inp], outputs=outputs).as_numpy(out)
            latencies[i].append(time.perf_counter() - t0)
        client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    stop_at[0] = time.perf_counter() + 1e9
    start.wait()
    began = time.perf_counter()
    stop_at[0] = began + duration
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - began
    flat = np.array([x for lat in latencies for x in lat]) * 1000
    return {"rate": len(flat) / elapsed, "p50": float(np.percentile(flat, 50)),
            "p99": float(np.percentile(flat, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grpc-bench-"))
    proc, port, grpc_port = start_server(work)
    load_before = os.getloadavg()
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        for model in ("digits", "echo"):
            for r in range(args.rounds):
                order = ["grpc", "http"] if r % 2 == 0 else ["http", "grpc"]
                for kind in order:
                    address = f"127.0.0.1:{grpc_port if kind == 'grpc' else port}"
                    res = measure(kind, address, model, args.clients, args.duration)
                    results.setdefault((model, kind), []).append(res)
                    print(f"{model:<7} {kind:<5} round {r + 1}: {res['rate']:8.0f} req/s"
                          f"  p50 {res['p50']:7.2f} ms  p99 {res['p99']:7.2f} ms", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for (model, kind), runs in results.items():
        what = "digits SVM, [1, 64] FP32" if model == "digits" else "echo, [262144] FP32 (1 MiB)"
        client = "tritonclient.grpc" if kind == "grpc" else "tritonclient.http (binary)"
        rows.append([what, client, f"{_report.median([x['rate'] for x in runs]):.0f}",
                     f"{_report.median([x['p50'] for x in runs]):.2f}",
                     f"{_report.median([x['p99'] for x in runs]):.2f}"])
    table = _report.table(["model, tensor", "client", "req/s", "p50 ms", "p99 ms"], rows)
    body = f"""
One `cachemesh serve --workers 1`; {args.clients} client threads (each its own
tritonclient) in the benchmark process, on the same cores as the server, sending
back to back; {args.rounds} rounds of {args.duration:g} s per client and model, clients
alternated (reversed every other round); medians.

{table}

Load average (1, 5, 15 min) at the start: {", ".join(f"{x:.1f}" for x in load_before)};
at the end: {", ".join(f"{x:.1f}" for x in os.getloadavg())}.
"""
    print(body)
    if not args.no_write:
        _report.write_section("grpc", "KServe V2 gRPC against REST (tritonclient)", body)


if __name__ == "__main__":
    main()
