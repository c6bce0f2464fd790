"""The ``swarm`` console script (and ``python -m cli``): the command line, started cheaply.

A fetch's start-up is mostly imports, and eight fetches starting at once on a 2-core
host (the shaped testbed's burst) wait for one another's. The cyclic collector runs
dozens of times while the modules build their classes (dataclasses make hundreds of
functions) and can free none of it. Eight processes importing the command line at
once, median of 8 bursts: 0.99 s and 0.244 CPU-s each before Rich, yarl and the
simulator's command line were kept out of a fetch; 0.75 s and 0.185 after; 0.60 s
and 0.147 with the collector paused as here. What the imports built is then
frozen, so later collections in a long-lived peer never walk it again.
"""

from __future__ import annotations

import gc


def main() -> None:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        from cli.main import main as run
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
    run()
