"""A compiled build of the simulator for large runs (mypyc), from the same source files.

A 1000-node, 4096-piece burst is about four million piece transfers, each of
which runs the real picker, upload scheduler and network solver. Interpreted,
that is six minutes; compiled with mypyc (which turns the type-annotated
modules into C extensions, statement for statement) it is half a minute to
three quarters of one, as this VM's speed drifts (``benchmarks/sim_speed.py``).
Nothing is rewritten for speed: the compiled modules are the production
:mod:`swarm.picker`, :mod:`swarm.choker` and :mod:`core.bitfield` and the
simulator's own engine, network and strategies, built from the files in this
checkout, so the policy simulated is still the policy the peers run.

How it works: :func:`ensure_built` copies the packages the simulator imports
into a cache directory named by a digest of their sources (and of the Python
and mypy versions), compiles :data:`COMPILED` there, and marks the directory
complete only when the compiler succeeded (a crash leaves no half build that
looks finished). :func:`reexec` then replaces the current process with the
same command run with that directory first on ``sys.path``, so every import
resolves to the build. A changed source file changes the digest and so gets a
new build; nothing stale is ever run.

Only the simulator runs this way (``swarm simulate --native``,
``python -m simulations.make_results --native``); peers, the tracker and the
tests import the plain modules.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from core.errors import SwarmError

__all__ = [
    "COMPILED",
    "PACKAGES",
    "NativeBuildError",
    "active",
    "build_dir",
    "ensure_built",
    "reexec",
    "reexecuted",
    "source_digest",
]

# Packages copied into the build (everything `swarm simulate` imports from this
# project) and, of those, the modules compiled: the ones a run spends its time in.
PACKAGES = ("cli", "core", "seeder", "simulations", "swarm", "tracker")
COMPILED = (
    "core/bitfield.py",
    "swarm/choker.py",
    "swarm/picker.py",
    "swarm/session.py",
    "tracker/registry.py",
    "tracker/zones.py",
    "simulations/network.py",
    "simulations/engine.py",
    "simulations/strategies.py",
    "simulations/session_swarm.py",
)

_MARKER = "BUILT"
_ENV = "SWARM_SIM_NATIVE"  # set in the re-executed process


class NativeBuildError(SwarmError):
    """The compiled simulator could not be built (no C compiler, mypyc failed)."""


def _root() -> Path:
    return Path(__file__).resolve().parent.parent


def _sources(root: Path) -> list[Path]:
    files: list[Path] = []
    for package in PACKAGES:
        files.extend(sorted((root / package).rglob("*.py")))
    return files


def source_digest(root: Path | None = None) -> str:
    """Digest of everything that determines the build: sources, module list, toolchain."""
    try:
        import mypy.version
    except ImportError:
        raise NativeBuildError(
            "--native needs mypy (which ships mypyc): pip install 'swarm[sim]' or pip install mypy"
        ) from None

    root = _root() if root is None else root
    digest = hashlib.sha256()
    digest.update(f"{sys.version}\0{mypy.version.__version__}\0{COMPILED}\0".encode())
    for path in _sources(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_dir(root: Path | None = None) -> Path:
    """Where the build for the current sources lives (it may not exist yet)."""
    base = os.environ.get("SWARM_NATIVE_CACHE")
    if base is None:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        base = str(Path(cache) / "swarm" / "sim-native")
    return Path(base) / source_digest(root)


def active() -> bool:
    """True when the simulator modules in this process are the compiled ones."""
    from simulations import engine

    return not engine.__file__.endswith(".py")


def _compiler() -> str | None:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) or shutil.which("cc") or shutil.which("gcc")


def ensure_built(root: Path | None = None, *, log: Callable[[str], None] = lambda _: None) -> Path:
    """The directory of a complete build of the current sources, building it if needed."""
    root = _root() if root is None else root
    target = build_dir(root)
    if (target / _MARKER).exists():
        return target
    if _compiler() is None:
        raise NativeBuildError(
            "--native needs a C compiler (cc/gcc) and the Python headers to build the "
            "compiled simulator; install them (Debian: apt-get install gcc python3-dev) "
            "or run without --native"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for package in PACKAGES:
            shutil.copytree(
                root / package,
                work / package,
                ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.png", "*.md"),
            )
        if source_digest(work) != target.name:
            raise NativeBuildError("the sources changed while they were copied; run again")
        log(
            f"compiling {len(COMPILED)} simulator modules with mypyc "
            "(under a minute, once per change of the sources)"
        )
        with open(work / "build.log", "wb") as out:
            done = subprocess.run(
                [sys.executable, "-m", "mypyc", *COMPILED],
                cwd=work,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if done.returncode != 0:
            tail = (work / "build.log").read_text(errors="replace").splitlines()[-15:]
            raise NativeBuildError(
                f"mypyc failed (exit {done.returncode}); last lines of its log:\n" + "\n".join(tail)
            )
        (work / _MARKER).write_text(target.name + "\n")
        try:
            work.rename(target)
        except OSError:
            if not (target / _MARKER).exists():  # not a concurrent build that won
                raise
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"compiled simulator in {target}")
    return target


def reexec(module: str, argv: Sequence[str], build: Path) -> NoReturn:
    """Replace this process with ``python -m module *argv`` importing from ``build``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(build), env.get("PYTHONPATH")) if p)
    env[_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    # -P: don't put the working directory (maybe this checkout) ahead of the build.
    os.execve(sys.executable, [sys.executable, "-P", "-m", module, *argv], env)


def reexecuted() -> bool:
    """True in the process :func:`reexec` started (so it never re-executes again)."""
    return os.environ.get(_ENV) == "1"
