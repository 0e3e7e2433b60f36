"""Results files for the plots, read back from the tables of docs/benchmarks.md.

The load, serve and fetch runs in the report were made before the scripts saved their
raw results (``docs/results/NAME.json``), so their plots could not be drawn. This script
reads each section's table back into the shape ``plots.py`` draws, keeping only what the
table recorded, and says so in the file (``"from_table"``):

- load: the median seconds of each tool, cold and warm (one point each), and the
  per-round seconds where the report lists them (dd, cachemesh, cachemesh buffered);
- serve: requests/s of every round; p50 and p99 as medians only;
- fetch: the slowest, median and fastest runs (the table's min-max and median MB/s;
  with an odd number of rounds each is one real run).

A rerun of a benchmark overwrites its file with every point it measured.

    .venv/bin/python benchmarks/tables_to_results.py && .venv/bin/python benchmarks/plots.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent / "docs"
RESULTS = DOCS / "results"


def section(report: str, name: str) -> str:
    match = re.search(rf"<!-- BEGIN {re.escape(name)} -->(.*?)<!-- END {re.escape(name)} -->",
                      report, re.S)
    if not match:
        raise SystemExit(f"no section {name!r} in docs/benchmarks.md")
    return match.group(1)


def rows(text: str, first_header: str) -> list[list[str]]:
    """The rows of every table in ``text`` whose first header cell is ``first_header``."""
    out: list[list[str]] = []
    inside = False
    for line in text.splitlines():
        if not line.startswith("|"):
            inside = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_header:
            inside = True
        elif inside and not set(cells[0]) <= {"-"}:
            out.append(cells)
    return out


def header(text: str) -> dict[str, str]:
    command = re.search(r"Command: `([^`]+)`", text)
    run = re.search(r"Run: (.+?)\s*$", text, re.M)
    return {"command": command.group(1) if command else "",
            "run": run.group(1) if run else "",
            "from_table": "docs/benchmarks.md (the run before results were saved)"}


def load(text: str) -> dict[str, Any]:
    data: dict[str, Any] = {"benchmark": "load", **header(text), "sizes": {}, "plan": {},
                            "results": {}}
    parts = re.split(r"^### (\S+): ([\d.]+) GB of tensors.*$", text, flags=re.M)
    for i in range(1, len(parts) - 2, 3):
        checkpoint, gb, body = parts[i], float(parts[i + 1]), parts[i + 2]
        data["sizes"][checkpoint] = int(gb * 1e9)
        tools = []
        for cells in rows(body, "tool"):
            tool, cold, warm = cells[0], float(cells[1]), float(cells[5])
            tools.append(tool)
            for mode, median in (("cold", cold), ("warm", warm)):
                rounds = re.search(rf"^{re.escape(tool)} {mode}, each round \(s\): (.+?)\s*$",
                                   body, re.M)
                seconds = ([float(s) for s in rounds.group(1).split(",")] if rounds
                           else [median])
                data["results"][f"{checkpoint}|{tool}|{mode}"] = [
                    {"seconds": s} for s in seconds]
        data["plan"][checkpoint] = tools
    return data


def serve(text: str) -> dict[str, Any]:
    configs = []
    for cells in rows(text, "server"):
        label, rounds, p50, p99 = cells[0], cells[2], float(cells[3]), float(cells[4])
        configs.append({
            "label": label,
            "system": "cachemesh" if label.startswith("cachemesh") else "mlserver",
            "runs": [{"rate": float(r)} for r in rounds.split(",")],
            "medians": {"p50": p50, "p99": p99},
        })
    return {"benchmark": "serve", **header(text), "throughput": configs}


def fetch(name: str, text: str) -> dict[str, Any]:
    total = float(re.search(r"([\d.]+) GB in \d+ files", text).group(1)) * 1e9
    tools: dict[str, list[dict[str, float]]] = {}
    for cells in rows(text, "tool"):
        median = float(cells[1])
        low, high = (float(x) for x in cells[2].split("–"))
        tools[cells[0]] = [{"seconds": total / (rate * 1e6)} for rate in (low, median, high)]
    return {"benchmark": name, **header(text), "total_bytes": int(total),
            "baseline": "curl, 8 ranges in parallel", "tools": tools}


def main() -> None:
    report = (DOCS / "benchmarks.md").read_text()
    RESULTS.mkdir(parents=True, exist_ok=True)
    made = {
        "load": load(section(report, "load")),
        "serve": serve(section(report, "serve")),
        "fetch": fetch("fetch", section(report, "fetch")),
        "fetch-tls": fetch("fetch-tls", section(report, "fetch-tls")),
    }
    for name, data in made.items():
        path = RESULTS / f"{name}.json"
        if path.exists() and "from_table" not in json.loads(path.read_text()):
            print(f"kept {path}: a benchmark run saved it")
            continue
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
