"""Rich progress on stderr; stdout stays free for ``--json``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

stderr = Console(stderr=True)


class ByteProgress:
    """One byte-counting bar: ``advance(n)`` from any callback in the event loop."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def set_total(self, total: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, total=total)


@contextmanager
def byte_progress(
    description: str, total: int | None, *, enabled: bool = True
) -> Iterator[ByteProgress]:
    """A transfer bar (bytes, rate, ETA) on stderr, or a silent one when disabled."""
    if not enabled:
        yield ByteProgress(None, None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=False,
    )
    with progress:
        yield ByteProgress(progress, progress.add_task(description, total=total))
