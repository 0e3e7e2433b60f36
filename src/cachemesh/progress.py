"""Progress bars for long CLI work, on stderr (rich).

Sizes and rates in the same binary units (MiB and MiB/s): rich's own speed column
says MB/s beside its MiB counts."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .caches import Progress


def rate_text(bytes_per_s: float | None) -> str:
    """A transfer rate in the units of the sizes beside it: ``12.5 MiB/s``."""
    from .config import format_size

    return "?" if bytes_per_s is None else f"{format_size(int(bytes_per_s))}/s"


class PullBar:
    """One bar per pull: bytes, rate, files. A no-op when disabled or not a TTY.
    ``console``: where to draw (default: stderr)."""

    def __init__(self, name: str, *, enabled: bool = True, console: Any = None) -> None:
        self.name = name
        self.enabled = enabled
        self.console = console
        self._progress = None
        self._task = None

    def __enter__(self) -> PullBar:
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class BinarySpeed(ProgressColumn):
            def render(self, task: Any) -> Text:
                return Text(rate_text(task.finished_speed or task.speed),
                            style="progress.data.speed")

        console = self.console or Console(stderr=True)
        if not console.is_terminal:
            self.enabled = False
            return self
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            BinarySpeed(), TextColumn("{task.fields[files]}"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.name, total=None, files="")
        return self

    def update(self, p: Progress) -> None:
        if self._progress is None or self._task is None:
            return
        self._progress.update(
            self._task, completed=p.bytes_done, total=p.bytes_total or None,
            files=f"{p.files_done}/{p.files_total} files",
        )

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
