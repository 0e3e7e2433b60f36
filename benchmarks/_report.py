"""Shared helpers for benchmark scripts: tables, medians, and docs/benchmarks.md.

Each benchmark owns one section of docs/benchmarks.md, between
``<!-- BEGIN name -->`` and ``<!-- END name -->``; rerunning a benchmark
replaces its own section and leaves the others alone. Its raw results go to
``docs/results/NAME.json`` (:func:`save_results`), from which ``plots.py``
draws the section's plot (:func:`plot`) and can redraw it without a rerun.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
RESULTS = DOC.parent / "results"
HEADER = """# Benchmarks

Every table below was written by the script named in its section, with the exact
command shown. cachemesh and its baselines run in the same session, alternated,
and medians are reported. See DESIGN.md ("Benchmarks") for the rules. Each script
also saves its raw results to `docs/results/NAME.json` and draws its plot from them
(`docs/benchmark-NAME.png`); `python benchmarks/plots.py` redraws every plot from
those files without measuring anything.
"""


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def rotating(names: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, name) of every run: each tool once a round, the order rotated by one each
    round, so that no tool always runs first (or right after the same neighbour)."""
    for r in range(rounds):
        shift = r % len(names)
        for name in [*names[shift:], *names[:shift]]:
            yield r, name


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        out.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(out)


def drop_page_cache() -> bool:
    """Drop this machine's page cache (root only). Returns False if not permitted."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def machine() -> str:
    cpus = os.cpu_count()
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f", {int(line.split()[1]) / 1024 / 1024:.0f} GiB RAM"
    except OSError:
        pass
    return f"{platform.machine()}, {cpus} cores{mem}, Python {platform.python_version()}"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_section(name: str, title: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) this benchmark's section in docs/benchmarks.md (or ``doc``)."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = (
        f"{begin}\n## {title}\n\nCommand: `{command_line()}`  \n"
        f"Run: {stamp} on {machine()}\n\n{body.strip()}\n{end}"
    )
    text = doc.read_text() if doc.exists() else HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    print(f"wrote section {name!r} of {doc}")


def save_results(name: str, data: dict, results_dir: Path = RESULTS) -> Path:
    """Write a benchmark's raw results to ``docs/results/NAME.json`` (what plots.py reads)."""
    out = {"benchmark": name, "command": command_line(),
           "run": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(), **data}
    path = results_dir / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"saved {path}")
    return path


def plot(name: str, title: str) -> str:
    """Draw NAME's plot from its saved results; the markdown that shows it in the report
    ("" when matplotlib is missing: the table stands alone, and plots.py draws it later)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import plots

        path = plots.draw(name)
    except ImportError as exc:
        print(f"no plot for {name} ({exc}); draw it later: python benchmarks/plots.py {name}")
        return ""
    print(f"drew {path}")
    return f"![{title}]({path.relative_to(DOC.parent).as_posix()})"
