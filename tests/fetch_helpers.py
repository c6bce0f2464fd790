"""Helpers for end-to-end runs of the real ``swarm`` command line (``tests/test_fetch_e2e.py``).

``swarm(...)`` runs the installed console script as a subprocess with a timeout and
returns what it printed; ``Run.json()`` insists on exactly one JSON object on stdout.
``make_model`` builds deterministic synthetic artifacts; ``piece_table`` lays files out
in pieces independently of the code under test, so expectations about piece numbers
and sizes don't come from the implementation they check.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servers import venv_binary

SWARM_TIMEOUT = 60.0
STATE_DIR = ".swarm"
COMPLETE_MARKER = ".swarm-complete"

# Variables a developer's shell might carry that would change what the CLI does.
_SCRUBBED_ENV = ("SWARM_CATALOG", "COLUMNS", "LINES")


def swarm_argv(*args: str) -> list[str]:
    """The argv of one ``swarm`` invocation (the console script ``make setup`` installs)."""
    return [venv_binary("swarm"), *args]


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment (fixtures set AWS_* / STORAGE_EMULATOR_HOST in it) plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class Run:
    """One finished ``swarm`` invocation."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    """Wall time from start until collected (for concurrent runs, an upper bound)."""

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.argv[1:])}\nexit {self.returncode} after {self.seconds:.1f} s\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr[-4000:]}"
        )

    def json(self) -> dict[str, Any]:
        """The single JSON object on stdout (and nothing else there)."""
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected exactly one JSON line on stdout\n{self.describe()}"
        obj = json.loads(lines[0])
        assert isinstance(obj, dict), f"stdout is JSON but not an object\n{self.describe()}"
        return obj

    def ok(self) -> dict[str, Any]:
        """Assert exit 0 and return the JSON summary."""
        assert self.returncode == 0, self.describe()
        return self.json()

    def error_line(self) -> str:
        """Assert a clean failure: non-zero exit, no traceback, one ``error:`` line; return it."""
        assert self.returncode > 0, self.describe()
        assert "Traceback" not in self.stderr, self.describe()
        assert "ExceptionGroup" not in self.stderr, self.describe()
        assert self.stdout.strip() == "", f"a failed run printed on stdout\n{self.describe()}"
        errors = [line for line in self.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"expected exactly one 'error:' line\n{self.describe()}"
        return errors[0]


def swarm(*args: str, env: Mapping[str, str] | None = None, timeout: float = SWARM_TIMEOUT) -> Run:
    """Run ``swarm ARGS...`` to completion (killed after ``timeout`` seconds)."""
    argv = swarm_argv(*args)
    started = time.monotonic()
    done = subprocess.run(
        argv,
        env=cli_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Run(argv, done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def swarm_concurrently(
    *invocations: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = SWARM_TIMEOUT,
) -> list[Run]:
    """Run several independent ``swarm`` invocations at once (startup dominates short runs)."""
    started = time.monotonic()
    procs = [
        (
            swarm_argv(*args),
            subprocess.Popen(
                swarm_argv(*args),
                env=cli_env(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for args in invocations
    ]
    runs: list[Run] = []
    try:
        for argv, proc in procs:
            left = max(0.1, started + timeout - time.monotonic())
            out, err = proc.communicate(timeout=left)
            runs.append(Run(argv, proc.returncode, out, err, time.monotonic() - started))
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
    return runs


def publish(
    origin_url: str,
    name: str,
    catalog: str,
    *,
    piece_size: str,
    files: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``swarm publish ... --json``; asserts success and returns its JSON object."""
    args = ["publish", origin_url, "--name", name, "--catalog", catalog]
    args += ["--piece-size", piece_size, "--json"]
    for key in files:
        args += ["--file", key]
    result = swarm(*args, env=env).ok()
    assert result["artifact"] == name
    assert result["ref"] == f"{name}@{result['root']}"
    return result


def fetch_args(ref: str, catalog: str, dest: Path, *extra: str) -> list[str]:
    """The arguments of ``swarm fetch REF --catalog C --dest D --direct --json EXTRA...``."""
    return ["fetch", ref, "--catalog", catalog, "--dest", str(dest), "--direct", "--json", *extra]


def make_model(seed: int, sizes: Mapping[str, int]) -> dict[str, bytes]:
    """Files of the given sizes filled with seeded random bytes (JSON-ish for ``*.json``)."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for path, size in sizes.items():
        if path.endswith(".json"):
            text = json.dumps({"seed": seed, "path": path}).encode()
            files[path] = (text * (size // max(1, len(text)) + 1))[:size]
        else:
            files[path] = rng.randbytes(size)
    return files


@dataclass(frozen=True)
class PieceSpan:
    index: int
    path: str
    offset: int
    length: int


def piece_table(files: Mapping[str, bytes], piece_size: int) -> list[PieceSpan]:
    """Pieces in global order: files sorted by key, each cut into ``piece_size`` runs."""
    spans: list[PieceSpan] = []
    for path in sorted(files):
        size = len(files[path])
        for offset in range(0, size, piece_size):
            spans.append(PieceSpan(len(spans), path, offset, min(piece_size, size - offset)))
    return spans


def assert_same_files(dest: Path, files: Mapping[str, bytes]) -> None:
    """``dest`` holds exactly ``files`` (besides swarm's own state), byte for byte."""
    found = sorted(
        p.relative_to(dest).as_posix()
        for p in dest.rglob("*")
        if p.is_file() and not p.relative_to(dest).parts[0].startswith(".swarm")
    )
    assert found == sorted(files), f"files in {dest} differ from the artifact"
    for path, data in files.items():
        on_disk = (dest / path).read_bytes()
        assert len(on_disk) == len(data), f"{path}: {len(on_disk)} bytes, expected {len(data)}"
        assert on_disk == data, f"{path}: content differs from the origin"


def complete_marker(dest: Path) -> dict[str, Any] | None:
    """The completion marker's record, or None if ``dest`` is not marked complete."""
    path = dest / COMPLETE_MARKER
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    assert isinstance(record, dict)
    return record


def verified_pieces(dest: Path, root: str) -> list[int]:
    """Indexes recorded as verified in ``dest``'s piece state for version ``root``."""
    try:
        state = (dest / STATE_DIR / f"{root}.state").read_bytes()
    except FileNotFoundError:
        return []
    return [i for i, flag in enumerate(state) if flag == 1]
