"""Model server throughput and density: cachemesh against MLServer, same machine, same wrk.

    .venv/bin/python benchmarks/serve.py [--duration 10] [--rounds 3] [--quick]

1. Throughput: the digits SVM (sklearn SVC on load_digits, joblib) over KServe V2
   REST, wrk with 16 connections posting a V2 JSON body. cachemesh as shipped
   (worker processes; 1 and 2 workers) against MLServer 1.7 at each
   ``parallel_workers`` setting of the sweep, alternated over rounds; medians.
2. Density: 50 small sklearn models (KNN, ~4 MiB each), a memory budget that
   holds 10 of them besides the workers' own memory, Zipf-distributed traffic
   (wrk, Lua): hit rate, p50/p99, and the workers' RSS sampled against the budget.

MLServer runs from its own virtual environment, ``.bench/mlserver`` (made on
first use: mlserver and mlserver-sklearn 1.7, uvloop<0.21, the same
scikit-learn as ours). Everything listens on loopback; the load generator
shares the machine's cores with the servers (say so when quoting numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
CM = ROOT / ".venv" / "bin" / "cachemesh"
MLSERVER_VENV = BENCH / "mlserver"
CONNECTIONS = 16

POST_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[%s]]
"""

ZIPF_LUA = """
local n, s = %d, %f
local cdf, total = {}, 0
for i = 1, n do total = total + 1 / (i ^ s); cdf[i] = total end
for i = 1, n do cdf[i] = cdf[i] / total end
local body = [[%s]]
local headers = {["Content-Type"] = "application/json"}
function setup(thread) thread:set("seed", math.random(1, 1000000)) end
function init(args) math.randomseed(seed) end
request = function()
  local u, i = math.random(), 1
  while cdf[i] < u do i = i + 1 end
  return wrk.format("POST", "/v2/models/m" .. string.format("%%02d", i - 1) .. "/infer", headers, body)
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_mlserver() -> Path:
    python = MLSERVER_VENV / "bin" / "python"
    if not (MLSERVER_VENV / "bin" / "mlserver").exists():
        import sklearn

        subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "mlserver==1.7.*",
                        "mlserver-sklearn==1.7.*", f"scikit-learn=={sklearn.__version__}",
                        "uvloop<0.21"], check=True)
    return MLSERVER_VENV / "bin" / "mlserver"


def wait_ready(url: str, model: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v2/models/{model}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready in {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / hz
        except (OSError, IndexError, ValueError):
            pass
    return out


def wrk(url: str, script: Path, duration: float, threads: int = 2) -> dict:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{CONNECTIONS}", f"-d{duration:g}s", "--latency",
         "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        lat[pct] = float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rate": rate, "p50": lat["50"], "p99": lat["99"], "requests": total,
            "non2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else "", "raw": out}


# -- the systems under test ----------------------------------------------------------


def make_digits(work: Path) -> tuple[Path, str]:
    from sklearn import datasets

    sys.path.insert(0, str(ROOT / "src"))
    from cachemesh.demo import make_demo_model

    model_dir = make_demo_model(work / "origin")
    digits = datasets.load_digits()
    row = (digits.images[1000].reshape(-1) / 16.0).round(4).tolist()
    body = json.dumps({"inputs": [{"name": "predict", "shape": [1, 64], "datatype": "FP32",
                                   "data": row}]})
    return model_dir, body


def start_cachemesh(work: Path, model_dir: Path, workers: int, port: int) -> subprocess.Popen:
    env = {**os.environ, "CACHEMESH_HOME": str(work / "cm-home")}
    log = open(work / f"cachemesh-{workers}.log", "a")
    return subprocess.Popen(
        [str(CM), "serve", "--port", str(port), "--workers", str(workers),
         "--model", f"digits={model_dir},eager=true"],
        env=env, stdout=log, stderr=log, start_new_session=True)


def start_mlserver(work: Path, model_dir: Path, parallel_workers: int, port: int) -> subprocess.Popen:
    repo = work / f"mlserver-{parallel_workers}"
    if repo.exists():
        shutil.rmtree(repo)
    (repo / "digits").mkdir(parents=True)
    shutil.copy(model_dir / "model.joblib", repo / "digits" / "model.joblib")
    (repo / "digits" / "model-settings.json").write_text(json.dumps({
        "name": "digits", "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib"}}))
    (repo / "settings.json").write_text(json.dumps({
        "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
        "parallel_workers": parallel_workers, "debug": False}))
    log = open(work / f"mlserver-{parallel_workers}.log", "a")
    return subprocess.Popen([str(ensure_mlserver()), "start", str(repo)], cwd=repo,
                            stdout=log, stderr=log, start_new_session=True)


def throughput(work: Path, duration: float, rounds: int, cm_workers: list[int],
               ml_workers: list[int]) -> tuple[str, dict]:
    model_dir, body = make_digits(work)
    script = work / "post.lua"
    script.write_text(POST_LUA % body)
    configs = [("cachemesh", w) for w in cm_workers] + [("mlserver", w) for w in ml_workers]
    results: dict[tuple[str, int], list[dict]] = {c: [] for c in configs}
    for r in range(rounds):
        order = configs if r % 2 == 0 else list(reversed(configs))
        for system, workers in order:
            port = free_port()
            start = start_cachemesh if system == "cachemesh" else start_mlserver
            proc = start(work, model_dir, workers, port)
            try:
                url = f"http://127.0.0.1:{port}"
                wait_ready(url, "digits", proc)
                check = httpx.post(f"{url}/v2/models/digits/infer", content=body, timeout=60).json()
                assert check["outputs"][0]["data"] == [1], check
                wrk(f"{url}/v2/models/digits/infer", script, 2)  # warm up
                pids = process_tree(proc.pid)
                before = cpu_seconds(pids)
                res = wrk(f"{url}/v2/models/digits/infer", script, duration)
                after = cpu_seconds(pids)
                per = [1e6 * (after[p] - before[p]) / res["requests"] for p in pids
                       if p in before and p in after]
                res["cpu_main"] = per[0] if per else 0.0
                res["cpu_rest"] = sum(per[1:])
            finally:
                stop(proc)
            results[(system, workers)].append(res)
            print(f"round {r + 1} {system:<9} workers={workers}: {res['rate']:8.0f} req/s"
                  f"  p50 {res['p50']:6.2f} ms  p99 {res['p99']:6.2f} ms  non-2xx {res['non2xx']}",
                  flush=True)
    med = {c: {k: _report.median([x[k] for x in v])
               for k in ("rate", "p50", "p99", "cpu_main", "cpu_rest")}
           for c, v in results.items()}
    best_ml = max((c for c in configs if c[0] == "mlserver"), key=lambda c: med[c]["rate"])
    rows = []
    for c in configs:
        m = med[c]
        label = label_of(c)
        rates = ", ".join(f"{x['rate']:.0f}" for x in results[c])
        rows.append([label, f"{m['rate']:.0f}", rates, f"{m['p50']:.2f}", f"{m['p99']:.2f}",
                     f"{m['rate'] / med[best_ml]['rate']:.2f}x",
                     f"{m['cpu_main']:.0f} + {m['cpu_rest']:.0f}",
                     sum(x["non2xx"] for x in results[c])])
    table = _report.table(["server", "req/s (median)", "req/s per round", "p50 ms", "p99 ms",
                           "vs best MLServer", "CPU us/request (main + workers)", "non-2xx"],
                          rows)
    best_cm = max((c for c in configs if c[0] == "cachemesh"), key=lambda c: med[c]["rate"])
    paired = [a["rate"] / b["rate"] for a, b in zip(results[best_cm], results[best_ml], strict=True)]
    return table, {"median": med, "best_mlserver": best_ml, "paired": paired, "runs": results}


def label_of(config: tuple[str, int]) -> str:
    system, workers = config
    return (f"cachemesh serve --workers {workers}" if system == "cachemesh"
            else f"MLServer 1.7 parallel_workers={workers}")


def throughput_results(runs: dict[tuple[str, int], list[dict]]) -> list[dict]:
    """The runs of each configuration as docs/results/serve.json keeps them (plots.py)."""
    return [{"label": label_of(c), "system": c[0], "workers": c[1],
             "runs": [{k: v for k, v in r.items() if k != "raw"} for r in each]}
            for c, each in runs.items()]


# -- IPC -------------------------------------------------------------------------------

NOOP = """
from cachemesh.runtimes import InferenceResponse, Runtime
class Noop(Runtime):
    def predict(self, request):
        return InferenceResponse(request.inputs)
"""


def ipc_costs(work: Path) -> str:
    """Round trips to one worker process through the socket and pickle 5 frames."""
    import asyncio

    import numpy as np

    sys.path.insert(0, str(ROOT / "src"))
    from cachemesh.runtimes import InferenceRequest, Tensor, resolve
    from cachemesh.serve.workers.messages import Infer, Load
    from cachemesh.serve.workers.workers import WorkerHandle

    d = work / "noop"
    d.mkdir(exist_ok=True)
    (d / "noop.py").write_text(NOOP)

    async def run() -> list[list[str]]:
        w = WorkerHandle(1, lambda _: None)
        await w.start(memory_limit=None, threads=1)
        r = resolve(d, "custom", {"class": "noop:Noop"})
        await w.call(Load("noop", "custom", r.settings("noop", d)))
        rows = []
        for label, shape in (("[1, 64] FP32 (256 B)", (1, 64)),
                             ("[1, 1048576] FP32 (4 MiB, out of band)", (1, 1 << 20))):
            req = InferenceRequest([Tensor.of("x", np.ones(shape, dtype=np.float32))])
            n = 2000 if shape[1] == 64 else 100
            t = time.perf_counter()
            for _ in range(n):
                await w.call(Infer("noop", req))
            seq = (time.perf_counter() - t) / n
            t = time.perf_counter()
            for _ in range(n // 20):
                await asyncio.gather(*(w.call(Infer("noop", req)) for _ in range(20)))
            piped = (time.perf_counter() - t) / n
            rows.append([label, f"{seq * 1e6:.0f}", f"{1 / piped:.0f}",
                         f"{2 * np.prod(shape) * 4 / piped / 2**30:.2f}" if shape[1] > 64 else "-"])
        await w.stop()
        return rows

    rows = asyncio.run(run())
    return _report.table(["payload (request and reply)", "round trip us (one at a time)",
                          "round trips/s (20 in flight)", "GiB/s both ways"], rows)


# -- density -------------------------------------------------------------------------


def make_small_models(work: Path, n: int) -> Path:
    import joblib
    import numpy as np
    from sklearn.neighbors import KNeighborsClassifier

    root = work / "density-origin"
    for i in range(n):
        d = root / f"m{i:02d}"
        if (d / "model.joblib").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        x = rng.random((8000, 64))
        y = rng.integers(0, 10, 8000)
        clf = KNeighborsClassifier(n_neighbors=3, algorithm="brute").fit(x, y)
        joblib.dump(clf, d / "model.joblib")
    return root


def sample_rss(url: str, stop_event: threading.Event, samples: list[int]) -> None:
    pids: list[int] = []
    while not stop_event.is_set():
        if not pids:
            try:
                mem = httpx.get(f"{url}/api/v1/models", timeout=5).json()["memory"]
                pids = [w["pid"] for w in mem["workers"] if w["alive"]]
            except httpx.HTTPError:
                pass
        total = 0
        for pid in pids:
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf(
                    "SC_PAGE_SIZE")
            except (OSError, ValueError):
                pids = []
        samples.append(total)
        stop_event.wait(0.1)


def metric_sum(text: str, name: str) -> float:
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? ([\d.e+]+)$", text, re.M))


def density(work: Path, duration: float, n: int = 50, hold: int = 10, workers: int = 2) -> tuple[str, dict]:
    root = make_small_models(work, n)
    config = work / "density.yaml"
    config.write_text("models:\n" + "".join(
        f"  - {{name: m{i:02d}, source: '{root / f'm{i:02d}'}'}}\n" for i in range(n)))
    env = {**os.environ, "CACHEMESH_HOME": str(work / "density-home")}
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP64",
                                   "data": [0.5] * 64}]})

    def start(memory: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        log = open(work / "density.log", "a")
        proc = subprocess.Popen(
            [str(CM), "serve", "--port", str(port), "--workers", str(workers), "--memory", memory,
             "--config", str(config)], env=env, stdout=log, stderr=log, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("density server did not start")
            time.sleep(0.2)

    # Calibrate: the workers' own memory (after sklearn is imported) and one model's size.
    proc, url = start("64GiB")
    try:
        for i in range(workers):  # one model per worker, so every worker imports sklearn
            r = httpx.post(f"{url}/v2/models/m{i:02d}/infer", content=body, timeout=120)
            assert r.status_code == 200, r.text
        info = httpx.get(f"{url}/api/v1/models", timeout=30).json()
    finally:
        stop(proc)
    sizes = [m["size_bytes"] for m in info["models"] if m["size_bytes"]]
    model_size = max(sizes)
    bases = sum(w["base_bytes"] for w in info["memory"]["workers"] if w["alive"])
    budget = bases + int((hold + 0.5) * model_size)
    print(f"density: worker memory {bases / 2**20:.0f} MiB, model {model_size / 2**20:.1f} MiB,"
          f" budget {budget / 2**20:.0f} MiB (holds {hold})", flush=True)

    script = work / "zipf.lua"
    script.write_text(ZIPF_LUA % (n, 1.1, body))
    proc, url = start(str(budget))
    samples: list[int] = []
    stop_event = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(url, stop_event, samples), daemon=True)
    try:
        sampler.start()
        res = wrk(url, script, duration)
        stop_event.set()
        sampler.join()
        text = httpx.get(f"{url}/metrics", timeout=30).text
        models = httpx.get(f"{url}/api/v1/models", timeout=30).json()
    finally:
        stop_event.set()
        stop(proc)
    hits = metric_sum(text, "cachemesh_model_hits_total")
    misses = metric_sum(text, "cachemesh_model_misses_total")
    loads = metric_sum(text, "cachemesh_model_load_seconds_count")
    load_time = metric_sum(text, "cachemesh_model_load_seconds_sum")
    evictions = metric_sum(text, "cachemesh_evictions_total")
    loaded = sum(1 for m in models["models"] if m["state"] == "Ready")
    peak = max(samples) if samples else 0
    over = sum(1 for s in samples if s > budget)
    figures = {"rate": res["rate"], "p50": res["p50"], "p99": res["p99"],
               "hit_rate": hits / max(hits + misses, 1), "loads": loads, "evictions": evictions,
               "mean_load_ms": 1000 * load_time / max(loads, 1), "budget": budget, "peak_rss": peak,
               "samples": len(samples), "over": over, "non2xx": res["non2xx"], "loaded": loaded}
    rows = [[f"{n} models, budget holds {hold}, Zipf s=1.1, {workers} workers",
             f"{res['rate']:.0f}", f"{res['p50']:.2f}", f"{res['p99']:.2f}",
             f"{100 * figures['hit_rate']:.1f}%", f"{loads:.0f} ({figures['mean_load_ms']:.0f} ms)",
             f"{evictions:.0f}", f"{peak / 2**20:.0f} / {budget / 2**20:.0f} MiB",
             f"{over}/{len(samples)}", res["non2xx"]]]
    table = _report.table(["scenario", "req/s", "p50 ms", "p99 ms", "hit rate",
                           "loads (mean time)", "evictions", "peak worker RSS / budget",
                           "samples over budget", "non-2xx"], rows)
    return table, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--density-duration", type=float, default=30.0)
    parser.add_argument("--cm-workers", default="1,2")
    parser.add_argument("--ml-workers", default="0,1,2,4")
    parser.add_argument("--skip-density", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    BENCH.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="serve-", dir=BENCH))
    started = time.monotonic()
    load_before = os.getloadavg()
    ipc_table = ipc_costs(work)
    print(ipc_table)
    if args.skip_throughput:
        table, figures = density(work, args.density_duration)
        print(table, figures)
        return
    tp_table, tp = throughput(work, args.duration, args.rounds,
                              [int(x) for x in args.cm_workers.split(",")],
                              [int(x) for x in args.ml_workers.split(",")])
    print(tp_table)
    dens_table, dens = ("(skipped)", {}) if args.skip_density else density(
        work, args.density_duration)
    print(dens_table)
    med, best = tp["median"], tp["best_mlserver"]
    best_cm = max((c for c in med if c[0] == "cachemesh"), key=lambda c: med[c]["rate"])
    ratio = med[best_cm]["rate"] / med[best]["rate"]
    body = f"""
Machine: {_report.machine()}. wrk ({CONNECTIONS} connections, 2 threads) runs on the same
cores as the server under test, so every figure includes the load generator's share
of the CPU. Throughput: {args.rounds} rounds of {args.duration:g} s after a 2 s warm-up,
configurations alternated (reversed every other round), medians; each run starts a
fresh server. Body: one 8x8 digit as a V2 JSON FP32 [1, 64] tensor. MLServer 1.7.1
with mlserver-sklearn, in its own virtual environment, same scikit-learn.

### Throughput: digits SVM, KServe V2 REST, {CONNECTIONS} concurrent clients

{tp_table}

Best cachemesh (`--workers {best_cm[1]}`): {med[best_cm]['rate']:.0f} req/s, p99
{med[best_cm]['p99']:.2f} ms; best MLServer (`parallel_workers={best[1]}`):
{med[best]['rate']:.0f} req/s, p99 {med[best]['p99']:.2f} ms: **{ratio:.2f}x** the
throughput, p99 {'no worse' if med[best_cm]['p99'] <= med[best]['p99'] else 'worse'}. The same
ratio round by round (both ran in the same round, minutes apart):
{", ".join(f"{x:.2f}x" for x in tp["paired"])}.

CPU us/request: CPU time (user + system) of the server's processes during the
measured run, divided by the requests it answered; for cachemesh the first number is
the HTTP process and the second its worker processes, for MLServer the main process
and its inference workers (with parallel_workers=0 MLServer predicts in its main
process). wrk's own CPU is not in it.

### IPC between the server and a worker process

{ipc_table}

A no-op custom runtime in one worker; the request and the reply each carry the
tensor. Large tensors travel out of band (pickle protocol 5 buffers written with
`sendmsg`, no copy into the pickle).

### Density: many models under one memory budget

{dens_table}

Hit rate: requests that found their model in memory
(`cachemesh_model_hits_total` / all). The workers' RSS (their own memory plus the models)
was sampled every 100 ms from /proc during the run and compared with `--memory`.
Took {time.monotonic() - started:.0f} s in all. Load average (1, 5, 15 min) of the
machine at the start: {", ".join(f"{x:.1f}" for x in load_before)}; at the end:
{", ".join(f"{x:.1f}" for x in os.getloadavg())} (other work on the machine shows here).
"""
    if not args.no_write:
        _report.save_results("serve", {
            "rounds": args.rounds, "duration_s": args.duration, "connections": CONNECTIONS,
            "throughput": throughput_results(tp["runs"]), "density": dens})
        link = _report.plot("serve", "Serving throughput and p99, cachemesh against MLServer")
        body = body.replace(tp_table, f"{tp_table}\n\n{link}", 1) if link else body
        _report.write_section("serve", "Model server: throughput and density", body)
    print(body)


if __name__ == "__main__":
    main()
