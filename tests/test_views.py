"""swarm.views.collect: a pod's view goes once its pod is gone from the node, and
nothing else ever goes (on real directories)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from swarm.views import collect


def _view(views: Path, name: str, age: float) -> Path:
    path = views / name / "model"
    path.mkdir(parents=True)
    (path / "weights.bin").write_bytes(b"w")
    past = time.time() - age
    os.utime(views / name, (past, past))
    return views / name


def test_only_old_views_of_pods_that_are_gone_are_removed(tmp_path: Path) -> None:
    views, pods = tmp_path / "views", tmp_path / "pods"
    running, gone, starting = (str(uuid.uuid4()) for _ in range(3))
    (pods / running).mkdir(parents=True)
    _view(views, running, age=3600)
    _view(views, gone, age=3600)
    _view(views, starting, age=5)  # its pod may not have a directory yet
    _view(views, "not-a-pod-uid", age=3600)
    (views / str(uuid.uuid4())).symlink_to(tmp_path)  # never followed, never removed
    assert collect(views, pods) == [gone]
    assert sorted(p.name for p in views.iterdir() if not p.is_symlink()) == sorted(
        [running, starting, "not-a-pod-uid"]
    )
    assert tmp_path.exists()


def test_nothing_is_removed_when_the_kubelet_directory_is_missing_or_empty(
    tmp_path: Path,
) -> None:
    views, pods = tmp_path / "views", tmp_path / "pods"
    gone = str(uuid.uuid4())
    _view(views, gone, age=3600)
    assert collect(views, pods) == []  # missing: a mount that failed
    pods.mkdir()
    assert collect(views, pods) == []  # empty: the same
    assert (views / gone).exists()
