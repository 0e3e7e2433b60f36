"""Progress bars for long CLI work, on stderr (rich)."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .caches import Progress


class PullBar:
    """One bar per pull: bytes, rate, files. A no-op when disabled or not a TTY."""

    def __init__(self, name: str, *, enabled: bool = True) -> None:
        self.name = name
        self.enabled = enabled
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
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        console = Console(stderr=True)
        if not console.is_terminal:
            self.enabled = False
            return self
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TextColumn("{task.fields[files]}"), TimeRemainingColumn(),
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
