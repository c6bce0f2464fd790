"""``swarm verify``: hash every piece of a destination again and say which are bad.

The manifest comes from the destination itself (``DEST/.swarm/<root>.manifest``,
written by the fetch that filled it), so verifying needs no tracker or catalog.
Pieces are hashed on every core: a thread pool whose workers each own one reused
buffer (blake3 releases the GIL), so memory stays at ``workers x chunk`` however
large the artifact.

What it finds is written back: bad pieces stop being recorded as verified, good
ones are recorded with the identity of the file they were read from, and the
completion marker goes if anything is bad. A following fetch (``fetch_direct``
or a swarm peer) then fetches exactly the bad pieces.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.cpus import usable_cores
from core.errors import ManifestError, StoreError
from core.manifest import MAX_COMPRESSED_SIZE, Manifest
from swarm.store import (
    IDENTITY,
    NO_IDENTITY,
    STATE_DIR,
    DestLock,
    identities_path,
    identity,
    manifest_path,
    open_regular,
    read_complete_marker,
    read_owner,
    read_small,
    remove_complete_marker,
    replace_file,
    state_path,
    write_owner,
)

_CHUNK = 8 * 1024 * 1024  # each worker's read buffer
_ROOT_FILE = re.compile(r"^([0-9a-f]{64})\.manifest$")

VerifyProgress = Callable[[int], None]
"""Called with the number of bytes just hashed, from the hashing threads."""


@dataclass(frozen=True)
class BadPiece:
    """A piece whose bytes on disk are not the manifest's, and where it lies."""

    index: int
    path: str
    offset: int
    length: int
    reason: str  # "mismatch", "missing" (no such file) or "short" (the file ends first)

    def to_json(self) -> dict[str, Any]:
        return {
            "piece": self.index,
            "path": self.path,
            "start": self.offset,
            "end": self.offset + self.length,  # exclusive
            "reason": self.reason,
        }


@dataclass(frozen=True)
class BadFile:
    """A file that is not the size the manifest says (its bad pieces are listed separately)."""

    path: str
    size: int | None  # None: missing
    expected: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "expected": self.expected}


@dataclass
class VerifyReport:
    """What ``swarm verify`` found; ``to_json()`` is what ``--json`` prints."""

    dest: str
    artifact: str
    root: str
    files: int
    pieces: int
    bytes: int
    workers: int
    seconds: float = 0.0
    bad_pieces: list[BadPiece] = field(default_factory=list)
    bad_files: list[BadFile] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad_pieces and not self.bad_files

    @property
    def bad_bytes(self) -> int:
        return sum(p.length for p in self.bad_pieces)

    def to_json(self) -> dict[str, Any]:
        return {
            "dest": self.dest,
            "artifact": self.artifact,
            "root": self.root,
            "verified": self.ok,
            "files": self.files,
            "pieces": self.pieces,
            "bytes": self.bytes,
            "bad_pieces": [p.to_json() for p in self.bad_pieces],
            "bad_files": [f.to_json() for f in self.bad_files],
            "bad_bytes": self.bad_bytes,
            "workers": self.workers,
            "seconds": round(self.seconds, 3),
            "mb_per_second": round(self.bytes / 1e6 / self.seconds, 1) if self.seconds else None,
        }


def recorded_roots(dest: Path) -> list[str]:
    """Roots of the versions whose manifests ``dest`` holds, most recently used first."""
    try:
        names = os.listdir(dest / STATE_DIR)
    except OSError:
        return []
    roots = [m.group(1) for name in names if (m := _ROOT_FILE.match(name))]

    def last_used(root: str) -> float:
        try:
            return os.stat(state_path(dest, root)).st_mtime
        except OSError:
            return 0.0

    return sorted(roots, key=last_used, reverse=True)


def choose_root(dest: Path, root: str | None = None) -> str:
    """The version to verify: ``root`` (a unique prefix will do), else the one marked
    complete, else the most recently used one."""
    roots = recorded_roots(dest)
    if not roots:
        raise StoreError(
            f"{dest} holds no swarm artifact: no manifest under {dest / STATE_DIR} "
            "(fetch into it first)"
        )
    if root is not None:
        matches = [r for r in roots if r.startswith(root.lower())]
        if len(matches) != 1:
            what = "no" if not matches else "more than one"
            raise StoreError(
                f"{what} version of {dest} starts with {root!r}; it holds {', '.join(r[:16] for r in roots)}"
            )
        return matches[0]
    marker = read_complete_marker(dest)
    if marker is not None and marker.get("root") in roots:
        return str(marker["root"])
    return roots[0]


def load_manifest(dest: Path, root: str) -> Manifest:
    path = manifest_path(dest, root)
    data = read_small(path, MAX_COMPRESSED_SIZE)
    if data is None:
        raise StoreError(
            f"can't read {path}: missing, not a regular file, or larger than a manifest can be"
        )
    try:
        manifest = Manifest.decode(data)
    except ManifestError as exc:
        raise StoreError(f"{path} is not a valid manifest: {exc}") from exc
    if manifest.root_hex != root:
        raise StoreError(f"{path} holds version {manifest.root_hex[:16]}, not {root[:16]}")
    return manifest


def verify_dir(
    dest: Path,
    *,
    workers: int | None = None,
    root: str | None = None,
    progress: VerifyProgress | None = None,
    stop: threading.Event | None = None,
) -> VerifyReport:
    """Hash every piece of the artifact in ``dest`` and record what is bad.

    Holds the destination's lock throughout, so no fetch writes while it reads.
    Raises StoreError if ``dest`` holds no artifact or another process uses it, or
    if ``stop`` was set (by a signal handler) before every piece was hashed: then
    nothing is written. ``workers`` defaults to the cores this process may use.
    """
    dest = Path(dest)
    workers = max(1, workers or usable_cores())
    started = time.monotonic()
    if not (dest / STATE_DIR).is_dir():
        raise StoreError(f"{dest} holds no swarm artifact: no {STATE_DIR} directory")
    lock = DestLock(dest).acquire()
    try:
        root_hex = choose_root(dest, root)
        m = load_manifest(dest, root_hex)
        report = VerifyReport(
            str(dest), m.name, root_hex, len(m.files), m.num_pieces, m.total_size, workers
        )
        before = [_identity_of(dest / f.path) for f in m.files]
        reasons = _hash_all(dest, m, workers, progress, stop)
        if stop is not None and stop.is_set():
            # Pieces not hashed are not bad: leave the state as it was.
            raise StoreError(f"verifying {dest} was stopped before the end; nothing was changed")
        after = [_identity_of(dest / f.path) for f in m.files]
        for index, reason in enumerate(reasons):
            if reason is not None:
                p = m.piece(index)
                report.bad_pieces.append(BadPiece(index, p.path, p.offset, p.length, reason))
        for entry, st in zip(m.files, after, strict=True):
            size = None if st is None else IDENTITY.unpack(st)[2]
            if size != entry.size:
                report.bad_files.append(BadFile(entry.path, size, entry.size))
        _record(dest, m, reasons, before, after, complete=report.ok)
    finally:
        lock.release()
    report.seconds = time.monotonic() - started
    return report


def _identity_of(path: Path) -> bytes | None:
    try:
        return identity(os.lstat(path))
    except OSError:
        return None


def _hash_all(
    dest: Path,
    m: Manifest,
    workers: int,
    progress: VerifyProgress | None,
    stop: threading.Event | None = None,
) -> list[str | None]:
    """The reason each piece is bad, or None if it matches; pieces hashed in parallel."""
    local = threading.local()
    chunk = min(_CHUNK, max(m.piece_lengths, default=1))

    def check(index: int) -> str | None:
        buf: memoryview | None = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = memoryview(bytearray(chunk))
        p = m.piece(index)
        if stop is not None and stop.is_set():
            return "not checked"
        try:
            fd = open_regular(dest / p.path, os.O_RDONLY)
        except FileNotFoundError:
            return "missing"
        except (OSError, StoreError):
            return "unreadable"
        try:
            hasher = m.hasher(max_threads=1)  # the pool spreads pieces over the cores
            done = 0
            while done < p.length:
                try:
                    n = os.preadv(fd, [buf[: min(chunk, p.length - done)]], p.offset + done)
                except OSError:
                    return "unreadable"
                if n == 0:
                    return "short"
                hasher.update(buf[:n])
                done += n
            return None if hasher.digest() == m.digests[index] else "mismatch"
        finally:
            os.close(fd)
            if progress:
                progress(p.length)

    with ThreadPoolExecutor(workers, thread_name_prefix="swarm-verify") as pool:
        return list(pool.map(check, range(m.num_pieces)))


def _record(
    dest: Path,
    m: Manifest,
    reasons: list[str | None],
    before: list[bytes | None],
    after: list[bytes | None],
    *,
    complete: bool,
) -> None:
    """Make the destination's state say what the hashes found.

    Order matters for a crash in between: the marker goes first, then bad pieces
    are forgotten, then files are recorded, and only then are good pieces claimed.
    """
    marker = read_complete_marker(dest)
    if not complete and (marker is None or marker.get("root") == m.root_hex):
        remove_complete_marker(dest)  # (another version's marker speaks for other files)
    state = bytes(0 if r else 1 for r in reasons)
    records = bytearray()
    for entry, b, a in zip(m.files, before, after, strict=True):
        # A file that changed while it was read, or has the wrong size, is not vouched for.
        stable = b is not None and b == a and IDENTITY.unpack(a)[2] == entry.size
        records += a if stable and a is not None else NO_IDENTITY
    spath, ipath = state_path(dest, m.root_hex), identities_path(dest, m.root_hex)
    try:
        fd = open_regular(spath, os.O_RDWR | os.O_CREAT)
        try:
            old = os.pread(fd, m.num_pieces + 1, 0)
            if len(old) == m.num_pieces:
                os.pwrite(fd, bytes(a & b for a, b in zip(old, state, strict=True)), 0)
            else:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, m.num_pieces)
            os.fsync(fd)
            _replace(ipath, bytes(records))
            os.pwrite(fd, state, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StoreError(
            f"can't update the piece state in {dest / STATE_DIR}: {exc.strerror}"
        ) from exc
    # The owner names the version that last wrote data; verifying writes none, but
    # a destination from before owners were kept gains one, as its records now hold.
    if read_owner(dest) is None:
        write_owner(dest, m.root_hex, durable=True)


def _replace(path: Path, data: bytes) -> None:
    replace_file(path, data, durable=True)
