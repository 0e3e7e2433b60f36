"""Load and soak: mixed traffic over many models, with churn, at ~80% of capacity.

    .venv/bin/python benchmarks/soak.py [--minutes 5] [--models 40] [--rate auto]
        [--workers 2] [--memory auto] [--json out.json] [--write-doc]

1. Models: ``--models`` small scikit-learn models (KNN on random data, 4-12 MiB
   each, so a worker's memory grows with what it holds), generated under
   ``--work``. Three quarters are served from the start (``--config``); the
   rest are deployed at run time, and served ones removed, through the control
   API (``POST``/``DELETE /api/v1/models``) every ``--churn-every`` seconds.
2. A real ``cachemesh serve`` on loopback, ``--workers`` workers, a memory
   budget (``--memory auto``: the workers' own memory plus a quarter of the
   models, measured by a short calibration run) that forces eviction churn.
3. Capacity: closed loop, ``--concurrency`` clients, the same mix, for
   ``--calibrate`` seconds. Then an open loop at ``--rate`` requests/s (``auto``:
   80% of that capacity), Zipf-distributed over the served models, for
   ``--minutes``.
4. Report, per interval: requests, errors, p50/p99 latency, the server's and
   the workers' RSS (psutil); errors by kind over the run; loads and evictions
   from /metrics. ``--json`` writes it all; ``--write-doc`` writes the table to
   docs/reliability.md. A model removed by churn leaves the traffic before it is
   removed, so every error counted is the server's.

The load generator shares the machine's cores with the server: say so when
quoting numbers. ``tests/faults/test_soak_short.py`` runs a 20-second version.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
MIB = 1024 * 1024
BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP64",
                               "data": [0.5] * 16}]}).encode()
ZIPF_S = 1.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_models(root: Path, n: int) -> list[Path]:
    """``n`` KNN classifiers (32000-96000 samples x 16 features: 4-12 MiB each)."""
    import joblib
    import numpy as np
    from sklearn.neighbors import KNeighborsClassifier

    dirs = []
    for i in range(n):
        d = root / f"m{i:03d}"
        dirs.append(d)
        if (d / "model.joblib").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        rows = 32000 * (1 + i % 3)
        clf = KNeighborsClassifier(n_neighbors=3, algorithm="brute").fit(
            rng.random((rows, 16)), rng.integers(0, 10, rows))
        joblib.dump(clf, d / "model.joblib.tmp")
        (d / "model.joblib.tmp").rename(d / "model.joblib")
    return dirs


try:
    _LIBC = ctypes.CDLL("libc.so.6")  # loaded here: the child only calls into it
except OSError:
    _LIBC = None


def _term_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the thread that started it dies (a
    killed test run), since its own session keeps it out of the terminal's signals."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """``cachemesh serve`` in its own session, on a free loopback port."""

    def __init__(self, home: Path, config: Path, workers: int, memory: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The churn deploys model folders from work/origin over the API.
        env = {**os.environ, "CACHEMESH_HOME": str(home),
               "CACHEMESH_SERVE_SOURCE_ROOTS": str(config.parent / "origin")}
        self._log = open(log, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cachemesh", "serve", "--port", str(self.port),
             "--workers", str(workers), "--memory", memory, "--config", str(config),
             "--grpc-port", "0"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_term_with_parent)  # noqa: PLW1509 (no lock taken in the child)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {log}")
            try:
                if self.client.get("/v2/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready; see {log}")
            time.sleep(0.1)

    def rss(self) -> tuple[int, int]:
        """(server RSS, all workers' RSS) in bytes."""
        try:
            me = psutil.Process(self.proc.pid)
            server = me.memory_info().rss
            workers = 0
            for child in me.children(recursive=True):
                try:
                    workers += child.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            return server, workers
        except psutil.NoSuchProcess:
            return 0, 0

    def metric(self, name: str) -> float:
        text = self.client.get("/metrics").text
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([\d.e+]+)$", text, re.MULTILINE))

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def write_config(path: Path, models: list[Path]) -> None:
    path.write_text("models:\n" + "".join(
        f"  - {{name: {d.name}, source: '{d}'}}\n" for d in models))


def calibrate_budget(work: Path, models: list[Path], workers: int, hold: int) -> int:
    """The workers' own memory plus ``hold`` models, measured on a throwaway server."""
    config = work / "calibrate.yaml"
    write_config(config, models[:workers])
    server = Server(work / "calibrate-home", config, workers, "64GiB", work / "calibrate.log")
    try:
        for d in models[:workers]:  # one model per worker: each imports sklearn
            r = server.client.post(f"/v2/models/{d.name}/infer", content=BODY)
            r.raise_for_status()
        info = server.client.get("/api/v1/models").json()
    finally:
        server.stop()
    # A load is admitted on its predicted size (bytes on disk x 1.5), not what it measures.
    predicted = 1.5 * max((d / "model.joblib").stat().st_size for d in models)
    bases = sum(w["base_bytes"] for w in info["memory"]["workers"] if w["alive"])
    return int(bases + 8 * MIB + (hold + 0.5) * predicted)


@dataclass
class Traffic:
    """The served models, in Zipf rank order, and every request's outcome."""

    active: list[str]
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    lock: threading.Lock = field(default_factory=threading.Lock)
    records: list[tuple[float, float, str]] = field(default_factory=list)  # (t, s, kind)
    local: threading.local = field(default_factory=threading.local)

    def pick(self) -> str:
        with self.lock:
            weights = [1 / (i + 1) ** ZIPF_S for i in range(len(self.active))]
            return self.rng.choices(self.active, weights)[0]

    def client(self, url: str) -> httpx.Client:
        c = getattr(self.local, "client", None)
        if c is None:
            c = self.local.client = httpx.Client(base_url=url, timeout=60)
        return c

    def send(self, url: str, t0: float) -> str:
        model = self.pick()
        started = time.monotonic()
        try:
            r = self.client(url).post(f"/v2/models/{model}/infer", content=BODY,
                                      headers={"content-type": "application/json"})
            kind = "ok" if r.status_code == 200 else f"http {r.status_code}"
            if kind != "ok":
                kind += f": {r.text[:120]}"
        except httpx.TimeoutException:
            kind = "timeout"
        except httpx.HTTPError as exc:
            kind = f"connection: {type(exc).__name__}"
        with self.lock:
            self.records.append((started - t0, time.monotonic() - started, kind))
        return kind


def measure_capacity(url: str, traffic: Traffic, seconds: float, concurrency: int) -> float:
    stop = time.monotonic() + seconds
    done = Counter()

    def loop() -> None:
        while time.monotonic() < stop:
            done[traffic.send(url, 0.0) == "ok"] += 1

    threads = [threading.Thread(target=loop) for _ in range(concurrency)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with traffic.lock:
        traffic.records.clear()
    return done[True] / (time.monotonic() - started)


def churn(server: Server, traffic: Traffic, spare: list[Path], dirs: dict[str, Path],
          every: float, stop: threading.Event, log: list[dict], t0: float) -> None:
    """Every ``every`` seconds: deploy a spare model, and remove a served one (out of
    the traffic first, so no request of ours targets a model being removed)."""
    rng = random.Random(11)
    removed: list[Path] = []
    while not stop.wait(every):
        entry: dict[str, Any] = {"t": round(time.monotonic() - t0, 1)}
        pool = spare or removed
        if pool:
            d = pool.pop(0)
            r = server.client.post("/api/v1/models", json={"name": d.name, "source": str(d)})
            entry["deploy"] = d.name
            entry["deploy_status"] = r.status_code
            deadline = time.monotonic() + 60
            while server.client.get(f"/api/v1/models/{d.name}").json().get("state") == "Pulling":
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            with traffic.lock:
                traffic.active.insert(rng.randrange(3, len(traffic.active) + 1), d.name)
        with traffic.lock:
            victim = traffic.active.pop(rng.randrange(3, len(traffic.active)))
        time.sleep(1.0)  # requests already sent to it finish
        r = server.client.delete(f"/api/v1/models/{victim}")
        entry["remove"] = victim
        entry["remove_status"] = r.status_code
        removed.append(dirs[victim])
        log.append(entry)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = make_models(work / "origin", args.models)
    served = models[: max(4, args.models * 3 // 4)]
    spare = models[len(served):]
    memory = args.memory
    if memory == "auto":
        memory = str(calibrate_budget(work, models, args.workers, max(2, args.models // 4)))
    config = work / "soak.yaml"
    write_config(config, served)
    home = work / f"home-{os.getpid()}-{int(time.time())}"
    server = Server(home, config, args.workers, memory, work / "soak.log")
    traffic = Traffic(active=[d.name for d in served])
    samples: list[tuple[float, int, int]] = []
    churn_log: list[dict] = []
    stop = threading.Event()
    try:
        for name in list(traffic.active):  # warm: every model loaded once (and evictions begun)
            server.client.post(f"/v2/models/{name}/infer", content=BODY)
        capacity = measure_capacity(server.url, traffic, args.calibrate, args.concurrency)
        rate = capacity * 0.8 if args.rate == "auto" else float(args.rate)
        duration = args.minutes * 60
        interval = args.interval or max(duration / 10, 2.0)
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic() - t0, *server.rss()))
                stop.wait(0.5)

        threads = [threading.Thread(target=sample, daemon=True),
                   threading.Thread(target=churn, daemon=True, args=(
                       server, traffic, list(spare), {d.name: d for d in models},
                       args.churn_every, stop, churn_log, t0))]
        for t in threads:
            t.start()
        loads0 = server.metric("cachemesh_model_load_seconds_count")
        evictions0 = server.metric("cachemesh_evictions_total")
        backlog = Counter()
        with ThreadPoolExecutor(args.concurrency * 4, "soak") as pool:
            pending: set = set()
            n = 0
            while True:
                due = t0 + n / rate
                now = time.monotonic()
                if due - t0 >= duration:
                    break
                if due > now:
                    time.sleep(due - now)
                pending = {f for f in pending if not f.done()}
                if len(pending) >= args.concurrency * 4:
                    backlog["skipped: client saturated"] += 1  # the generator's limit, not an error
                else:
                    pending.add(pool.submit(traffic.send, server.url, t0))
                n += 1
        stop.set()
        for t in threads:
            t.join(120)
        loads = server.metric("cachemesh_model_load_seconds_count") - loads0
        evictions = server.metric("cachemesh_evictions_total") - evictions0
        final_models = server.client.get("/api/v1/models").json()
    finally:
        stop.set()
        server.stop()
    records = traffic.records
    errors = Counter(kind for _, _, kind in records if kind != "ok")
    intervals = []
    edges = [i * interval for i in range(int(duration // interval) + 1)]
    if edges[-1] < duration:
        edges.append(duration)
    for lo, hi in pairwise(edges):
        lat = [s for t, s, k in records if lo <= t < hi and k == "ok"]
        errs = sum(1 for t, _, k in records if lo <= t < hi and k != "ok")
        mem = [(sv, wk) for t, sv, wk in samples if lo <= t < hi]
        intervals.append({
            "start_s": round(lo, 1), "end_s": round(hi, 1), "requests": len(lat) + errs,
            "errors": errs, "rps": round((len(lat) + errs) / (hi - lo), 1),
            "p50_ms": round(1000 * percentile(lat, 0.5), 2),
            "p99_ms": round(1000 * percentile(lat, 0.99), 2),
            "server_rss_mib": round(max((m[0] for m in mem), default=0) / MIB, 1),
            "workers_rss_mib": round(max((m[1] for m in mem), default=0) / MIB, 1),
        })
    return {
        "minutes": args.minutes, "models": args.models, "workers": args.workers,
        "memory_budget_mib": round(int(memory) / MIB, 1) if str(memory).isdigit() else memory,
        "capacity_rps": round(capacity, 1), "target_rps": round(rate, 1),
        "achieved_rps": round(len(records) / duration, 1),
        "requests": len(records), "errors": sum(errors.values()), "errors_by_kind": dict(errors),
        "client_skipped": sum(backlog.values()), "loads": loads, "evictions": evictions,
        "churn": churn_log, "intervals": intervals,
        "models_at_end": len(final_models["models"]),
    }


def render(result: dict[str, Any]) -> str:
    rows = [[f"{i['start_s']:.0f}-{i['end_s']:.0f}", i["requests"], i["errors"], i["rps"],
             i["p50_ms"], i["p99_ms"], i["server_rss_mib"], i["workers_rss_mib"]]
            for i in result["intervals"]]
    head = (f"{result['models']} models ({result['models_at_end']} at the end),"
            f" {result['workers']} workers, budget {result['memory_budget_mib']} MiB;"
            f" capacity {result['capacity_rps']} req/s (closed loop), target"
            f" {result['target_rps']} req/s, achieved {result['achieved_rps']} req/s;"
            f" {result['requests']} requests,"
            f" {result['errors']} errors {result['errors_by_kind'] or ''};"
            f" {result['loads']:.0f} loads, {result['evictions']:.0f} evictions,"
            f" {len(result['churn'])} deploy+remove rounds;"
            f" {result['client_skipped']} sends skipped by a saturated client\n\n")
    return head + _report.table(["seconds", "requests", "errors", "req/s", "p50 ms", "p99 ms",
                                 "server RSS MiB", "workers RSS MiB (max)"], rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--models", type=int, default=40)
    p.add_argument("--rate", default="auto",
                   help="requests/s, or auto: 80%% of the measured capacity")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory", default="auto", help="budget in bytes or with a unit, or auto")
    p.add_argument("--concurrency", type=int, default=8, help="clients of the capacity run")
    p.add_argument("--calibrate", type=float, default=5.0, help="seconds of the capacity run")
    p.add_argument("--churn-every", type=float, default=5.0)
    p.add_argument("--interval", type=float, default=0.0, help="seconds per row (default: 10 rows)")
    p.add_argument("--work", default=str(ROOT / ".bench" / "soak"))
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--write-doc", action="store_true",
                   help="write the table to docs/reliability.md")
    args = p.parse_args(argv)
    if args.rate != "auto" and not float(args.rate) > 0:
        p.error("--rate must be positive or auto")
    result = run(args)
    text = render(result)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.write_doc:
        _report.write_section("soak", "Soak: mixed traffic with churn at ~80% of capacity",
                              text + "\n\nMeasured on a shared, loaded 2-core machine; the"
                              " load generator runs on the same cores.", doc=DOC)
    return result


if __name__ == "__main__":
    main()
