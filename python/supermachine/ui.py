"""Terminal output shared by the CLI commands: tables on stdout, progress and warnings on stderr."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

# Tables written to a pipe or file get a wide fixed width instead of rich's 80-column default.
_PIPE_WIDTH = 160
stdout = Console(highlight=False)
if not stdout.is_terminal:
    stdout = Console(highlight=False, width=_PIPE_WIDTH)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/yellow] {message}", markup=True, highlight=False)


@contextmanager
def _progress(description: str, total: int, *columns: ProgressColumn) -> Iterator[Progress]:
    """A transient bar on stderr with one task, shown only on a terminal."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        *columns,
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    ) as progress:
        progress.add_task(description, total=total)
        yield progress


def byte_progress(description: str, total: int) -> AbstractContextManager[Progress]:
    """A transfer-style bar: bytes done, speed, time left."""
    return _progress(
        description, total, DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn()
    )


def count_progress(description: str, total: int) -> AbstractContextManager[Progress]:
    """An item-count bar: items done of total, time left."""
    return _progress(description, total, MofNCompleteColumn(), TimeRemainingColumn())
