"""Progress reporting for pulls: a small protocol, and a rich implementation with one bar per layer."""

from __future__ import annotations

import threading
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    # rich is imported when a progress display is made: `pull -q` does without it.
    from rich.console import Console
    from rich.progress import TaskID


class ProgressReporter(Protocol):
    """Receives per-blob progress from :func:`supermachine.oci.pull`. Called from worker threads."""

    def start(self, key: str, description: str, total: int) -> None: ...

    def update(self, key: str, completed: int) -> None: ...

    def finish(self, key: str, note: str) -> None: ...


class RichProgress:
    """One rich progress bar per blob; use as a context manager around the pull."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._totals: dict[str, int] = {}
        self._started = False
        self._lock = threading.Lock()

    def __enter__(self) -> RichProgress:
        return self  # the display starts with the first bar, so early errors print nothing else

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._started:
            self._progress.stop()

    def start(self, key: str, description: str, total: int) -> None:
        with self._lock:
            if not self._started:
                self._progress.start()
                self._started = True
            self._tasks[key] = self._progress.add_task(description, total=total, note="")
            self._totals[key] = total

    def update(self, key: str, completed: int) -> None:
        self._progress.update(self._tasks[key], completed=completed)

    def finish(self, key: str, note: str) -> None:
        self._progress.update(self._tasks[key], completed=self._totals[key], note=note)
