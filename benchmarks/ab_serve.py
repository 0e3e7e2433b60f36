"""Did a change make serving slower? Two revisions of the server, alternated, same run.

Each round runs both revisions, in turns that swap every round (A B, B A, ...):

1. throughput: ``cachemesh serve`` with the digits SVM, wrk posting a V2 JSON body
   (the same server, model, body and wrk settings as ``serve.py``): req/s and p99;
2. the short soak (``soak.py`` with the short soak's settings): the capacity it
   measures (closed loop, 8 clients), its p99 over the run and its errors.

A revision is any git revision (its ``src/`` taken with ``git archive``) or ``.``,
the working tree. The server runs from that ``src/`` through ``PYTHONPATH``, with
this checkout's virtual environment; the load tools are this checkout's. The
report gives each round's ratios (after / before) and their medians: paired
ratios cancel most of the drift of a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402
import serve as serve_bench  # noqa: E402
import soak as soak_bench  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHORT_SOAK = ["--minutes", "0.33", "--models", "12", "--calibrate", "2",
              "--churn-every", "3", "--interval", "4"]


def source_tree(rev: str, into: Path) -> Path:
    """The ``src`` folder of ``rev`` (``.``: this working tree's)."""
    if rev == ".":
        return ROOT / "src"
    dest = into / rev.replace("/", "_")
    if not (dest / "src").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def throughput(work: Path, src: Path, duration: float, workers: int) -> dict:
    model_dir, body = serve_bench.make_digits(work)
    script = work / "post.lua"
    script.write_text(serve_bench.POST_LUA % body)
    port = serve_bench.free_port()
    shutil.rmtree(work / "cm-home", ignore_errors=True)
    os.environ["PYTHONPATH"] = str(src)
    proc = serve_bench.start_cachemesh(work, model_dir, workers, port)
    try:
        url = f"http://127.0.0.1:{port}"
        serve_bench.wait_ready(url, "digits", proc)
        serve_bench.wrk(f"{url}/v2/models/digits/infer", script, 2)  # warm up
        pids = serve_bench.process_tree(proc.pid)
        cpu_before = serve_bench.cpu_seconds(pids)
        res = serve_bench.wrk(f"{url}/v2/models/digits/infer", script, duration)
        cpu_after = serve_bench.cpu_seconds(pids)
    finally:
        serve_bench.stop(proc)
        os.environ.pop("PYTHONPATH", None)
    answered = max(1.0, res["rate"] * duration)
    used = {pid: cpu_after[pid] - cpu_before.get(pid, 0.0) for pid in cpu_after}
    # CPU per request: steadier than req/s on a shared machine (what the cores did, not
    # how fast the other work let them do it). The server's own process, and all of them.
    return {"rate": res["rate"], "p99_ms": res["p99"], "non2xx": res["non2xx"],
            "server_cpu_us": used.get(proc.pid, 0.0) / answered * 1e6,
            "all_cpu_us": sum(used.values()) / answered * 1e6}


def short_soak(work: Path, src: Path) -> dict:
    os.environ["PYTHONPATH"] = str(src)
    try:
        result = soak_bench.main([*SHORT_SOAK, "--work", str(work / "soak")])
    finally:
        os.environ.pop("PYTHONPATH", None)
    p99s = [i["p99_ms"] for i in result["intervals"] if i["requests"]]
    return {"capacity_rps": result["capacity_rps"], "achieved_rps": result["achieved_rps"],
            "p99_ms": statistics.median(p99s) if p99s else float("nan"),
            "errors": result["errors"], "requests": result["requests"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="git revision (or . for the working tree)")
    p.add_argument("--after", default=".", help="git revision (default: the working tree)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=8.0, help="seconds of wrk per run")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--skip-soak", action="store_true")
    p.add_argument("--write-doc", action="store_true")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cm-ab-", dir=ROOT / ".bench"
                                 if (ROOT / ".bench").is_dir() else None))
    trees = {side: source_tree(rev, work / "trees")
             for side, rev in (("before", args.before), ("after", args.after))}
    runs: list[dict] = []
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        row: dict = {"round": r + 1, "order": list(order),
                     "load_before": os.getloadavg()[0]}
        for side in order:
            row[side] = {"serve": throughput(work / side, trees[side], args.duration,
                                             args.workers)}
            if not args.skip_soak:
                row[side]["soak"] = short_soak(work / side, trees[side])
            print(f"round {r + 1} {side}: {json.dumps(row[side])}", flush=True)
        row["load_after"] = os.getloadavg()[0]
        runs.append(row)

    def ratios(part: str, key: str) -> list[float]:
        return [row["after"][part][key] / row["before"][part][key] for row in runs
                if row["before"][part][key]]

    rows = []
    summary = {}
    measures = [("serve", "rate", "req/s"), ("serve", "p99_ms", "p99"),
                ("serve", "server_cpu_us", "server CPU µs/request"),
                ("serve", "all_cpu_us", "CPU µs/request, server and workers")]
    if not args.skip_soak:
        measures += [("soak", "capacity_rps", "soak capacity"), ("soak", "p99_ms", "soak p99")]
    for part, key, label in measures:
        rs = ratios(part, key)
        before = [row["before"][part][key] for row in runs]
        after = [row["after"][part][key] for row in runs]
        med = statistics.median(rs)
        summary[label] = med
        rows.append([label, f"{statistics.median(before):.1f}", f"{statistics.median(after):.1f}",
                     f"{med:.3f}", f"{min(rs):.2f}-{max(rs):.2f}"])
    errors = {side: sum(row[side].get("soak", {}).get("errors", 0)
                        + row[side]["serve"]["non2xx"] for row in runs)
              for side in ("before", "after")}
    text = (f"`{args.before}` (before) against `{args.after}` (after), {args.rounds} rounds,"
            f" turns swapped every round.\n\n"
            + _report.table(["measure", "before (median)", "after (median)",
                             "paired ratio after/before (median)", "range of ratios"], rows)
            + f"\n\nErrors (non-2xx and soak errors, all rounds): before {errors['before']},"
            f" after {errors['after']}.\n\nEach round's req/s ratio, and the machine's 1-minute"
            " load average at its start and end (other work on the shared cores shows here): "
            + ", ".join(f"{row['after']['serve']['rate'] / row['before']['serve']['rate']:.2f}"
                        f" ({row['load_before']:.1f}-{row['load_after']:.1f})"
                        for row in runs if row['before']['serve']['rate']) + ".")
    print(text)
    data = {"before": args.before, "after": args.after, "rounds": runs, "ratios": summary,
            "errors": errors, "command": _report.command_line(), "machine": _report.machine(),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    _report.save_results("ab_serve", data)
    if args.write_doc:
        _report.write_section(
            "ab_serve", "Serving before and after a change (paired, alternated)", text)


if __name__ == "__main__":
    main()
