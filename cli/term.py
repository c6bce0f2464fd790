"""stderr as Rich sees it, without importing Rich where no terminal needs it.

Rich costs a process ~30 ms of CPU to import, a sixth of a ``swarm fetch``'s start-up,
and an init container, a node agent or a benchmark never writes to a terminal: their
logs are JSON lines and their progress is lines too. Rich is loaded when something
is drawn or printed with markup, not before.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["error", "escape", "say", "stderr", "stderr_is_terminal"]

_RICH_TERMINAL_ENV = ("TTY_COMPATIBLE", "FORCE_COLOR")
"""The variables that make Rich call a stream a terminal whatever its ``isatty`` says."""


@functools.cache
def stderr() -> Console:
    """The Rich console on stderr (stdout stays free for ``--json``), made on first use."""
    from rich.console import Console

    return Console(stderr=True)


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal, as :attr:`rich.console.Console.is_terminal` decides.

    Answered without Rich when stderr is not a tty and no variable Rich reads says
    otherwise (Rich's answer is then False too); otherwise Rich answers.
    """
    if not any(name in os.environ for name in _RICH_TERMINAL_ENV):
        try:
            tty = sys.stderr.isatty()
        except (AttributeError, ValueError):  # no stderr, or a closed one
            tty = False
        if not tty:
            return False
    return stderr().is_terminal


def escape(text: str) -> str:
    """``text`` with Rich markup escaped, for a line printed on the console."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _line(plain: str, markup: Callable[[], str]) -> None:
    """One line on stderr: ``markup()`` through Rich on a terminal, ``plain`` elsewhere
    (without loading Rich or wrapping it); nothing when the process has no stderr
    (started with it closed: stdout is not for this)."""
    if stderr_is_terminal():
        stderr().print(markup(), highlight=False, soft_wrap=True)
    elif sys.stderr is not None:
        print(plain, file=sys.stderr, flush=True)


def say(text: str, style: str = "") -> None:
    """``text`` on stderr, in Rich's ``style`` on a terminal."""
    _line(text, lambda: f"[{style}]{escape(text)}[/]" if style else escape(text))


def error(message: str) -> None:
    """``error: message``, the one line a failed command leaves on stderr."""
    _line(f"error: {message}", lambda: f"[bold red]error:[/] {escape(message)}")
