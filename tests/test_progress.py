"""The pull's progress bar: sizes and rate in the same binary units."""

from __future__ import annotations

import io
import re

from rich.console import Console

from cachemesh.caches import Progress
from cachemesh.progress import PullBar, rate_text


def test_the_bar_says_mib_and_mib_per_second():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    with PullBar("model", console=console) as bar:
        for done in (0, 4, 8):
            bar.update(Progress(done * 1024**2, 8 * 1024**2, done // 4, 2, 0.0))
    text = out.getvalue()
    assert "8.0/8.0 MiB" in text and "2/2 files" in text
    assert re.search(r"8\.0/8\.0 MiB \d+\.\d (KiB|MiB|GiB)/s ", text), text
    assert not re.search(r"\d (kB|MB|GB)", text)
    assert rate_text(1.5 * 1024**2) == "1.5 MiB/s" and rate_text(None) == "?"
