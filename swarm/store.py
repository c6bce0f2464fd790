"""The piece store: an artifact's files on local disk, filled piece by piece.

Files are written in their final layout under the destination directory: each is
pre-allocated to its full size, and pieces land with positional writes, so pieces
can arrive in any order from any source. A piece counts only once its blake3
digest matches the manifest; it is then written, flushed to disk, and recorded in
``DEST/.swarm/<root>.state`` (one byte per piece), so a killed fetch resumes
without reading verified pieces again. A format-2 manifest's blocks are checked as they land; each one
written is also recorded in ``DEST/.swarm/<root>.blocks`` (one byte per block), so a
killed fetch keeps the blocks of the pieces it had not finished: on open each
recorded block is read and checked against its digest again (the record was not
flushed with the data, and anyone may have changed the file since), and the ones
that match count as received.

The state is a claim about files that anyone can change, so it is never taken on
its word. Beside it, ``DEST/.swarm/<root>.files`` records for each file the
identity it was verified against (``st_dev, st_ino, st_size, st_mtime_ns``,
taken with ``fstat`` after each verified write and at completion), and
``DEST/.swarm/owner`` names the version that last wrote into DEST. On open, the
verified pieces of a file whose identity differs from its record, and of every
file when another version wrote last, are hashed again from disk before anything
counts as present. A complete DIR whose files are unchanged costs one ``stat``
per file. Only one process uses a DEST at a time (``flock`` on
``DEST/.swarm/lock``).

The artifact becomes visible as complete only when every piece is verified: the
marker ``DEST/.swarm-complete`` is written atomically (temp file, fsync, rename,
fsync of the directory) after all data is on disk, and it is removed on open,
before anything else is written, unless the files are proven unchanged.
Inference servers wait for the marker (or for the init container's exit code),
so they never load half a model.

File descriptors are opened lazily and at most ``MAX_OPEN_FILES`` are kept (per
kind, page cache or direct I/O), so an artifact of a million files needs no more
descriptors than one of ten. All methods are blocking; the asyncio layers call
them through a thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import mmap
import os
import stat
import struct
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import blake3

from core.digest import PieceHasher, digest
from core.errors import DiskFullError, StoreError, VerificationError
from core.manifest import Manifest

STATE_DIR: Final = ".swarm"
COMPLETE_MARKER: Final = ".swarm-complete"
LOCK_FILE: Final = "lock"
OWNER_FILE: Final = "owner"
MAX_OPEN_FILES: Final = 64  # descriptors kept open per kind (page cache, direct I/O)

# st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns. The change time matters: a tool
# that edits in place and then restores the modification time (``cp -p``, ``rsync -t
# --inplace``) can't set it back.
IDENTITY: Final = struct.Struct("<QQQqq")
NO_IDENTITY: Final = bytes(IDENTITY.size)
# Inside a destination nothing is followed or waited on: a symbolic link planted there
# would make a root-run fetch write wherever it points, and a FIFO would block it.
_SAFE_OPEN: Final = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
MAX_SMALL_STATE: Final = 64 * 1024  # the owner and completion records are a line each


_SCRATCH = 4 * 1024 * 1024  # read-back chunk when a piece must be hashed from disk
_RECHECK_CHUNK = 16 * 1024 * 1024  # read chunk when re-verifying pieces on open
_ALIGN = 4096  # direct I/O alignment: the largest logical block size in common use
_CLOCK_REALTIME_COARSE = 5  # Linux: the clock file times are stamped from


def identity(st: os.stat_result) -> bytes:
    """What a file was verified against: change any of these and its pieces are re-hashed."""
    return IDENTITY.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def open_regular(path: Path, flags: int, mode: int = 0o644) -> int:
    """Open a file inside a destination: never through a symbolic link, never anything
    but a regular file (a FIFO or device there is refused rather than waited on)."""
    try:
        fd = os.open(path, flags | _SAFE_OPEN, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(
                f"{path} is a symbolic link: swarm does not follow links inside a destination"
            ) from exc
        raise
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise StoreError(f"{path} is not a regular file: swarm refuses to use it")
    return fd


def read_small(path: Path, limit: int = MAX_SMALL_STATE) -> bytes | None:
    """A small state file's contents, or None if it is missing, odd or larger than ``limit``."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except (OSError, StoreError):
        return None
    try:
        if os.fstat(fd).st_size > limit:
            return None
        return os.pread(fd, limit + 1, 0)[: limit + 1]
    except OSError:
        return None
    finally:
        os.close(fd)


def _is_regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (not a link, FIFO or directory), without opening it."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def check_not_link(path: Path) -> None:
    """Refuse a directory inside a destination that is a symbolic link (or not a directory)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise StoreError(
            f"{path} is a symbolic link: swarm does not follow links inside a destination"
        )


def state_path(dest: Path, root_hex: str) -> Path:
    """One byte per piece of version ``root_hex``: 1 if verified."""
    return dest / STATE_DIR / f"{root_hex}.state"


def identities_path(dest: Path, root_hex: str) -> Path:
    """One ``IDENTITY`` record per file of version ``root_hex``."""
    return dest / STATE_DIR / f"{root_hex}.files"


def blocks_path(dest: Path, root_hex: str) -> Path:
    """Format 2: one byte per block of version ``root_hex``: 1 if checked and written."""
    return dest / STATE_DIR / f"{root_hex}.blocks"


def manifest_path(dest: Path, root_hex: str) -> Path:
    return dest / STATE_DIR / f"{root_hex}.manifest"


class _Assembly:
    """A piece being assembled from blocks: the blocks on disk, and what is known of them.

    Format 1: the hash of the piece's prefix. Format 2: the manifest's blocks that
    were checked before they were written.
    """

    __slots__ = ("checked", "hashed", "hasher", "verifying", "writing", "written")

    def __init__(self, manifest: Manifest) -> None:
        self.hasher = manifest.hasher() if not manifest.block_size else None
        self.hashed = 0  # bytes [0, hashed) of the piece are in ``hasher``
        self.written: dict[int, int] = {}  # block offset -> length, for blocks on disk
        self.checked: set[int] = set()  # format 2: offsets of blocks checked on arrival
        # What threads are writing: format 2, the manifest's blocks (by index) a
        # write overlaps; format 1, the offsets of the blocks being written.
        self.writing: set[int] = set()
        self.verifying = False  # verify_assembled runs: no more writes to this attempt


def _store_error(exc: OSError, what: str) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"{what}: no space left on device")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"{what}: not writable ({exc.strerror})")
    if exc.errno == errno.ENAMETOOLONG:
        return StoreError(f"{what}: path too long for the file system")
    if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        return StoreError(
            f"{what}: {exc.strerror} (a file or directory of another version is in the way; "
            "use another destination or remove it)"
        )
    return StoreError(f"{what}: {exc.strerror or exc}")


@contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise _store_error(exc, what) from exc


def make_dirs(path: Path) -> None:
    """``mkdir -p`` without recursion: paths come from manifests, their depth from strangers."""
    missing: list[Path] = []
    p = path
    while True:
        try:
            if stat.S_ISDIR(os.stat(p).st_mode):
                break
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(p))
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENAMETOOLONG):
                raise
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            if not os.path.isdir(d):
                raise


def read_complete_marker(dest: Path) -> dict[str, object] | None:
    """The completion record of ``dest``, or None if the artifact there is not complete."""
    data = read_small(dest / COMPLETE_MARKER)
    if data is None:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def remove_complete_marker(dest: Path) -> None:
    """Withdraw the promise that ``dest`` is complete, durably, before anything else changes."""
    marker = dest / COMPLETE_MARKER
    with _translated(f"can't remove {marker}"):
        try:
            marker.unlink()
        except FileNotFoundError:
            return
        fsync_dir(dest)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_owner(dest: Path) -> str | None:
    """The root of the version that last wrote into ``dest`` (None if unknown)."""
    data = read_small(dest / STATE_DIR / OWNER_FILE)
    if data is None:
        return None
    return data.decode("ascii", "replace").strip() or None


def replace_file(path: Path, data: bytes, *, durable: bool) -> None:
    """Write ``path`` whole, atomically (a temp file renamed over it), following no link."""
    tmp = path.with_name(path.name + ".tmp")
    fd = open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)  # a rename replaces a link itself, never what it points to
    if durable:
        fsync_dir(path.parent)


def write_owner(dest: Path, root_hex: str, *, durable: bool) -> None:
    path = dest / STATE_DIR / OWNER_FILE
    with _translated(f"can't write {path}"):
        replace_file(path, (root_hex + "\n").encode(), durable=durable)


class DestLock:
    """An exclusive ``flock`` on ``DEST/.swarm/lock``: one process uses a destination at a time.

    The kernel drops the lock when its holder dies, so a killed fetch never leaves
    a destination locked. The holder's pid is written into the file for the error
    another process reports.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.fd = -1

    def acquire(self) -> DestLock:
        path = self.dest / STATE_DIR / LOCK_FILE
        with _translated(f"can't open lock {path}"):
            fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise _store_error(exc, f"can't lock {path}") from exc
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise StoreError(
                f"{self.dest} is in use by another swarm process{who}: "
                "wait for it to finish, or use another destination"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Descriptors:
    """Descriptors of the artifact's files, opened on first use, least recently used closed.

    A descriptor in use (between ``acquire`` and ``release``) is never closed, so
    threads can share the cache; if every cached descriptor is in use the cache
    grows past its capacity until they are released.
    """

    def __init__(self, dest: Path, manifest: Manifest, capacity: int) -> None:
        self._dest = dest
        self._manifest = manifest
        self._capacity = capacity
        self._lock = threading.Lock()
        self._open: OrderedDict[tuple[int, bool], list[int]] = OrderedDict()  # -> [fd, users]

    def path(self, file_index: int) -> Path:
        return self._dest / self._manifest.files[file_index].path

    def acquire(self, file_index: int, direct: bool = False) -> int:
        key = (file_index, direct)
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
                entry = self._open[key] = [open_regular(self.path(file_index), flags), 0]
            self._open.move_to_end(key)
            entry[1] += 1
            self._evict()
            return entry[0]

    def release(self, file_index: int, direct: bool = False) -> None:
        with self._lock:
            self._open[(file_index, direct)][1] -= 1
            self._evict()

    @contextmanager
    def use(self, file_index: int, direct: bool = False) -> Iterator[int]:
        fd = self.acquire(file_index, direct)
        try:
            yield fd
        finally:
            self.release(file_index, direct)

    def _evict(self) -> None:
        if len(self._open) <= self._capacity:
            return
        for kind in (False, True):
            keys = [k for k in self._open if k[1] == kind]
            excess = len(keys) - self._capacity
            for key in keys:  # oldest first
                if excess <= 0:
                    break
                fd, users = self._open[key]
                if users == 0:
                    del self._open[key]
                    os.close(fd)
                    excess -= 1

    def close_all(self) -> None:
        with self._lock:
            for fd, _ in self._open.values():
                os.close(fd)
            self._open.clear()


class PieceStore:
    """One artifact version's files under ``dest`` and which of its pieces are verified."""

    def __init__(
        self, dest: Path, manifest: Manifest, *, durable: bool = True, direct_io: bool = True
    ) -> None:
        self.dest = Path(dest)
        self.manifest = manifest
        self.durable = durable
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")
        self._fds = _Descriptors(self.dest, manifest, MAX_OPEN_FILES)
        self._pinned: set[int] = set()
        self._lock: DestLock | None = None
        self._state_fd = -1
        self._identities_fd = -1
        self._blocks_fd = -1  # format 2: the block record (``blocks_path``)
        # Format 2: index of each piece's first block in the block record.
        self._first_block = (
            array(
                "q",
                itertools.accumulate(
                    (manifest.blocks_in(i) for i in range(manifest.num_pieces)), initial=0
                ),
            )
            if manifest.block_size
            else array("q")
        )
        self._verified = bytearray(manifest.num_pieces)
        self.reused_bytes = 0
        self.rechecked_bytes = 0  # verified pieces hashed again on open (their files changed)
        self.read_back_bytes = 0  # bytes of assembled pieces read back from disk to be hashed
        # Blocks of unfinished pieces kept from an earlier run, checked again on open.
        self.kept_blocks: dict[int, list[int]] = {}  # piece -> offsets of its kept blocks
        self.kept_block_bytes = 0
        self._assemblies: dict[int, _Assembly] = {}
        # write_block may run on several threads at once (``swarm fetch --workers``):
        # the lock guards the assemblies; hashing and writing happen outside it.
        self._assembly_lock = threading.Lock()
        self._block_written = threading.Condition(self._assembly_lock)
        self._local = threading.local()  # each thread's read-back buffer

    # --- lifecycle -----------------------------------------------------------------

    def open(self) -> None:
        """Lock the destination, prove what is already there, and create the missing files.

        Raises StoreError if another process uses the destination.
        """
        with _translated(f"can't create destination {self.dest}"):
            make_dirs(self.dest)
            check_not_link(self.dest / STATE_DIR)
            make_dirs(self.dest / STATE_DIR)
        self._lock = DestLock(self.dest).acquire()
        try:
            self._open_locked()
        except BaseException:
            self.close()
            raise

    def _open_locked(self) -> None:
        m = self.manifest
        root = m.root_hex
        n, nfiles = m.num_pieces, len(m.files)
        state = _read_exact(state_path(self.dest, root), n)
        state_ok = state is not None and set(state) <= {0, 1}
        verified = bytearray(state if state is not None and state_ok else bytes(n))
        records = _read_exact(identities_path(self.dest, root), nfiles * IDENTITY.size)
        owned = read_owner(self.dest) == root
        # A file is trusted only if this version wrote last and its identity is the
        # one its pieces were verified against.
        stale: list[int] = []
        for i, entry in enumerate(m.files):
            try:
                # lstat: a symbolic link put in a file's place never matches its record.
                now = identity(os.lstat(self.dest / entry.path))
            except OSError:
                now = None
            recorded = records[i * IDENTITY.size : (i + 1) * IDENTITY.size] if records else None
            if not owned or now is None or now != recorded:
                stale.append(i)
        marker = read_complete_marker(self.dest)
        if os.path.lexists(self.dest / COMPLETE_MARKER) and (
            marker is None or stale or not all(verified) or marker.get("root") != root
        ):
            # Whatever stands at the marker's name and is not a proven record goes:
            # whoever waits for the marker may only test that it exists.
            remove_complete_marker(self.dest)
        if not owned:
            write_owner(self.dest, root, durable=self.durable)
        with _translated(f"can't write {self.dest / STATE_DIR}"):
            mpath = manifest_path(self.dest, root)
            if not _is_regular_file(mpath):
                replace_file(mpath, m.encode(), durable=self.durable)
            self._state_fd = _open_sized(state_path(self.dest, root), n, reset=not state_ok)
            self._identities_fd = _open_sized(
                identities_path(self.dest, root), nfiles * IDENTITY.size, reset=records is None
            )
        made: set[str] = set()
        if stale:
            chunk = min(_RECHECK_CHUNK, max(m.piece_lengths, default=1))
            with memoryview(bytearray(chunk)) as buf:
                for i in stale:
                    self._recheck(i, verified, buf)
                    self._create(i, made)
        self._verified = verified
        self.reused_bytes = sum(
            length for length, ok in zip(m.piece_lengths, verified, strict=True) if ok
        )
        if m.block_size:
            self._keep_blocks(root)
        self._probe_direct_io()

    def _keep_blocks(self, root: str) -> None:
        """Format 2: take back the checked blocks of unfinished pieces from the block record.

        Each recorded block is read and checked against its digest again: the record
        is written after the block's bytes but never flushed with them (a crash may
        have lost either), and the file may have changed since. Blocks that match are
        this run's, checked, as if just received; the rest are forgotten. A piece all
        of whose blocks match is verified here. Costs at most the pieces that were in
        progress when the last run stopped.
        """
        m = self.manifest
        total = self._first_block[-1]
        path = blocks_path(self.dest, root)
        record = _read_exact(path, total)
        with _translated(f"can't write {self.dest / STATE_DIR}"):
            self._blocks_fd = _open_sized(path, total, reset=record is None)
        if record is None or not any(record):
            return
        size = m.block_size
        forget: list[int] = []
        for index in range(m.num_pieces):
            first, last = self._first_block[index], self._first_block[index + 1]
            if self._verified[index] or not any(record[first:last]):
                continue
            asm = _Assembly(m)
            length = m.piece_lengths[index]
            piece = m.piece(index)
            try:
                fd = open_regular(self.dest / piece.path, os.O_RDONLY)
            except (OSError, StoreError):
                fd = -1
            try:
                for block in range(first, last):
                    if not record[block]:
                        continue
                    at = (block - first) * size
                    stop = min(at + size, length)
                    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
                    self.rechecked_bytes += stop - at
                    if fd >= 0 and _hash_range(
                        fd, piece.offset + at, stop - at, self._scratch(), hasher
                    ) == m.block_digest(index, at, stop - at):
                        asm.written[at] = stop - at
                        asm.checked.add(at)
                    else:
                        forget.append(block)
            finally:
                if fd >= 0:
                    os.close(fd)
            if not asm.checked:
                continue
            kept = sum(asm.written.values())
            if kept == length:
                # Every block is there and matches: the piece's digest is that of its
                # layer, so the piece is verified.
                with _translated(f"can't record {self.dest / piece.path}"):
                    self._commit(index, piece.file_index)
                self._verified[index] = 1
                self.reused_bytes += length
                continue
            self._assemblies[index] = asm
            self.kept_blocks[index] = sorted(asm.checked)
            self.kept_block_bytes += kept
        with _translated(f"can't write block state of {self.dest}"):
            for block in forget:
                os.pwrite(self._blocks_fd, b"\x00", block)

    def _scratch(self) -> memoryview:
        """This thread's reusable read buffer."""
        scratch: bytearray | None = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = bytearray(_SCRATCH)
        return memoryview(scratch)

    def _record_blocks(self, index: int, offsets: Sequence[int], value: bytes) -> None:
        """Format 2: say in the block record that these blocks of ``index`` are (or are not)
        checked and on disk."""
        if self._blocks_fd < 0 or not offsets:
            return
        first = self._first_block[index]
        size = self.manifest.block_size
        for at in offsets:
            os.pwrite(self._blocks_fd, value, first + at // size)

    def _recheck(self, file_index: int, verified: bytearray, buf: memoryview) -> None:
        """Hash again the pieces of a changed file that the state calls verified."""
        m = self.manifest
        entry = m.files[file_index]
        claimed = [
            p
            for p in range(entry.first_piece, entry.first_piece + entry.piece_count)
            if verified[p]
        ]
        if not claimed:
            return
        try:
            fd = open_regular(self.dest / entry.path, os.O_RDONLY)
        except (OSError, StoreError):
            fd = -1  # gone, unreadable, a link or not a file: nothing of it counts
        try:
            for index in claimed:
                piece = m.piece(index)
                ok = (
                    fd >= 0
                    and _hash_range(fd, piece.offset, piece.length, buf, m.hasher())
                    == m.digests[index]
                )
                self.rechecked_bytes += piece.length
                if not ok:
                    verified[index] = 0
                    with _translated(f"can't write piece state of {self.dest}"):
                        os.pwrite(self._state_fd, b"\x00", index)
        finally:
            if fd >= 0:
                os.close(fd)
        # The state forgets bad pieces before the file's new identity is recorded.
        if self.durable:
            with _translated(f"can't write piece state of {self.dest}"):
                os.fsync(self._state_fd)

    def _create(self, file_index: int, made: set[str]) -> None:
        """Create (or resize) one file, reserve its space, close it, and record its identity."""
        entry = self.manifest.files[file_index]
        path = self.dest / entry.path
        with _translated(f"can't create {path}"):
            parts = entry.path.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                rel = "/".join(parts[:depth])
                if rel not in made:
                    # A file in the way shows as ENOTDIR when the file is opened.
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(self.dest / rel)
                    check_not_link(self.dest / rel)
                    made.add(rel)
            fd = open_regular(path, os.O_RDWR | os.O_CREAT)
            try:
                if os.fstat(fd).st_size != entry.size:
                    os.ftruncate(fd, entry.size)
                self._preallocate(fd, entry.size, path)
                self._record(file_index, os.fstat(fd))
            finally:
                os.close(fd)

    def _record(self, file_index: int, st: os.stat_result) -> None:
        os.pwrite(self._identities_fd, identity(st), file_index * IDENTITY.size)

    def _probe_direct_io(self) -> None:
        if not self.direct_io:
            return
        try:
            os.close(os.open(self.dest / STATE_DIR / LOCK_FILE, os.O_RDONLY | os.O_DIRECT))
        except OSError:
            self.direct_io = False  # e.g. tmpfs: no O_DIRECT; the page cache it is

    def _write_at(self, file_index: int, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset`` of a file, bypassing the page cache where possible.

        Direct I/O needs the offset, the length and the buffer's address aligned to
        the device's blocks. Pieces and blocks start at multiples of their sizes, and
        our buffers are page-aligned, so all but a file's last few bytes qualify; those
        (and any caller's unaligned buffer) go through the page cache. Why bypass it:
        on the virtual machines we measure on, copying into fresh page-cache pages
        ran at 0.4 GB/s and cost the peers 37% of their CPU (perf), while direct
        writes from a reused buffer ran at 2 to 3.5 GB/s for a tenth of the CPU.
        """
        aligned = len(data) - len(data) % _ALIGN if offset % _ALIGN == 0 else 0
        done = 0
        if self.direct_io and aligned:
            try:
                with self._fds.use(file_index, direct=True) as direct:
                    while done < aligned:
                        done += os.pwritev(direct, [data[done:aligned]], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # An unaligned buffer: this write goes through the page cache.
        with self._fds.use(file_index) as fd:
            while done < len(data):
                done += os.pwritev(fd, [data[done:]], offset + done)

    def read_direct(self, index: int, offset: int, length: int, buf: bytearray | mmap.mmap) -> bool:
        """Read ``length`` bytes of piece ``index`` at ``offset`` into the start of
        ``buf`` (page-aligned, e.g. from a ``BufferPool``), bypassing the page cache;
        StoreError unless they are servable (see :meth:`servable`).

        Returns False, having read nothing, when that can't be done (no direct I/O
        here, an unaligned offset, ``buf`` too small for the padded length); the
        caller then uses ``sendfile`` from the page cache instead.
        """
        self.require_servable(index, offset, length)
        piece = self.manifest.piece(index)
        start = piece.offset + offset
        padded = -(-length // _ALIGN) * _ALIGN
        if not self.direct_io or start % _ALIGN or padded > len(buf):
            return False
        view = memoryview(buf)
        try:
            with _translated(f"can't read {self.dest / piece.path}"):
                with self._fds.use(piece.file_index, direct=True) as direct:
                    done = 0
                    while done < length:
                        # Whole aligned blocks; at the end of a file the read comes up short.
                        n = os.preadv(direct, [view[done:padded]], start + done)
                        if n == 0:
                            raise StoreError(
                                f"{self.dest / piece.path} is shorter than the manifest says"
                            )
                        done += n
            return True
        except StoreError as exc:
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.EINVAL:
                return False
            raise
        finally:
            view.release()

    def _preallocate(self, fd: int, size: int, path: Path) -> None:
        if size == 0:
            return
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return  # the file system can't reserve space ahead; writes will still fail cleanly
            raise _store_error(exc, f"can't reserve {size} bytes for {path}") from exc

    def close(self) -> None:
        """Release descriptors and the destination's lock. Writes nothing: a crash is a close."""
        self._fds.close_all()
        self._pinned.clear()
        for fd in (self._state_fd, self._identities_fd, self._blocks_fd):
            if fd >= 0:
                os.close(fd)
        self._state_fd = self._identities_fd = self._blocks_fd = -1
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> PieceStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- pieces --------------------------------------------------------------------

    def has(self, index: int) -> bool:
        return bool(self._verified[index])

    def verified_pieces(self) -> list[int]:
        return [i for i, ok in enumerate(self._verified) if ok]

    def missing(self) -> list[int]:
        return [i for i, ok in enumerate(self._verified) if not ok]

    @property
    def complete(self) -> bool:
        return all(self._verified)

    def servable(self, index: int, offset: int, length: int) -> bool:
        """Whether bytes ``offset..+length`` of piece ``index`` may go to a peer: the
        piece is verified, or (format 2, cut-through) every manifest block they
        touch is on disk and was checked against its digest before it was written.

        Checked bytes on disk do not change: a later write over a whole checked
        block is itself checked first (so writes the same bytes), and one that
        covers part of a block makes it unchecked before it writes (a reader that
        passed this check before still reads the old bytes there only if it reads
        first; the peer writes whole manifest blocks only, so this does not arise,
        and the receiver checks every block it gets all the same).
        """
        if self._verified[index]:
            return True
        return length > 0 and self.holds_checked(index, offset, offset + length)

    def require_servable(self, index: int, offset: int, length: int) -> None:
        """StoreError unless :meth:`servable`: unchecked bytes are never served."""
        if not self.servable(index, offset, length):
            raise StoreError(
                f"bytes {offset}+{length} of {self.manifest.describe_piece(index)} are not "
                "verified or checked: they are never served"
            )

    def _require_verified(self, index: int) -> None:
        if not self._verified[index]:
            raise StoreError(
                f"{self.manifest.describe_piece(index)} is not verified: its bytes are never served"
            )

    def check(self, index: int, data: memoryview | bytes | bytearray) -> None:
        """Raise VerificationError unless ``data`` is exactly piece ``index``."""
        m = self.manifest
        if len(data) != m.piece_lengths[index]:
            raise VerificationError(
                f"{m.describe_piece(index)}: got {len(data)} bytes, expected {m.piece_lengths[index]}",
                piece=index,
            )
        got = m.piece_digest(data)
        if got != m.digests[index]:
            raise VerificationError(
                f"{m.describe_piece(index)} failed blake3 verification: "
                f"expected {m.digests[index].hex()[:16]}…, got {got.hex()[:16]}…",
                piece=index,
            )

    def write_piece(self, index: int, data: memoryview) -> None:
        """Verify piece ``index``, write it in place, flush it, and record it as verified."""
        self.check(index, data)
        piece = self.manifest.piece(index)
        with _translated(f"can't write {self.dest / piece.path}"):
            self._write_at(piece.file_index, piece.offset, data)
            self._commit(index, piece.file_index)

    def _commit(self, index: int, file_index: int) -> None:
        """Record a piece whose bytes are on disk and match: identity first, then the state."""
        with self._fds.use(file_index) as fd:
            if self.durable:
                os.fdatasync(fd)
            st = os.fstat(fd)
        # Only after the data is durable does the state say so, and only with the
        # identity of the file as it holds the piece.
        self._record(file_index, st)
        os.pwrite(self._state_fd, b"\x01", index)
        self._verified[index] = 1

    def write_block(self, index: int, offset: int, data: memoryview) -> bool:
        """Write a block of a piece that is being assembled from peers (not yet verified).

        Format 2: each of the manifest's blocks that ``data`` holds whole is hashed in
        memory and checked against the piece's block layer before anything is
        written; one that does not match raises VerificationError and nothing of
        ``data`` is written (its sender lied). A piece whose blocks were all checked
        is never read back. Format 1: the piece is hashed as its blocks land: a block
        that continues the hashed prefix is hashed from ``data`` while it is still in
        memory, and blocks that arrived ahead of it are read back once the gap fills.

        Returns False, writing nothing, if the piece is already verified or this
        block of the piece's current attempt is already on disk (an endgame
        duplicate), or while the piece is being verified: a block once hashed is
        never overwritten, so the hash always describes what is on disk. In format
        2 a write that covers part of one of the manifest's blocks makes that block
        unchecked again (it is read back at verification).

        Unverified bytes on disk are harmless: a block is served before its piece is
        verified only once checked against its digest (:meth:`servable`), the piece
        is recorded only once verified, and a restart checks kept blocks again. Threads may write blocks at once
        (format 2 checks and writes them in parallel; format 1's prefix hash is
        extended under the store's lock); ``verify_assembled`` of a piece is called
        once all its blocks are written.
        """
        piece = self.manifest.piece(index)
        if offset < 0 or offset + len(data) > piece.length:
            raise StoreError(
                f"block {offset}+{len(data)} lies outside {self.manifest.describe_piece(index)}"
            )
        size = self.manifest.block_size
        end = offset + len(data)
        keys = range(offset // size, (end - 1) // size + 1) if size else range(offset, offset + 1)
        with self._assembly_lock:
            while True:
                if self._verified[index]:
                    return False
                asm = self._assemblies.get(index)
                if asm is None:
                    asm = self._assemblies[index] = _Assembly(self.manifest)
                if asm.verifying:
                    return False
                if size:
                    # Format 2: turned away only if every block it holds is on disk and
                    # checked (an endgame duplicate); a write that also brings blocks
                    # still missing goes ahead (an origin window over blocks kept from
                    # an earlier run rewrites them with the same, checked, bytes).
                    if all(key * size in asm.checked for key in keys):
                        return False
                elif offset in asm.written:
                    return False
                # Another thread writes these bytes (an endgame duplicate): its
                # outcome decides. If it failed its check, this copy is written.
                if not any(key in asm.writing for key in keys):
                    break
                self._block_written.wait()
            asm.writing.update(keys)
            if size:
                # A block this write covers only in part is unchecked from now on,
                # before its bytes change: cut-through serves checked blocks only.
                for key in keys:
                    if key * size < offset or min((key + 1) * size, piece.length) > end:
                        asm.checked.discard(key * size)
        try:
            checked = self._check_blocks(index, offset, data) if size else ()
            with _translated(f"can't write {self.dest / piece.path}"):
                self._write_at(piece.file_index, piece.offset + offset, data)
                # Unverified bytes change no verified piece, so the file's record may
                # follow them; then only a file written to at a crash is re-hashed.
                with self._fds.use(piece.file_index) as fd:
                    self._record(piece.file_index, os.fstat(fd))
        except BaseException:
            with self._assembly_lock:
                asm.writing.difference_update(keys)
                self._block_written.notify_all()
            raise
        with self._assembly_lock:
            asm.writing.difference_update(keys)
            self._block_written.notify_all()
            asm.written[offset] = len(data)
            unchecked: list[int] = []
            if size:
                for key in keys:
                    if key * size in checked:
                        asm.checked.add(key * size)
                    else:  # partly overwritten by bytes nobody checked
                        asm.checked.discard(key * size)
                        unchecked.append(key * size)
            if asm.hasher is not None and offset == asm.hashed:
                asm.hasher.update(data)
                asm.hashed += len(data)
                self._hash_written(index, asm)
        # After the bytes: the record may say less than the disk holds, never more
        # (and what it says is checked again on open all the same).
        with _translated(f"can't write block state of {self.dest}"):
            self._record_blocks(index, unchecked, b"\x00")
            self._record_blocks(index, checked, b"\x01")
        return True

    def _check_blocks(self, index: int, offset: int, data: memoryview) -> list[int]:
        """Check the manifest's blocks that ``data`` holds whole; their offsets.

        Raises VerificationError at the first that does not match its digest.
        """
        m = self.manifest
        size = m.block_size
        end = offset + len(data)
        length = m.piece_lengths[index]
        start = -(-offset // size) * size
        good: list[int] = []
        for at in range(start, end, size):
            stop = min(at + size, length)
            if stop > end:
                break
            expected = m.block_digest(index, at, stop - at)
            # One thread: the disk workers are the parallelism (core.digest.digest).
            if digest(data[at - offset : stop - offset], max_threads=1) != expected:
                raise VerificationError(
                    f"block {at}+{stop - at} of {m.describe_piece(index)} does not match the "
                    "manifest's block digest",
                    piece=index,
                )
            good.append(at)
        return good

    def _hash_written(self, index: int, asm: _Assembly) -> None:
        """Extend the hashed prefix over blocks already on disk."""
        while (length := asm.written.get(asm.hashed)) is not None:
            self._hash_from_disk(index, asm, asm.hashed + length)

    def _hash_from_disk(self, index: int, asm: _Assembly, end: int) -> None:
        assert asm.hasher is not None
        asm.hashed = self._read_into(index, asm.hashed, end, asm.hasher)

    def _read_into(
        self, index: int, start: int, end: int, hasher: PieceHasher | blake3.blake3
    ) -> int:
        """Hash bytes [start, end) of piece ``index`` as they are on disk; returns ``end``."""
        piece = self.manifest.piece(index)
        view = self._scratch()
        with _translated(f"can't read back {self.dest / piece.path}"):
            with self._fds.use(piece.file_index) as fd:
                while start < end:
                    n = os.preadv(fd, [view[: min(_SCRATCH, end - start)]], piece.offset + start)
                    if n == 0:
                        raise StoreError(
                            f"{self.dest / piece.path} is shorter than the manifest says"
                        )
                    hasher.update(view[:n])
                    start += n
                    self.read_back_bytes += n
        return end

    def holds_checked(self, index: int, start: int, end: int) -> bool:
        """Format 2: whether every block of bytes [start, end) of piece ``index`` is on
        disk and was checked (blocks kept from an earlier run, say); always False in
        format 1."""
        size = self.manifest.block_size
        if not size:
            return False
        with self._assembly_lock:
            asm = self._assemblies.get(index)
            return asm is not None and all(
                at in asm.checked for at in range(start - start % size, end, size)
            )

    def _blocks_good(self, index: int, asm: _Assembly) -> bool:
        """Format 2: every block of the piece matches its digest (unchecked ones read back)."""
        m = self.manifest
        size = m.block_size
        length = m.piece_lengths[index]
        for at in range(0, length, size):
            if at in asm.checked:
                continue
            stop = min(at + size, length)
            hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
            self._read_into(index, at, stop, hasher)
            if hasher.digest() != m.block_digest(index, at, stop - at):
                return False
        return True

    def verify_assembled(self, index: int) -> bool:
        """Check a piece assembled by ``write_block``; record it if it matches.

        On a mismatch the assembly is discarded, so the next attempt starts clean.
        Writes under way finish first; writes that come while it runs (late endgame
        duplicates) are refused, so what is recorded is what was checked.
        """
        piece = self.manifest.piece(index)
        with self._assembly_lock:
            asm = self._assemblies.get(index)
            if asm is None:
                asm = self._assemblies[index] = _Assembly(self.manifest)
            asm.verifying = True
            while asm.writing:
                self._block_written.wait()
        try:
            if asm.hasher is None:
                good = self._blocks_good(index, asm)
            else:
                self._hash_from_disk(index, asm, piece.length)
                good = asm.hasher.digest() == self.manifest.digests[index]
            if good:
                with _translated(f"can't record {self.dest / piece.path}"):
                    self._commit(index, piece.file_index)
            else:
                with _translated(f"can't write block state of {self.dest}"):
                    self._record_blocks(index, sorted(asm.checked), b"\x00")
        finally:
            with self._assembly_lock:
                if self._assemblies.get(index) is asm:
                    del self._assemblies[index]
                self._block_written.notify_all()
        return good

    def read_piece_into(self, index: int, buf: memoryview) -> None:
        """Read a verified piece back (to serve it to a peer)."""
        self._require_verified(index)
        piece = self.manifest.piece(index)
        with _translated(f"can't read {self.dest / piece.path}"):
            with self._fds.use(piece.file_index) as fd:
                done = 0
                while done < piece.length:
                    n = os.preadv(fd, [buf[done : piece.length]], piece.offset + done)
                    if n == 0:
                        raise StoreError(
                            f"{self.dest / piece.path} is shorter than the manifest says"
                        )
                    done += n

    @contextmanager
    def piece_fd(self, index: int) -> Iterator[tuple[int, int, int]]:
        """(fd, offset, length) of a verified piece for ``os.sendfile``; the descriptor
        stays open (never evicted) until the block exits, so any number of files can be
        served with a bounded number of descriptors."""
        self._require_verified(index)
        piece = self.manifest.piece(index)
        with _translated(f"can't open {self.dest / piece.path}"):
            fd = self._fds.acquire(piece.file_index)
        try:
            yield fd, piece.offset, piece.length
        finally:
            self._fds.release(piece.file_index)

    def piece_location(self, index: int) -> tuple[int, int, int]:
        """(fd, offset, length) of a verified piece, for ``os.sendfile``.

        The descriptor stays open until ``close``: it is pinned, never evicted, so
        serving many files this way holds one descriptor per file; ``piece_fd``
        holds one only while it is used.
        """
        self._require_verified(index)
        piece = self.manifest.piece(index)
        with _translated(f"can't open {self.dest / piece.path}"):
            if piece.file_index in self._pinned:
                with self._fds.use(piece.file_index) as fd:
                    pass
            else:
                fd = self._fds.acquire(piece.file_index)
                self._pinned.add(piece.file_index)
        return fd, piece.offset, piece.length

    # --- completion ----------------------------------------------------------------

    def finish(self) -> None:
        """Mark the artifact complete; only possible when every piece is verified."""
        if not self.complete:
            missing = self.missing()
            raise StoreError(
                f"can't mark {self.dest} complete: {len(missing)} pieces are not verified"
            )
        m = self.manifest
        record = {
            "name": m.name,
            "root": m.root_hex,
            "bytes": m.total_size,
            "files": len(m.files),
        }
        marker = self.dest / COMPLETE_MARKER
        tmp = self.dest / STATE_DIR / f"{COMPLETE_MARKER}.tmp"
        with _translated(f"can't write {marker}"):
            stats: list[os.stat_result] = []
            for i in range(len(m.files)):
                with self._fds.use(i) as fd:
                    if self.durable:
                        os.fsync(fd)
                    stats.append(os.fstat(fd))
            _outlast_mtimes(max((st.st_mtime_ns for st in stats), default=0))
            for i, st in enumerate(stats):
                self._record(i, st)
            if self.durable:
                os.fsync(self._identities_fd)
                os.fsync(self._state_fd)
            replace_file(tmp, json.dumps(record).encode(), durable=True)
            os.replace(tmp, marker)
            fsync_dir(self.dest)


def _outlast_mtimes(latest_ns: int) -> None:
    """Wait until a write now would get a later mtime than ``latest_ns``.

    File times come from a coarse clock (one tick, 1-10 ms; Linux 6.13 and later
    use a fine one once a time has been read), so an edit in the same tick as the
    last verified write would leave the recorded identity unchanged. Waiting two
    ticks past the newest mtime before recording makes any later edit visible. A
    file time in the future (clock skew) can't be waited out; it is recorded as is.
    """
    try:
        tick = int(time.clock_getres(_CLOCK_REALTIME_COARSE) * 1e9)
    except OSError:
        tick = 10_000_000
    wait = latest_ns + 2 * tick - time.time_ns()
    if 0 < wait <= 2 * tick:
        time.sleep(wait / 1e9)


def _read_exact(path: Path, size: int) -> bytes | None:
    """The contents of ``path`` if it is exactly ``size`` bytes long, else None."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except (OSError, StoreError):
        return None
    try:
        if os.fstat(fd).st_size != size:
            return None
        data = os.pread(fd, size + 1, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) == size else None


def _open_sized(path: Path, size: int, *, reset: bool) -> int:
    """Open a state file; a reset one holds ``size`` zero bytes."""
    fd = open_regular(path, os.O_RDWR | os.O_CREAT)
    if reset:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
    return fd


def _hash_range(
    fd: int, offset: int, length: int, buf: memoryview, hasher: PieceHasher | blake3.blake3
) -> bytes | None:
    """The digest of ``length`` bytes at ``offset`` read into ``buf`` in turn; None if the file ends first."""
    done = 0
    while done < length:
        try:
            n = os.preadv(fd, [buf[: min(len(buf), length - done)]], offset + done)
        except OSError:
            return None
        if n == 0:
            return None
        hasher.update(buf[:n])
        done += n
    digest_: bytes = hasher.digest()
    return digest_
