"""Cluster mode: forwarding cost, density over nodes, failover (issue 17).

    .venv/bin/python benchmarks/cluster.py [--requests 400] [--duration 20] [--size-mb 8]
                                           [--no-write]

Real ``cachemesh serve --cluster`` processes on loopback over one real etcd (Debian's
``etcd``; ``tests/cluster/etcd_server.py`` and ``tests/cluster/nodes.py`` start them, as
the tests do), 2 s leases, one worker per node. Models are a benchmark runtime written
into each model's folder: it allocates ``size`` bytes at load (real memory, reported as
its size) and echoes V2 inputs.

1. Forwarding: one model loaded on one node (copy_rate 0: no second copy); V2 REST
   requests (one connection, one at a time) to that node (answered locally) and to
   another node (forwarded once), alternated request by request in the same run: p50
   and p99 of each, and the ratio.
2. Density: 60 models; 3 nodes, each with a budget for 10, against one node with a
   budget for 30, alternated over ``--rounds`` (a one-node cluster: the same code path, nothing to forward to). Zipf
   traffic (s = 1.1) from 8 client threads, each request to a random node: hit rate
   (requests answered by a copy already in memory, summed over nodes), loads, errors,
   and the peak of each node's held memory (``/api/v1/models`` memory.held_bytes, every
   0.2 s).
3. Failover: a hot model on one node, a client sending to the others; SIGKILL of the
   holder: seconds until a request succeeds again on another node's copy, and the
   requests that failed meanwhile.

Everything shares the machine's cores with the client (say so when quoting numbers).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.cluster: the real etcd and node processes
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

from tests.cluster.etcd_server import EtcdServer  # noqa: E402
from tests.cluster.nodes import Cluster, wait_until  # noqa: E402

RUNTIME = '''
import numpy as np
from cachemesh.runtimes import InferenceResponse, Runtime, Tensor


class Bench(Runtime):
    def load(self):
        self.ballast = np.ones(int(self.settings.parameters.get("size", 1 << 20)), np.uint8)

    def memory_bytes(self):
        return int(self.ballast.nbytes)

    def predict(self, request):
        return InferenceResponse(outputs=[Tensor(t.name, t.datatype, t.shape, t.data)
                                          for t in request.inputs])
'''
BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
MiB = 1 << 20


def model_spec(origin: Path, name: str, size: int) -> dict[str, Any]:
    folder = origin / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_rt.py").write_text(RUNTIME)
    (folder / "weights.bin").write_bytes(b"\0" * 1024)
    return {"name": name, "source": str(folder), "runtime": "custom",
            "parameters": {"class": "bench_rt:Bench", "size": str(size)}}


def metric_sum(text: str, name: str) -> float:
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? ([\d.e+]+)$", text, re.M))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_cluster(root: Path, etcd: EtcdServer, names: list[str], budget: int,
                  **env: str) -> Cluster:
    cluster = Cluster(root, etcd.url, f"/bench-{uuid.uuid4().hex[:12]}/",
                      CACHEMESH_SERVE_MEMORY=str(budget), **env)
    for name in names:
        cluster.start(name, wait=False)
    for name in names:
        wait_until(cluster[name].live, 90, f"node {name} to listen")
    cluster.wait_members(names, timeout=30)
    return cluster


def deploy(cluster: Cluster, via: str, spec: dict[str, Any]) -> None:
    r = cluster[via].http.post("/api/v1/models", json=spec)
    assert r.status_code in (200, 201), r.text
    for node in cluster.nodes.values():
        wait_until(lambda n=node: n.model(spec["name"]).status_code == 200, 20,
                   f"{spec['name']} declared on {node.name}")


def stop(cluster: Cluster) -> None:
    for node in cluster.nodes.values():
        node.kill()


# -- 1. forwarding ---------------------------------------------------------------------

def forwarding(cluster: Cluster, requests: int) -> dict[str, Any]:
    deploy(cluster, "a", model_spec(cluster.origin, "lat", MiB))
    first = cluster["a"].http.post("/v2/models/lat/infer", json=BODY)
    holder = first.headers["cachemesh-node"]
    other = next(n for n in cluster.nodes if n != holder)
    wait_until(lambda: any(n["node"] == holder for v in cluster[other].model("lat").json()
                           ["versions"].values() for n in v["status"]["nodes"]), 10, "record")
    times: dict[str, list[float]] = {"local": [], "forwarded": []}
    clients = {"local": httpx.Client(base_url=cluster[holder].url, timeout=10),
               "forwarded": httpx.Client(base_url=cluster[other].url, timeout=10)}
    body = json.dumps(BODY).encode()
    headers = {"content-type": "application/json"}
    for _ in range(20):  # warm both connections
        for c in clients.values():
            c.post("/v2/models/lat/infer", content=body, headers=headers)
    for i in range(requests * 2):
        kind = ("local", "forwarded")[i % 2]
        started = time.perf_counter()
        r = clients[kind].post("/v2/models/lat/infer", content=body, headers=headers)
        times[kind].append(time.perf_counter() - started)
        assert r.status_code == 200 and r.headers["cachemesh-node"] == holder, r.text
    for c in clients.values():
        c.close()
    out = {k: {"p50_ms": 1000 * statistics.median(v), "p99_ms": 1000 * pct(v, 0.99),
               "n": len(v)} for k, v in times.items()}
    out["ratio_p50"] = out["forwarded"]["p50_ms"] / out["local"]["p50_ms"]
    out["ratio_p99"] = out["forwarded"]["p99_ms"] / out["local"]["p99_ms"]
    return out


# -- 2. density ------------------------------------------------------------------------

def zipf_weights(n: int, s: float) -> list[float]:
    return [1 / (i + 1) ** s for i in range(n)]


def density(root: Path, etcd: EtcdServer, nodes: int, hold: int, models: int, size: int,
            duration: float, base: int) -> dict[str, Any]:
    names = [chr(ord("a") + i) for i in range(nodes)]
    budget = base + int((hold + 0.5) * size)
    cluster = start_cluster(root, etcd, names, budget)
    try:
        specs = [model_spec(cluster.origin, f"d{i:02d}", size) for i in range(models)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(
                lambda s: cluster[names[0]].http.post("/api/v1/models", json=s), specs))
        refused = [r.text for r in replies if r.status_code not in (200, 201)]
        if refused:
            raise RuntimeError(f"{len(refused)} declarations refused, e.g. {refused[0]}")
        for node in cluster.nodes.values():
            wait_until(lambda n=node: len(n.http.get("/api/v1/models").json()["models"])
                       == models, 120, f"every model declared on {node.name}")
        weights = zipf_weights(models, 1.1)
        peaks = {n: 0 for n in names}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for n in names:
                    try:
                        mem = cluster[n].http.get("/api/v1/models", timeout=5).json()["memory"]
                        peaks[n] = max(peaks[n], int(mem["held_bytes"]))
                    except (httpx.HTTPError, KeyError, ValueError):
                        pass
                done.wait(0.2)

        codes: list[int] = []
        latencies: list[float] = []

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(timeout=60) as c:
                while not done.is_set():
                    m = rng.choices(range(models), weights)[0]
                    n = rng.choice(names)
                    t = time.perf_counter()
                    try:
                        code = c.post(f"{cluster[n].url}/v2/models/d{m:02d}/infer",
                                      json=BODY).status_code
                    except httpx.HTTPError:
                        code = 0
                    latencies.append(time.perf_counter() - t)
                    codes.append(code)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(duration)
        done.set()
        for t in threads:
            t.join(70)
        sampler.join(10)
        texts = [cluster[n].http.get("/metrics").text for n in names]
    finally:
        stop(cluster)
        shutil.rmtree(cluster.root, ignore_errors=True)
    hits = sum(metric_sum(t, "cachemesh_model_hits_total") for t in texts)
    misses = sum(metric_sum(t, "cachemesh_model_misses_total") for t in texts)
    return {"nodes": nodes, "hold_per_node": hold, "models": models, "budget": budget,
            "requests": len(codes), "rate": len(codes) / duration,
            "errors": sum(1 for c in codes if c != 200),
            "hit_rate": hits / max(hits + misses, 1),
            "loads": sum(metric_sum(t, "cachemesh_model_load_seconds_count") for t in texts),
            "evictions": sum(metric_sum(t, "cachemesh_evictions_total") for t in texts),
            "forwards": sum(metric_sum(t, "cachemesh_forwards_total") for t in texts),
            "remote_loads": sum(metric_sum(t, "cachemesh_remote_loads_total") for t in texts),
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * pct(latencies, 0.99),
            "peak_held": peaks}


# -- 3. failover -------------------------------------------------------------------------

def failover(cluster: Cluster) -> dict[str, Any]:
    deploy(cluster, "a", model_spec(cluster.origin, "hot", 4 * MiB))
    holder = cluster["a"].http.post("/v2/models/hot/infer", json=BODY).headers["cachemesh-node"]
    others = [n for n in cluster.nodes if n != holder]
    for n in others:
        wait_until(lambda n=n: any(x["node"] == holder for v in cluster[n].model("hot").json()
                                   ["versions"].values() for x in v["status"]["nodes"]),
                   10, "record")
    clients = [httpx.Client(base_url=cluster[n].url, timeout=30) for n in others]
    for c in clients:
        assert c.post("/v2/models/hot/infer", json=BODY).status_code == 200
    cluster[holder].kill()
    killed = time.monotonic()
    failed = 0
    i = 0
    while True:
        r = clients[i % len(clients)].post("/v2/models/hot/infer", json=BODY)
        i += 1
        if r.status_code == 200:
            break
        failed += 1
        if time.monotonic() - killed > 60:
            raise RuntimeError(f"no answer 60 s after the kill: {r.text}")
    recovered = time.monotonic() - killed
    for c in clients:
        c.close()
    return {"seconds": recovered, "failed": failed, "answered_by": r.headers["cachemesh-node"],
            "killed": holder}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The setup's figures: medians over its runs (each run kept under ``runs``)."""
    out = dict(runs[0])
    for key in ("rate", "errors", "hit_rate", "loads", "evictions", "forwards",
                "remote_loads", "p50_ms", "p99_ms"):
        out[key] = statistics.median(d[key] for d in runs)
    out["peak_held"] = {n: max(d["peak_held"][n] for d in runs) for n in runs[0]["peak_held"]}
    out["runs"] = runs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--size-mb", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="density runs per setup")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    size = args.size_mb * MiB
    work = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    etcd = EtcdServer(work / "etcd")
    etcd.start()
    try:
        # One copy per model here (copy_rate 0): the leader would otherwise add a copy on
        # the forwarding node as soon as the rate passes 50/s, and nothing would be forwarded.
        cluster = start_cluster(work / "three", etcd, ["a", "b", "c"], 1 << 30,
                                CACHEMESH_SERVE_COPY_RATE="0")
        try:
            fwd = forwarding(cluster, args.requests)
            print("forwarding", json.dumps(fwd))
            mem = cluster["a"].http.get("/api/v1/models").json()["memory"]
            base = max(int(w["base_bytes"]) for w in mem["workers"] if w["alive"])
            fail = failover(cluster)
            print("failover", json.dumps(fail))
        finally:
            stop(cluster)
        runs: list[dict[str, Any]] = []
        setups = [(3, 10), (1, 30)]
        for r, (nodes, hold) in _report.rotating(setups, args.rounds):  # alternated
            d = density(work / f"density-{nodes}-{r}", etcd, nodes, hold, 60, size,
                        args.duration, base)
            print("density", json.dumps(d))
            runs.append(d)
        dens = [median_run([d for d in runs if d["nodes"] == n]) for n, _ in setups]
    finally:
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(fwd, dens, fail, base, size, args)


def report(fwd: dict[str, Any], dens: list[dict[str, Any]], fail: dict[str, Any], base: int,
           size: int, args: argparse.Namespace) -> None:
    t1 = _report.table(["answered", "requests", "p50 ms", "p99 ms"], [
        ["locally (the node holds the copy)", fwd["local"]["n"],
         f"{fwd['local']['p50_ms']:.2f}", f"{fwd['local']['p99_ms']:.2f}"],
        ["forwarded once (another node holds it)", fwd["forwarded"]["n"],
         f"{fwd['forwarded']['p50_ms']:.2f}", f"{fwd['forwarded']['p99_ms']:.2f}"],
        ["ratio forwarded / local", "", f"{fwd['ratio_p50']:.2f}×", f"{fwd['ratio_p99']:.2f}×"]])
    rows = []
    for d in dens:
        peaks = ", ".join(f"{n} {v / MiB:.0f}" for n, v in sorted(d["peak_held"].items()))
        rows.append([f"{d['nodes']} node(s) × budget for {d['hold_per_node']}",
                     f"{d['rate']:.0f}", f"{100 * d['hit_rate']:.1f}%", f"{d['loads']:.0f}",
                     f"{d['evictions']:.0f}", f"{d['forwards']:.0f}", f"{d['errors']:.0f}",
                     f"{d['p50_ms']:.1f} / {d['p99_ms']:.0f}",
                     f"{peaks} (budget {d['budget'] / MiB:.0f} each)"])
    t2 = _report.table(["setup (60 models, Zipf s=1.1)", "req/s", "hit rate", "loads",
                        "evictions", "forwards", "errors", "p50 / p99 ms",
                        "peak held MiB per node"], rows)
    t3 = _report.table(["killed", "seconds until answered again", "failed requests",
                        "answered by"], [[fail["killed"], f"{fail['seconds']:.2f}",
                                          fail["failed"], fail["answered_by"]]])
    print(t1, t2, t3, sep="\n\n")
    if args.no_write:
        return
    _report.save_results("cluster", {"forwarding": fwd, "density": dens, "failover": fail,
                                     "worker_base_bytes": base, "model_bytes": size})
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    over = [(d["nodes"], max(d["peak_held"].values()) / d["budget"]) for d in dens]
    over_note = ("Peak held memory (the larger of the workers' RSS and what their models"
                 " account for) against the budget: " + ", ".join(
                     f"{n} node(s) {100 * (r - 1):+.0f} %" for n, r in over)
                 + "; not investigated further here.")
    body = f"""Three `cachemesh serve --cluster` nodes on loopback over one real etcd (2 s leases),
one worker each; the client shares the same 2 cores. Models allocate {size // MiB} MiB at load.

### Forwarding: answered locally vs forwarded once (same run, alternated)

{t1}

### Density: 60 models over 3 nodes (budget for 10 each) vs one node (budget for 30)

{args.duration:g} s of Zipf traffic from 8 client threads, each request to a random node;
{args.rounds} run(s) of each setup, alternated; medians (peak memory: the highest seen).
Load average when the report was written: {load}.
Hit rate: requests answered by a copy already in memory (the answering node's
`cachemesh_model_hits_total` / hits + misses, summed over nodes). Budget: the worker's own
memory ({base / MiB:.0f} MiB, measured) + 10.5 (or 30.5) models.

{t2}

{over_note}

### Failover: SIGKILL of the node holding a hot model

{t3}
"""
    _report.write_section("cluster", "Cluster", body)


if __name__ == "__main__":
    main()
