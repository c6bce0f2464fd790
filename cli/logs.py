"""Log records on stderr: one JSON object per line for collectors, or text for people.

``kubectl logs`` of an init container is read by log collectors (Loki, Fluent Bit,
Cloud Logging), which parse JSON lines; a person at a terminal wants Rich's look.
:func:`configure` picks one: JSON when stderr is not a terminal, unless told.

A command binds its context once (:func:`bind`: the artifact, its root, this peer's
id) and every record that reaches the handler carries it, so no log call has to
repeat it. The binding is process-wide rather than a contextvar: one process runs
one command, and records also come from worker threads, which a contextvar set in
the event loop would not reach.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, TextIO

from cli import term

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "LOG_FORMATS",
    "NOTICE_LOGGER",
    "PROGRESS_LOGGER",
    "ContextFilter",
    "JsonFormatter",
    "LogFormat",
    "PlainFormatter",
    "as_extra",
    "bind",
    "bound",
    "configure",
    "current_format",
    "rfc3339",
    "unconfigure",
]

LogFormat = Literal["json", "text"]
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("json", "text")
PROGRESS_LOGGER: Final = "swarm.progress"
"""Progress lines: logged at INFO, shown whatever the level of the other loggers."""
NOTICE_LOGGER: Final = "swarm.cli"
"""What a command tells its operator (a summary, a retry): shown whatever the level."""

# Attributes every LogRecord has; anything else on a record came from ``extra=`` or a filter.
_RECORD_ATTRS: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def rfc3339(created: float) -> str:
    """``created`` (seconds since the epoch) as RFC 3339 UTC with milliseconds."""
    whole = int(created)
    millis = int((created - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call or a filter added to ``record`` (its ``extra=``)."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRS and not key.startswith("_")
    }


def as_extra(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` safe to pass as ``extra=``: a name a LogRecord already has gets a ``_`` suffix
    (``logging`` refuses to overwrite ``name``, ``process``, ``message``...)."""
    return {f"{key}_" if key in _RECORD_ATTRS else key: value for key, value in fields.items()}


class ContextFilter(logging.Filter):
    """Adds the bound fields to every record that has no field of that name yet."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, Any] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.fields.items():
            if key not in record.__dict__:
                setattr(record, key, value)
        return True


_context: Final = ContextFilter()
_format: LogFormat | None = None
_handlers: list[logging.Handler] = []
_saved_level: list[int] = []


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to ``stream``, or to whatever ``sys.stderr`` is at the time of each record
    (test runners swap it, and a handler holding an old one would write to a closed file)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream or sys.stderr)
        self._fixed = stream

    def emit(self, record: logging.LogRecord) -> None:
        if self._fixed is None:
            self.stream = sys.stderr
        super().emit(record)


def bind(**fields: Any) -> None:
    """Attach ``fields`` (e.g. ``artifact=``, ``root=``, ``peer_id=``) to every later record.

    A value of None removes the field.
    """
    for key, value in fields.items():
        if value is None:
            _context.fields.pop(key, None)
        else:
            _context.fields[key] = value


def bound() -> Mapping[str, Any]:
    """The fields bound so far."""
    return dict(_context.fields)


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...fields}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record_fields(record).items():
            obj.setdefault(key, value)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _one_line(text: str) -> str:
    """``text`` with control and bidi characters escaped: whatever a remote put in a
    message (an address, a name) can't start a line of its own or reorder one."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class PlainFormatter(logging.Formatter):
    """``TS LEVEL logger: message key=value ...`` for a text log without a terminal.

    Only fields the log call passed are shown: the bound context is the same on every
    line of a process, and a progress line or notice already says its fields in words.
    """

    def format(self, record: logging.LogRecord) -> str:
        fields = {
            k: v
            for k, v in record_fields(record).items()
            if k not in _context.fields and record.name not in (PROGRESS_LOGGER, NOTICE_LOGGER)
        }
        message = _one_line(record.getMessage())
        line = f"{rfc3339(record.created)} {record.levelname} {record.name}: {message}"
        if fields:
            line += " " + " ".join(f"{k}={_one_line(str(v))}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(
    log_format: LogFormat | None,
    level: int,
    console: Console | None = None,
    *,
    stream: TextIO | None = None,
) -> LogFormat:
    """Send every record at ``level`` or above to stderr in ``log_format``; return the format.

    None picks text on a terminal and JSON otherwise. Progress and notices
    (:data:`PROGRESS_LOGGER`, :data:`NOTICE_LOGGER`) pass at INFO even when ``level`` is higher.
    ``console``: where Rich draws text records on a terminal (default: stderr's).
    """
    global _format
    terminal = console.is_terminal if console is not None else term.stderr_is_terminal()
    chosen: LogFormat = log_format or ("text" if terminal else "json")
    handler: logging.Handler
    if chosen == "text" and terminal:
        from rich.logging import RichHandler

        handler = RichHandler(
            console=console or term.stderr(), show_path=False, rich_tracebacks=False
        )
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = _StderrHandler(stream)
        handler.setFormatter(JsonFormatter() if chosen == "json" else PlainFormatter())
    handler.addFilter(_context)
    unconfigure()
    root = logging.getLogger()
    _saved_level.append(root.level)
    root.addHandler(handler)
    root.setLevel(level)
    _handlers.append(handler)
    for name in (PROGRESS_LOGGER, NOTICE_LOGGER):
        logging.getLogger(name).setLevel(min(level, logging.INFO))
    _format = chosen
    return chosen


def unconfigure() -> None:
    """Remove what :func:`configure` installed (handlers of others, e.g. pytest's, stay)."""
    global _format
    root = logging.getLogger()
    while _handlers:
        handler = _handlers.pop()
        root.removeHandler(handler)
        handler.close()
    while _saved_level:
        root.setLevel(_saved_level.pop())
    for name in (PROGRESS_LOGGER, NOTICE_LOGGER):
        logging.getLogger(name).setLevel(logging.NOTSET)
    _format = None


def current_format() -> LogFormat | None:
    """The format :func:`configure` chose, or None before it ran."""
    return _format
