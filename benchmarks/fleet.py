"""Fleet start-up: N nodes start the same model at once, peer-to-peer against every node
pulling from the origin, behind capped links (the seed experiment of issue 18).

    sudo .venv/bin/python benchmarks/fleet.py                       # 256 MB, N = 1, 2, 4, 8
    sudo .venv/bin/python benchmarks/fleet.py --size 64MB --rounds 1   # a reduced run

Every node is a real ``cachemesh serve`` in its own network namespace with its own store
(tests/netns/fleet.py), its link capped at ``--node-mbit`` each way with tbf; the origin is
the Hugging Face emulator behind a link capped at ``--origin-mbit`` (tests/netns/origin.py).
A run starts ``cachemesh pull`` on N nodes at once and measures:

- seconds until every one of the N pulls exited verified;
- bytes the origin served (its own count);
- the most bytes any one node sent to its peers (``cachemesh_peer_served_bytes_total``).

Two ways, alternated in every round: ``cachemesh p2p`` (``--index etcd``, the default: the
nodes run in cluster mode against a real etcd on the bridge and find each other through
the blob index; ``--index static``: ``CACHEMESH_PEERS`` lists the N nodes) and ``origin
only`` (no peers: every node pulls from the origin, as without a cache mesh). The
loopback ceiling, measured in the same run, is how fast the origin's process serves the
model with no cap at all (one GET over ``lo`` in its namespace): the caps, far below it,
are what limit the runs. Needs root (namespaces, tc).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.netns

import _report  # noqa: E402

REPO = "bench/fleet"
NAME = REPO.replace("/", "-")
MODES = ("cachemesh p2p", "origin only")


def make_model(folder: Path, size: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.safetensors"
    if not weights.exists() or weights.stat().st_size != size:
        with open(weights, "wb") as f:
            left = size
            while left:
                n = min(left, 16 * 1024 * 1024)
                f.write(os.urandom(n))
                left -= n
    (folder / "config.json").write_text('{"model_type": "fleet-benchmark"}')
    return sum(p.stat().st_size for p in folder.iterdir())


def loopback_ceiling(fleet, size: int) -> float:  # noqa: ANN001
    """MB/s of one uncapped GET of the weights from the origin's process, over lo."""
    code = (
        "import httpx,time,json,sys\n"
        f"base='http://{fleet.origin_host.ip}:8080'\n"
        "c=httpx.Client(trust_env=False,follow_redirects=True,timeout=60)\n"
        f"url=base+'/{REPO}/resolve/main/model.safetensors'\n"
        "t=time.perf_counter();n=0\n"
        "with c.stream('GET',url) as r:\n"
        "    for b in r.iter_raw(1<<20): n+=len(b)\n"
        "print(json.dumps({'bytes':n,'seconds':time.perf_counter()-t}))\n")
    # Inside the origin's namespace, to its own address: lo, no tbf.
    done = fleet.origin_host.run([sys.executable, "-c", code],
                                 {"PATH": os.environ.get("PATH", "")}, 120)
    out = json.loads(done.stdout)
    assert out["bytes"] == size, out
    return out["bytes"] / out["seconds"] / 1e6


def run_once(fleet, nodes: list, mode: str, total: int) -> dict:  # noqa: ANN001
    peers = ",".join(f"{n.name}={n.url}" for n in nodes) if mode == MODES[0] else ""
    env = {"CACHEMESH_PEERS": peers}
    if fleet.etcd_url:  # p2p through the index; origin only: the pull leaves the cluster
        env = {"CACHEMESH_PEERS": ""} if mode == MODES[0] else {"CACHEMESH_CLUSTER": ""}
    uploaded_before = {n.name: _served(fleet, n) for n in nodes}
    taken_before = {n.name: _from_peers(fleet, n) for n in nodes}
    origin_before = fleet.origin_served()
    servers_cpu = _cpu_of([n.server.pid for n in fleet.nodes])
    pulls_cpu = _children_cpu()
    last_origin_byte = [0.0]
    first_origin_byte = [0.0]
    done = threading.Event()
    t0 = time.perf_counter()

    def watch_origin() -> None:  # when the origin sent its last byte of the run
        seen = origin_before
        while not done.wait(0.05):
            now = fleet.origin_served()
            if now != seen:
                seen, last_origin_byte[0] = now, time.perf_counter() - t0
                first_origin_byte[0] = first_origin_byte[0] or last_origin_byte[0]

    watcher = threading.Thread(target=watch_origin, daemon=True)
    watcher.start()
    procs = {n: fleet.pull(n, REPO, env=env) for n in nodes}
    ends: dict[str, float] = {}
    try:
        while len(ends) < len(procs):  # each pull's own end, whatever the order
            for node, proc in procs.items():
                if node.name not in ends and proc.poll() is not None:
                    ends[node.name] = time.perf_counter() - t0
                    if proc.returncode != 0:
                        raise RuntimeError(f"{node.name}'s pull failed:"
                                           f" {fleet.log(node)[-2000:]}")
            time.sleep(0.01)
    finally:
        done.set()
        watcher.join()
    seconds = max(ends.values())
    cpu_pulls = _children_cpu() - pulls_cpu
    cpu_servers = _cpu_of([n.server.pid for n in fleet.nodes]) - servers_cpu
    origin = fleet.origin_served() - origin_before
    uploaded = {n.name: _served(fleet, n) - uploaded_before[n.name] for n in nodes}
    taken = {n.name: _from_peers(fleet, n) for n in nodes}
    # What each node did not take from a peer came from the origin (or was a retry).
    from_origin = {n: total - (taken[n][0] - taken_before[n][0]) for n in taken}
    faults = {n: taken[n][1] - taken_before[n][1] for n in taken}
    for node in nodes:  # verified by the pull; the store's own check too
        report = fleet.verify(node)
        if not report["ok"]:
            raise RuntimeError(f"{node.name}: cache verify failed: {report}")
    return {"nodes": len(nodes), "system": mode, "seconds": seconds,
            "origin_bytes": origin, "origin_copies": origin / total,
            "origin_first_byte_s": first_origin_byte[0],
            "origin_last_byte_s": last_origin_byte[0], "cpu_s": cpu_pulls + cpu_servers,
            "cpu_pulls_s": cpu_pulls, "cpu_servers_s": cpu_servers,
            "max_uploaded_bytes": max(uploaded.values()),
            "max_uploaded_copies": max(uploaded.values()) / total, "per_node_s": ends,
            "uploaded_bytes": uploaded, "not_from_peers_bytes": from_origin,
            "peer_faults": faults}


def _children_cpu() -> float:
    """CPU seconds of the children waited for so far (the pulls)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_of(pids: list[int]) -> float:
    """CPU seconds the processes (every thread) have used so far (the servers)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def _served(fleet, node) -> float:  # noqa: ANN001
    from tests.netns.fleet import metric

    return metric(fleet.metrics(node), "cachemesh_peer_served_bytes_total")


def _from_peers(fleet, node) -> tuple[float, float]:  # noqa: ANN001
    """Bytes the node's pulls took from peers, and the peer faults they counted."""
    text = fleet.metrics(node)

    def summed(name: str) -> float:
        return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))
    return (summed("cachemesh_peer_fetched_bytes_total"),
            summed("cachemesh_peer_faults_total"))


def reset(fleet, nodes: list) -> None:  # noqa: ANN001
    """Forget the model on every node (its cache, then its blobs), in parallel."""
    procs = [subprocess.Popen(["ip", "netns", "exec", n.host.netns, sys.executable, "-m",
                               "cachemesh", "cache", "rm", NAME], env=n.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for n in nodes]
    for p in procs:
        p.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="256MB")
    parser.add_argument("--nodes", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--origin-mbit", type=float, default=160.0, help="20 MB/s")
    parser.add_argument("--node-mbit", type=float, default=400.0, help="50 MB/s each way")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--index", choices=("etcd", "static"), default="etcd",
                        help="how peers find each other: the blob index in etcd, or a list")
    parser.add_argument("--no-write", action="store_true", help="leave docs/ alone")
    parser.add_argument("--report-only", action="store_true",
                        help="write the section again from docs/results/fleet.json, no run")
    args = parser.parse_args()
    if args.report_only:
        rerender()
        return

    from cachemesh.config import parse_size
    from tests.netns.fleet import Fleet
    from tests.netns.net import unavailable

    why = unavailable()
    if why:
        sys.exit(f"fleet benchmark: {why}")
    counts = [int(n) for n in args.nodes.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cachemesh-fleet-"))
    total = make_model(work / "model", parse_size(args.size))
    print(f"model: {total / 1e6:.0f} MB in {work / 'model'}", flush=True)
    fleet = Fleet(work / "fleet", nodes=max(counts), origin_mbit=args.origin_mbit,
                  node_mbit=args.node_mbit, repos={REPO: work / "model"},
                  etcd=args.index == "etcd", lease_ttl_s=10)
    runs: list[dict] = []
    loads: list[float] = []
    try:
        fleet.start(timeout=180)
        ceiling = [loopback_ceiling(fleet, total - len('{"model_type": "fleet-benchmark"}'))]
        for r in range(args.rounds):
            for n in counts:
                modes = MODES if (r + n) % 2 == 0 else MODES[::-1]  # alternate who goes first
                for mode in modes:
                    nodes = fleet.nodes[:n]
                    reset(fleet, fleet.nodes)
                    loads.append(os.getloadavg()[0])
                    run = run_once(fleet, nodes, mode, total)
                    run["round"] = r + 1
                    runs.append(run)
                    print(f"round {r + 1}  N={n}  {mode:14s} {run['seconds']:6.1f} s"
                          f"  (origin's bytes {run['origin_first_byte_s']:4.1f}"
                          f"-{run['origin_last_byte_s']:4.1f} s)"
                          f"  origin {run['origin_copies']:.2f} copies"
                          f"  max upload {run['max_uploaded_copies']:.2f} copies"
                          f"  cpu {run['cpu_pulls_s']:5.1f}+{run['cpu_servers_s']:4.1f} s  ends {sorted(round(v, 1) for v in run['per_node_s'].values())}"
                          f"  up {[round(v / total, 1) for v in run['uploaded_bytes'].values()]}"
                          f"  not from peers {[round(v / total, 2) for v in run['not_from_peers_bytes'].values()]}"
                          f"  faults {sum(run['peer_faults'].values()):.0f}",
                          flush=True)
            ceiling.append(loopback_ceiling(fleet, total - len('{"model_type": "fleet-benchmark"}')))
    finally:
        fleet.close()
        # The nodes' stores go; the model stays for the next run only in a --workdir.
        shutil.rmtree(work if args.workdir is None else work / "fleet", ignore_errors=True)
    report(args, total, runs, ceiling, loads)


def rerender() -> None:
    """The section from the saved results, under the command that measured them."""
    saved = json.loads((_report.RESULTS / "fleet.json").read_text())
    sys.argv = [sys.argv[0], *shlex.split(saved["command"])[2:]]
    index = saved.get("index") or ("static" if "--index static" in saved["command"] else "etcd")
    args = argparse.Namespace(origin_mbit=saved["origin_mbit"], node_mbit=saved["node_mbit"],
                              index=index, no_write=False, results_saved=True)
    report(args, saved["total_bytes"], saved["runs"], saved["loopback_mb_s"], saved["load_avg"],
           run_at=saved["run"])


def report(args: argparse.Namespace, total: int, runs: list[dict], ceiling: list[float],
           loads: list[float], run_at: str | None = None) -> None:
    """Print the table; unless --no-write, save the results (a fresh run only), draw the
    plot and write the section of docs/benchmarks.md (with ``run_at``: when they were
    measured, for a section written again from saved results)."""
    med = statistics.median
    origin_mbs = args.origin_mbit / 8
    data = {"total_bytes": total, "origin_mbit": args.origin_mbit, "node_mbit": args.node_mbit,
            "index": args.index, "loopback_mb_s": ceiling, "load_avg": loads, "runs": runs}
    rows = []
    counts = sorted({r["nodes"] for r in runs})
    one = {m: med([r["seconds"] for r in runs if r["system"] == m and r["nodes"] == counts[0]])
           for m in MODES}
    for n in counts:
        for mode in MODES:
            mine = [r for r in runs if r["system"] == mode and r["nodes"] == n]
            if not mine:
                continue
            secs = med([r["seconds"] for r in mine])
            rows.append([
                n, mode, f"{secs:.1f}", f"{secs / one[mode]:.2f}",
                f"{med([r['origin_first_byte_s'] for r in mine]):.1f}"
                f"–{med([r['origin_last_byte_s'] for r in mine]):.1f}",
                f"{med([r['origin_copies'] for r in mine]):.2f}",
                f"{max(r['origin_copies'] for r in mine):.2f}",
                f"{med([r['max_uploaded_copies'] for r in mine]):.2f}",
                f"{med([r['cpu_s'] for r in mine]):.1f}", len(mine)])
    table = _report.table(["nodes", "system", "seconds (median)", f"× N={counts[0]}",
                           "origin sent, from–to (s)", "origin bytes (copies)",
                           "origin bytes, worst run (copies)",
                           "most sent by one node (copies)", "CPU s, all nodes", "runs"], rows)
    print(table)
    if args.no_write:
        return
    if run_at is None:
        _report.save_results("fleet", data)
    figure = _report.plot("fleet", "Fleet start-up")
    top = max(counts)
    p2p = [r for r in runs if r["system"] == MODES[0] and r["nodes"] == top]
    cpu_share = med([r["cpu_s"] / r["seconds"] for r in p2p]) if p2p else 0.0
    how = ("`cachemesh p2p` runs the nodes in cluster mode against a real etcd on the"
           " bridge: they find each other through the blob index, one node at a time (the"
           " holder of the blob's claim in etcd) fetches it from the origin, and the others"
           " take its pieces and each other's as they land."
           if args.index == "etcd" else
           "`cachemesh p2p` lists the N nodes as static peers (the lowest-named node"
           " fetching the blob goes to the origin, the others take its pieces and each"
           " other's).")
    how = textwrap.fill(f"{how} `origin only` is every node pulling from the origin alone."
                        " The two alternate in every round.", 90)
    body = f"""
N nodes start the same model ({total / 1e6:.0f} MB) at once: `cachemesh pull` on every
node, each node a real `cachemesh serve` in its own network namespace with its own store
(`tests/netns/fleet.py`), links capped with tbf: the origin (the Hugging Face emulator) at
{origin_mbs:.0f} MB/s, each node at {args.node_mbit / 8:.0f} MB/s each way. Measured: the
time until all N pulls have the model verified; when the origin sent its first and last
byte; the bytes it served (its own count); the most bytes one node sent to its peers
(`cachemesh_peer_served_bytes_total`); the CPU time of every node's pull and server
processes.
{how}

Loopback ceiling in the same run (one uncapped GET of the weights from the origin's
process, inside its namespace): {med(ceiling):.0f} MB/s (median of {len(ceiling)}), far above
the caps. The 2 cores are shared by all N nodes here (and by the machine's other work: load
average median {med(loads):.1f}): at N={top} peer-to-peer the nodes' processes used
{cpu_share:.1f} core-seconds per second of the 2 cores, and the origin's first byte
came about a second later than at N=1 (N processes starting at once). On separate machines
the N=1 time is the floor, and these start-up costs are not shared.

{table}

{figure}
"""
    _report.write_section("fleet", "Fleet start-up: peer-to-peer against the origin", body)
    if run_at is not None:  # the section says when the numbers were measured
        text = _report.DOC.read_text()
        head, rest = text.split("<!-- BEGIN fleet -->", 1)
        section, tail = rest.split("<!-- END fleet -->", 1)
        section = re.sub(r"\nRun: [0-9-]+ [0-9:]+ on", f"\nRun: {run_at} on", section, count=1)
        _report.DOC.write_text(head + "<!-- BEGIN fleet -->" + section + "<!-- END fleet -->"
                               + tail)


if __name__ == "__main__":
    main()
