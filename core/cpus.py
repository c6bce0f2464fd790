"""How many cores this process may use: its CPU affinity, capped by a cgroup CPU quota.

A container limited to 4 CPUs on a 64-core node sees 64 in ``os.cpu_count()`` and
in its affinity mask; the quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``)
is what it may actually use. Worker pools sized from this neither starve on a big
node nor oversubscribe a small container.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Final

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")


def _quota(root: Path) -> float | None:
    """CPUs the cgroup quota allows (fractional), or None when there is none."""
    try:
        text = (root / "cpu.max").read_text().split()  # v2: "max 100000" or "200000 100000"
        if len(text) == 2 and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 for none
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may run on at once (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _quota(cgroup_root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)
