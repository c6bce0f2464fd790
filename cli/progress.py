"""Progress on stderr (stdout stays free for ``--json``): Rich bars or periodic lines.

On a terminal a Rich bar redraws itself. Anywhere else (``kubectl logs`` of an init
container, a CI log, a file) a bar would print nothing until the end, so a line is
logged instead at a steady interval, at the start and at the end: bytes done and
total, percent, rate, ETA and, for a swarm fetch, origin vs peer bytes. The line
is a log record on :data:`cli.logs.PROGRESS_LOGGER`, so it is a JSON event in JSON
mode and a plain line in text mode.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from cli import term
from cli.logs import PROGRESS_LOGGER, current_format
from core.units import format_size

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = [
    "DEFAULT_PROGRESS_INTERVAL",
    "ByteProgress",
    "ProgressSample",
    "SourceBytes",
    "byte_progress",
    "progress_as_lines",
]

DEFAULT_PROGRESS_INTERVAL: Final = 10.0
SourceBytes = Callable[[], tuple[int, int]]
"""Bytes so far from the origin and from peers (a swarm fetch's split)."""

log = logging.getLogger(PROGRESS_LOGGER)


def progress_as_lines() -> bool:
    """Whether progress is logged as lines (no terminal, or JSON logs) rather than drawn."""
    return current_format() == "json" or not term.stderr_is_terminal()


@dataclass(frozen=True)
class ProgressSample:
    """What one progress line reports; pure arithmetic over two readings of the counters."""

    description: str
    done: int
    total: int | None
    elapsed: float
    rate: float
    """Bytes per second since the previous line (over the whole run for the last line)."""
    sources: tuple[int, int] | None = None
    final: bool = False
    stopped: bool = False
    """The last line of a task that failed or was interrupted."""

    @property
    def percent(self) -> float | None:
        if not self.total:
            return None
        return min(100.0, 100.0 * self.done / self.total)

    @property
    def eta(self) -> float | None:
        if self.total is None or self.rate <= 0 or self.final:
            return None
        return max(0.0, (self.total - self.done) / self.rate)

    def message(self) -> str:
        text = f"{self.description}: {format_size(self.done)}"
        if self.total is not None:
            text += f" of {format_size(self.total)}"
        if self.percent is not None:
            text += f" ({self.percent:.1f}%)"
        text += f", {format_size(self.rate)}/s"
        if self.final:
            text += f", {'stopped after' if self.stopped else 'done in'} {self.elapsed:.1f}s"
        elif self.eta is not None:
            text += f", ETA {_duration(self.eta)}"
        if self.sources is not None:
            text += f"; origin {format_size(self.sources[0])}, peers {format_size(self.sources[1])}"
        return text

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event": "progress",
            "task": self.description,
            "bytes_done": self.done,
            "bytes_total": self.total,
            "percent": None if self.percent is None else round(self.percent, 2),
            "bytes_per_second": round(self.rate),
            "eta_seconds": None if self.eta is None else round(self.eta, 1),
            "elapsed_seconds": round(self.elapsed, 3),
            "final": self.final,
        }
        if self.final:
            out["outcome"] = "stopped" if self.stopped else "done"
        if self.sources is not None:
            out["origin_bytes"], out["peer_bytes"] = self.sources
        return out


def _duration(seconds: float) -> str:
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class _LineReporter:
    """Counts bytes from any thread; a daemon thread logs a line every ``interval`` seconds."""

    def __init__(
        self,
        description: str,
        total: int | None,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description = description
        self.total = total
        self.interval = interval
        self.sources: SourceBytes | None = None
        self._clock = clock
        self._lock = threading.Lock()
        self._done = 0
        self._started = clock()
        self._last = (self._started, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def advance(self, n: int) -> None:
        with self._lock:
            self._done += n

    def set_total(self, total: int) -> None:
        self.total = total

    def sample(self, *, final: bool = False, stopped: bool = False) -> ProgressSample:
        now = self._clock()
        with self._lock:
            done = self._done
        since, done_then = (self._started, 0) if final else self._last
        rate = (done - done_then) / (now - since) if now > since else 0.0
        self._last = (now, done)
        return ProgressSample(
            self.description,
            done,
            self.total,
            now - self._started,
            rate,
            self.sources() if self.sources is not None else None,
            final,
            stopped,
        )

    def emit(self, *, final: bool = False, stopped: bool = False) -> None:
        sample = self.sample(final=final, stopped=stopped)
        log.info("%s", sample.message(), extra=sample.fields())

    def start(self) -> None:
        self.emit()
        self._thread.start()

    def stop(self, *, stopped: bool = False) -> None:
        self._stop.set()
        self._thread.join()
        self.emit(final=True, stopped=stopped)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.emit()


class ByteProgress:
    """One byte counter shown as a bar or as lines: ``advance(n)`` from any callback."""

    def __init__(
        self,
        progress: Progress | None = None,
        task: TaskID | None = None,
        lines: _LineReporter | None = None,
    ) -> None:
        self._progress = progress
        self._task = task
        self._lines = lines

    def advance(self, n: int) -> None:
        if self._lines is not None:
            self._lines.advance(n)
        elif self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def set_total(self, total: int) -> None:
        if self._lines is not None:
            self._lines.set_total(total)
        elif self._progress is not None and self._task is not None:
            self._progress.update(self._task, total=total)


@contextmanager
def byte_progress(
    description: str,
    total: int | None,
    *,
    enabled: bool = True,
    interval: float = DEFAULT_PROGRESS_INTERVAL,
    sources: SourceBytes | None = None,
) -> Iterator[ByteProgress]:
    """A transfer bar on a terminal, a progress line every ``interval`` s elsewhere, or nothing.

    ``sources`` adds origin vs peer bytes to the lines (a bar shows the total only).
    """
    if not enabled:
        yield ByteProgress()
        return
    if progress_as_lines():
        reporter = _LineReporter(description, total, interval)
        reporter.sources = sources
        reporter.start()
        try:
            yield ByteProgress(lines=reporter)
        except BaseException:
            reporter.stop(stopped=True)
            raise
        reporter.stop()
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=term.stderr(),
        transient=False,
    )
    with progress:
        yield ByteProgress(progress, progress.add_task(description, total=total))
