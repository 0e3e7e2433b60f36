"""The plots of docs/benchmarks.md, drawn from saved results only: no rerun needed.

    .venv/bin/python benchmarks/plots.py            # redraw every plot whose results exist
    .venv/bin/python benchmarks/plots.py load serve # only these

Each benchmark script saves its raw results to ``docs/results/NAME.json``
(``_report.save_results``) and draws its plot from that file; this script
redraws them (say, after a change of style) from the same files. A plot lands
beside the report as ``docs/benchmark-NAME.png``. The files, as the scripts
write them (every file also carries ``benchmark``, ``command``, ``run`` and
``machine``)::

    load.json    {"sizes": {checkpoint: tensor bytes}, "plan": {checkpoint: [tool, ...]},
                  "results": {"checkpoint|tool|cold|warm": [{"seconds": s, ...}, ...]}}
    serve.json   {"throughput": [{"label": "...", "system": "cachemesh"|"mlserver",
                                  "workers": n, "runs": [{"rate": req/s, "p50": ms,
                                                          "p99": ms, ...}, ...],
                                  "medians": {"p50": ms, "p99": ms} (optional)}, ...]}

A file with ``"from_table"`` was read back from the report's tables by
``tables_to_results.py`` (runs made before results were saved).
    fetch*.json  {"total_bytes": n, "baseline": tool, "tools": {tool: [{"seconds": s,
                                                                      "cpu": s}, ...]}}
    fleet.json   {"total_bytes": n, "loopback_mb_s": [...], "runs": [{"nodes": n,
                  "system": "cachemesh p2p"|"origin only", "seconds": s, "origin_bytes": n,
                  "max_uploaded_bytes": n, ...}, ...]}

Medians everywhere, as in the tables; the points behind a median are drawn too
where there are few of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent / "docs"
RESULTS = DOCS / "results"

OURS, THEIRS, LIMIT, REFERENCE = "#2a6fdb", "#d9822b", "#444444", "#b0b6c0"
COLD, WARM = "#2a6fdb", "#e0a030"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _finish(fig: Any, title: str) -> Any:
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def _label_bars(ax: Any, bars: Any, fmt: str) -> None:
    """Each bar's value at its base, inside it (outside when the bar is too short): the
    end of the bar stays free for the dots and whiskers."""
    right = ax.get_xlim()[1]
    for bar in bars:
        width = bar.get_width()
        inside = width > 0.12 * right
        ax.text(width if not inside else right * 0.005, bar.get_y() + bar.get_height() / 2,
                " " + fmt.format(width), va="center", fontsize=7,
                color="white" if inside else LIMIT, fontweight="bold" if inside else "normal")


def plot_load(data: dict[str, Any]) -> Any:
    """GB/s of every loader, cold and warm, one panel per checkpoint; dd is the limit."""
    plt = _pyplot()
    checkpoints = list(data["plan"])
    tallest = max(len(data["plan"][c]) for c in checkpoints)
    fig, axes = plt.subplots(1, len(checkpoints), squeeze=False,
                             figsize=(5 * len(checkpoints), 0.45 * tallest + 1.4))
    for ax, checkpoint in zip(axes[0], checkpoints, strict=True):
        tools = data["plan"][checkpoint]
        size = data["sizes"][checkpoint]
        y = range(len(tools))
        labelled = []
        for offset, mode, colour in ((-0.2, "cold", COLD), (0.2, "warm", WARM)):
            rates = [size / 1e9 / statistics.median(
                r["seconds"] for r in data["results"][f"{checkpoint}|{tool}|{mode}"])
                for tool in tools]
            bars = ax.barh([i + offset for i in y], rates, height=0.4, color=colour, label=mode)
            for bar, tool in zip(bars, tools, strict=True):
                if tool == "dd":
                    bar.set_hatch("//")
                    bar.set_edgecolor(LIMIT)
            labelled.append(bars)
        ax.margins(x=0.05)
        for bars in labelled:
            _label_bars(ax, bars, "{:.2f}")
        ax.set_yticks(list(y), tools, fontsize=8)
        for tick, tool in zip(ax.get_yticklabels(), tools, strict=True):
            if tool.startswith("cachemesh"):
                tick.set_fontweight("bold")
        ax.invert_yaxis()
        ax.set_xlabel("GB/s (median; dd hatched: the disk or page cache limit)", fontsize=8)
        ax.set_title(f"{checkpoint}: {size / 1e9:.2f} GB", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
    return _finish(fig, "Loading safetensors into memory: cold and warm page cache")


def plot_serve(data: dict[str, Any]) -> Any:
    """Requests/s and p99 of each server configuration, cachemesh against MLServer."""
    plt = _pyplot()
    configs = data["throughput"]
    labels = [c["label"] for c in configs]
    colours = [OURS if c["system"] == "cachemesh" else THEIRS for c in configs]
    fig, (rate_ax, p99_ax) = plt.subplots(1, 2, figsize=(10, 0.45 * len(configs) + 1.6))
    for ax, key, unit, fmt in ((rate_ax, "rate", "requests/s", "{:.0f}"),
                               (p99_ax, "p99", "p99 latency, ms", "{:.1f}")):
        # A file read back from the report's table has each round's rate, and the
        # latencies as medians only ("medians"); then no dots are drawn for them.
        medians = [c.get("medians", {}).get(key)
                   or statistics.median(r[key] for r in c["runs"]) for c in configs]
        bars = ax.barh(range(len(configs)), medians, color=colours, height=0.6)
        for i, c in enumerate(configs):  # each round, over its median
            points = [r[key] for r in c["runs"] if key in r]
            ax.plot(points, [i] * len(points), "o", ms=3, color=LIMIT, alpha=0.6)
        ax.margins(x=0.05)
        _label_bars(ax, bars, fmt)
        ax.set_yticks(range(len(configs)), labels if ax is rate_ax else [""] * len(labels),
                      fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"{unit} (bar: median; dots: rounds)", fontsize=8)
    rate_ax.set_title("throughput (higher is better)", fontsize=9)
    p99_ax.set_title("p99 (lower is better)", fontsize=9)
    return _finish(fig, "Model server: digits SVM over KServe V2 REST, cachemesh vs MLServer")


def plot_fetch(data: dict[str, Any]) -> Any:
    """MB/s of each tool, median with its range; the parallel curl baseline marked."""
    plt = _pyplot()
    tools = list(data["tools"])
    total = data["total_bytes"]
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(tools) + 1.4))
    medians, lows, highs, colours = [], [], [], []
    for tool in tools:
        rates = [total / r["seconds"] / 1e6 for r in data["tools"][tool]]
        m = statistics.median(rates)
        medians.append(m)
        lows.append(m - min(rates))
        highs.append(max(rates) - m)
        colours.append(REFERENCE if "(reference)" in tool else OURS
                       if tool.startswith("cachemesh") else THEIRS)
    bars = ax.barh(range(len(tools)), medians, xerr=[lows, highs], color=colours, height=0.6,
                   error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": LIMIT})
    baseline = data.get("baseline")
    if baseline in data["tools"]:
        ax.axvline(medians[tools.index(baseline)], color=LIMIT, lw=0.8, ls="--")
    ax.margins(x=0.05)
    _label_bars(ax, bars, "{:.0f}")
    ax.set_yticks(range(len(tools)), tools, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"MB/s (median, range over rounds; dashed: {baseline})", fontsize=8)
    name = data.get("benchmark", "fetch")
    how = ", https" if "tls" in name else ""
    how += ", cold page cache" if "cold" in name else ""
    return _finish(fig, f"Fetch over loopback{how}: {total / 1e9:.2f} GB")


def plot_fleet(data: dict[str, Any]) -> Any:
    """Start-up time of a fleet against its number of nodes: one line per system
    (cachemesh peer-to-peer, every node from the origin), medians and their runs."""
    plt = _pyplot()
    by_system: dict[str, dict[int, list[float]]] = {}
    for run in data["runs"]:
        nodes = by_system.setdefault(run.get("system", "cachemesh"), {})
        nodes.setdefault(int(run["nodes"]), []).append(float(run["seconds"]))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ticks: set[int] = set()
    for system in sorted(by_system, key=lambda s: not s.startswith("cachemesh")):
        by_nodes = by_system[system]
        nodes = sorted(by_nodes)
        ticks.update(nodes)
        color = OURS if system.startswith("cachemesh") else THEIRS
        ax.plot(nodes, [statistics.median(by_nodes[n]) for n in nodes], "-o", color=color,
                label=system)
        for n in nodes:
            ax.plot([n] * len(by_nodes[n]), by_nodes[n], ".", color=LIMIT, alpha=0.5)
    ax.set_xlabel("nodes starting the model at once", fontsize=8)
    ax.set_ylabel("seconds until every node has it", fontsize=8)
    ax.set_xticks(sorted(ticks))
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return _finish(fig, "Fleet start-up time against the number of nodes")


PLOTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "load": plot_load, "serve": plot_serve, "fetch": plot_fetch, "fleet": plot_fleet,
}


def plotter(name: str) -> Callable[[dict[str, Any]], Any]:
    """The function that draws results ``name`` (fetch-tls is drawn as fetch)."""
    return PLOTS[name.split("-")[0]]


def image(name: str, out_dir: Path = DOCS) -> Path:
    return out_dir / f"benchmark-{name}.png"


def draw(name: str, results_dir: Path = RESULTS, out_dir: Path = DOCS) -> Path:
    """Draw ``results_dir/NAME.json`` into ``out_dir/benchmark-NAME.png``; returns the PNG."""
    data = json.loads((results_dir / f"{name}.json").read_text())
    fig = plotter(name)(data)
    out = image(name, out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # No timestamps or versions in the file: the same results draw the same bytes.
    fig.savefig(out, dpi=100, metadata={"Software": None})
    _pyplot().close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="results to draw (default: every file)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=DOCS)
    args = parser.parse_args()
    names = args.names or sorted(p.stem for p in args.results.glob("*.json"))
    if not names:
        print(f"no results in {args.results}; run a benchmark first")
    for name in names:
        print(f"drew {draw(name, args.results, args.out)}")


if __name__ == "__main__":
    main()
