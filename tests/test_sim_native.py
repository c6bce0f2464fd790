"""``swarm simulate --native``: the mypyc build of the simulator gives the same results.

The build is real (mypyc and the C compiler, into a temporary cache), and the
compiled and interpreted runs are separate ``swarm`` processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from simulations import native

SCENARIO = [
    "faults",
    "--nodes",
    "60",
    "--model-size",
    "4GiB",
    "--piece-size",
    "64MiB",
    "--strategy",
    "swarm,cache,direct",
    "--json",
]

# Fields that differ between two runs of the same simulation by design.
_RUN_FIELDS = {"wall_seconds", "engine"}


def _swarm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "swarm"
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, env=env, timeout=240, check=False
    )


def _outcome(result: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in result.items() if key not in _RUN_FIELDS}


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler to build with")
def test_the_compiled_simulator_gives_the_interpreted_results(tmp_path: Path) -> None:
    env = {**os.environ, "SWARM_NATIVE_CACHE": str(tmp_path / "cache")}
    env.pop("SWARM_SIM_NATIVE", None)
    plain = _swarm("simulate", *SCENARIO, env=env)
    assert plain.returncode == 0, plain.stderr
    compiled = _swarm("simulate", *SCENARIO, "--native", env=env)
    assert compiled.returncode == 0, compiled.stderr
    assert "compiling" in compiled.stderr

    plain_obj = json.loads(plain.stdout)
    compiled_obj = json.loads(compiled.stdout)
    assert [r["engine"] for r in plain_obj["results"]] == ["cpython"] * 3
    assert [r["engine"] for r in compiled_obj["results"]] == ["mypyc"] * 3
    assert [_outcome(r) for r in compiled_obj["results"]] == [
        _outcome(r) for r in plain_obj["results"]
    ]
    # One build per source digest: the second run finds it and does not compile.
    builds = list((tmp_path / "cache").iterdir())
    assert [b.name for b in builds] == [native.source_digest()]
    again = _swarm("simulate", *SCENARIO, "--native", env=env)
    assert again.returncode == 0, again.stderr
    assert "compiling" not in again.stderr


def test_the_build_is_named_by_the_sources(tmp_path: Path) -> None:
    root = Path(native.__file__).resolve().parent.parent
    for package in native.PACKAGES:
        shutil.copytree(root / package, tmp_path / package)
    before = native.source_digest(tmp_path)
    assert before == native.source_digest(root)
    picker = tmp_path / "swarm" / "picker.py"
    picker.write_text(picker.read_text() + "\n# changed\n")
    assert native.source_digest(tmp_path) != before


def test_without_a_compiler_the_error_says_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWARM_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with pytest.raises(native.NativeBuildError, match="C compiler"):
        native.ensure_built()
    assert list(tmp_path.iterdir()) == []  # nothing half-built left behind
