"""The settings of ``swarm demo``, apart from the demo: the command line reads their
defaults without loading it (a ``swarm fetch`` imports this, not :mod:`swarm.demo`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["DemoConfig"]


@dataclass
class DemoConfig:
    peers: int = 6
    size: int = 256 * 1024 * 1024
    piece_size: int = 16 * 1024 * 1024
    shards: int = 4
    seed: int = 1
    workdir: Path | None = None
    keep: bool = False
    timeout: float = 600.0
