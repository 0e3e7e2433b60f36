"""benchmarks/plots.py draws the report's plots from saved results files alone."""

from __future__ import annotations

import importlib.util
import json
import statistics
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def plots() -> Any:
    pytest.importorskip("matplotlib")
    return _module("plots")


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


LOAD = {
    "sizes": {"tiny": 2_000_000_000},
    "plan": {"tiny": ["dd", "cachemesh", "safetensors mmap"]},
    "results": {
        "tiny|dd|cold": [{"seconds": 1.0}, {"seconds": 0.8}, {"seconds": 1.2}],
        "tiny|dd|warm": [{"seconds": 0.2}],
        "tiny|cachemesh|cold": [{"seconds": 0.5}, {"seconds": 4.0}, {"seconds": 0.7}],
        "tiny|cachemesh|warm": [{"seconds": 0.25}],
        "tiny|safetensors mmap|cold": [{"seconds": 2.0}],
        "tiny|safetensors mmap|warm": [{"seconds": 0.1}],
    },
}
SERVE = {"throughput": [
    {"label": "cachemesh serve --workers 1", "system": "cachemesh", "workers": 1,
     "runs": [{"rate": 6000, "p99": 4.0}, {"rate": 7000, "p99": 5.0}, {"rate": 6500, "p99": 9}]},
    {"label": "MLServer 1.7 parallel_workers=0", "system": "mlserver", "workers": 0,
     "runs": [{"rate": 1900, "p99": 12.0}, {"rate": 2000, "p99": 11.0}]},
]}
FETCH = {"benchmark": "fetch-tls", "total_bytes": 1_000_000_000, "baseline": "curl, 8 ranges",
         "tools": {"curl, 8 ranges": [{"seconds": 2.0}, {"seconds": 2.5}],
                   "cachemesh": [{"seconds": 1.0}, {"seconds": 4.0}, {"seconds": 2.0}],
                   "dd write + fdatasync (reference)": [{"seconds": 0.5}]}}
FLEET = {"runs": [{"nodes": 1, "seconds": 3.0}, {"nodes": 4, "seconds": 5.0},
                  {"nodes": 4, "seconds": 7.0}, {"nodes": 16, "seconds": 9.0}]}


def test_each_plot_is_drawn_from_its_results_file_alone(plots: Any, tmp_path: Path):
    results, out = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    for name, data in (("load", LOAD), ("serve", SERVE), ("fetch-tls", FETCH), ("fleet", FLEET)):
        (results / f"{name}.json").write_text(json.dumps(data))
        path = plots.draw(name, results, out)
        assert path == out / f"benchmark-{name}.png"
        width, height = png_size(path)
        assert 300 < width < 1600 and 200 < height < 1200, (name, width, height)
        assert path.stat().st_size < 150_000
    # The same results draw the same bytes (no timestamp in the file): a rerun of the
    # drawing changes nothing in git.
    first = (out / "benchmark-load.png").read_bytes()
    assert plots.draw("load", results, out).read_bytes() == first


def test_the_bars_are_the_medians_of_the_runs(plots: Any):
    fig = plots.plot_load(LOAD)
    ax = fig.axes[0]
    widths = [round(b.get_width(), 6) for b in ax.patches]
    expected = []
    for mode in ("cold", "warm"):
        for tool in LOAD["plan"]["tiny"]:
            runs = LOAD["results"][f"tiny|{tool}|{mode}"]
            expected.append(round(2.0 / statistics.median(r["seconds"] for r in runs), 6))
    assert widths == expected  # GB/s of the median run, cold bars then warm bars
    assert [t.get_text() for t in ax.get_yticklabels()] == LOAD["plan"]["tiny"]

    rate_ax, p99_ax = plots.plot_serve(SERVE).axes
    assert [b.get_width() for b in rate_ax.patches] == [6500, 1950]
    assert [b.get_width() for b in p99_ax.patches] == [5.0, 11.5]

    fetch_ax = plots.plot_fetch(FETCH).axes[0]
    # The median of the runs' MB/s, as the table has it.
    assert [round(b.get_width()) for b in fetch_ax.patches] == [450, 500, 2000]

    line = plots.plot_fleet(FLEET).axes[0].lines[0]
    assert list(line.get_xdata()) == [1, 4, 16] and list(line.get_ydata()) == [3.0, 6.0, 9.0]


def test_results_are_saved_where_the_plots_read_them(tmp_path: Path, monkeypatch):
    report = _module("_report")
    monkeypatch.setattr(sys, "argv", ["serve.py", "--rounds", "2"])
    path = report.save_results("serve", SERVE, results_dir=tmp_path)
    saved = json.loads(path.read_text())
    assert path == tmp_path / "serve.json"
    assert saved["throughput"] == SERVE["throughput"]
    assert saved["benchmark"] == "serve" and saved["command"].endswith("serve.py --rounds 2")


def test_every_plot_the_report_embeds_has_its_results() -> None:
    """An image the report shows is drawn from a results file that exists, and the
    files read back from the tables (tables_to_results.py) hold the tables' medians."""
    docs = BENCHMARKS.parent / "docs"
    report = (docs / "benchmarks.md").read_text()
    embedded = sorted(set(__import__("re").findall(r"\(benchmark-([\w-]+)\.png\)", report)))
    assert embedded, "the report embeds no plot"
    for name in embedded:
        assert (docs / "results" / f"{name}.json").exists(), name
    tables = _module("tables_to_results")
    section = tables.section(report, "fetch")
    fetch = tables.fetch("fetch", section)
    for cells in tables.rows(section, "tool"):
        runs = fetch["tools"][cells[0]]
        rate = fetch["total_bytes"] / statistics.median(r["seconds"] for r in runs) / 1e6
        assert abs(rate - float(cells[1])) < 1, cells  # the table's median MB/s
    load = tables.load(tables.section(report, "load"))
    assert {"synthetic", "llama"} <= set(load["plan"])
    assert all(load["results"][f"{c}|{t}|{m}"] for c, tools in load["plan"].items()
               for t in tools for m in ("cold", "warm"))
