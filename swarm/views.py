"""Pods' views of cached versions, and their removal once the pod is gone.

On Kubernetes an init container links a version into ``VIEWS/<pod uid>/...`` (the
same host directory as the agent's cache, so linking stays inside one mount), and
the pod's server reads that directory. A view's hard links are the pod's lease on
the version (see ``swarm.agent``); the lease must end when the pod ends, and a
hostPath outlives its pods. The kubelet keeps ``/var/lib/kubelet/pods/<uid>`` for
exactly as long as the pod exists on the node, so a view whose uid is no longer
there (and that is older than a grace period, for a pod still being set up) is
removed.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

POD_UID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
GRACE: Final = 120.0  # seconds a view may exist before its pod's directory does


def collect(views: Path, kubelet_pods: Path, *, grace: float = GRACE) -> list[str]:
    """Remove the views of pods that are gone; the uids removed.

    Only directories named like a pod uid are touched. Nothing is removed when the
    kubelet's directory is missing or empty (a mount that failed would otherwise
    make every view look orphaned).
    """
    try:
        if not any(kubelet_pods.iterdir()):
            return []
        entries = list(views.iterdir())
    except OSError:
        return []
    removed: list[str] = []
    now = time.time()
    for entry in entries:
        if not POD_UID.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            if (kubelet_pods / entry.name).exists() or now - entry.stat().st_mtime < grace:
                continue
            shutil.rmtree(entry)
        except OSError as exc:
            log.warning("can't remove the view %s of a pod that is gone: %s", entry, exc)
            continue
        log.info("removed the view of pod %s (gone from this node)", entry.name)
        removed.append(entry.name)
    return removed
