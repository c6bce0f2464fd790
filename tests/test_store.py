"""Piece store: verify before counting, resume from recorded state, complete only when whole."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.digest import digest
from core.errors import DiskFullError, StoreError, VerificationError
from core.manifest import Manifest
from swarm.store import COMPLETE_MARKER, PieceStore, read_complete_marker

KIB = 1024


def artifact(files: dict[str, bytes], piece_size: int = KIB) -> Manifest:
    sizes = [(p, len(d)) for p, d in files.items()]
    digests = [digest(files[p][o : o + n]) for p, o, n in Manifest.layout(sizes, piece_size)]
    return Manifest.build(
        name="m", origin="file:///nowhere", piece_size=piece_size, files=sizes, digests=digests
    )


FILES = {"a.bin": os.urandom(2500), "empty.json": b"", "sub/b.bin": os.urandom(1024)}


def piece_bytes(m: Manifest, i: int) -> memoryview:
    p = m.piece(i)
    return memoryview(FILES[p.path][p.offset : p.offset + p.length])


def test_write_all_then_complete(tmp_path: Path) -> None:
    m = artifact(FILES)
    with PieceStore(tmp_path, m) as store:
        assert store.missing() == [0, 1, 2, 3]
        for i in reversed(range(m.num_pieces)):
            store.write_piece(i, piece_bytes(m, i))
        assert read_complete_marker(tmp_path) is None
        store.finish()
    for path, data in FILES.items():
        assert (tmp_path / path).read_bytes() == data
    marker = read_complete_marker(tmp_path)
    assert marker is not None and marker["root"] == m.root_hex


def test_bad_piece_is_not_counted(tmp_path: Path) -> None:
    m = artifact(FILES)
    with PieceStore(tmp_path, m) as store:
        bad = bytearray(piece_bytes(m, 1))
        bad[0] ^= 1
        with pytest.raises(VerificationError, match=r"piece 1 \(a.bin bytes 1024-2047\)"):
            store.write_piece(1, memoryview(bad))
        with pytest.raises(VerificationError):
            store.write_piece(1, piece_bytes(m, 1)[:10])
        assert not store.has(1)
        with pytest.raises(StoreError, match="not verified"):
            store.finish()
    assert not (tmp_path / COMPLETE_MARKER).exists()


def test_resume_keeps_verified_pieces(tmp_path: Path) -> None:
    m = artifact(FILES)
    with PieceStore(tmp_path, m) as store:
        store.write_piece(0, piece_bytes(m, 0))
        store.write_piece(3, piece_bytes(m, 3))
    with PieceStore(tmp_path, m) as store:
        assert store.missing() == [1, 2]
        assert store.reused_bytes == 2 * KIB


def test_corrupt_state_is_distrusted(tmp_path: Path) -> None:
    m = artifact(FILES)
    with PieceStore(tmp_path, m) as store:
        store.write_piece(0, piece_bytes(m, 0))
    (tmp_path / ".swarm" / f"{m.root_hex}.state").write_bytes(b"\x07\x01")
    with PieceStore(tmp_path, m) as store:
        assert store.missing() == [0, 1, 2, 3]


def test_new_version_unmarks_old_one(tmp_path: Path) -> None:
    old = artifact(FILES)
    with PieceStore(tmp_path, old) as store:
        for i in range(old.num_pieces):
            store.write_piece(i, piece_bytes(old, i))
        store.finish()
    new = artifact({"a.bin": b"x" * 10})
    with PieceStore(tmp_path, new):
        assert read_complete_marker(tmp_path) is None


def test_unwritable_destination(tmp_path: Path) -> None:
    m = artifact(FILES)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="can't create destination"):
        PieceStore(blocker / "dest", m).open()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a real file system that fills up."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("can't mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_a_clear_error(tiny_fs: Path) -> None:
    big = {"weights.bin": os.urandom(200 * KIB)}
    m = artifact(big, piece_size=64 * KIB)
    with pytest.raises(DiskFullError, match=r"weights\.bin.*no space left"):
        with PieceStore(tiny_fs / "model", m) as store:
            store.write_piece(0, memoryview(big["weights.bin"][: 64 * KIB]))
    assert read_complete_marker(tiny_fs / "model") is None


def blocks_of(m: Manifest, i: int, size: int) -> list[tuple[int, memoryview]]:
    data = piece_bytes(m, i)
    return [(o, data[o : o + size]) for o in range(0, len(data), size)]


@pytest.mark.parametrize("order", ["in order", "reversed", "middle first"])
def test_blocks_assembled_in_any_order_verify(tmp_path: Path, order: str) -> None:
    m = artifact(FILES)
    blocks = blocks_of(m, 0, 100)  # 11 blocks, the last one short
    if order == "reversed":
        blocks.reverse()
    elif order == "middle first":
        blocks = blocks[5:] + blocks[:5]
    with PieceStore(tmp_path, m) as store:
        for offset, data in blocks:
            assert store.write_block(0, offset, data)
        assert store.verify_assembled(0)
        assert store.has(0)
    assert (tmp_path / "a.bin").read_bytes()[:KIB] == FILES["a.bin"][:KIB]


def test_a_block_once_written_is_never_overwritten(tmp_path: Path) -> None:
    """An endgame duplicate that differs (a liar's copy) must not replace hashed bytes."""
    m = artifact(FILES)
    blocks = blocks_of(m, 0, 256)
    with PieceStore(tmp_path, m) as store:
        offset, good = blocks[0]
        assert store.write_block(0, offset, good)
        assert not store.write_block(0, offset, memoryview(bytes(len(good))))
        for offset, data in blocks[1:]:
            store.write_block(0, offset, data)
        assert store.verify_assembled(0)
    assert (tmp_path / "a.bin").read_bytes()[:256] == FILES["a.bin"][:256]


def test_a_corrupt_block_fails_verification_and_the_next_attempt_starts_clean(
    tmp_path: Path,
) -> None:
    m = artifact(FILES)
    blocks = blocks_of(m, 1, 256)
    with PieceStore(tmp_path, m) as store:
        for k, (offset, data) in enumerate(blocks):
            bad = bytearray(data)
            if k == 2:
                bad[7] ^= 1
            store.write_block(1, offset, memoryview(bad))
        assert not store.verify_assembled(1)
        assert not store.has(1)
        for offset, data in blocks:  # the retry from an honest peer
            assert store.write_block(1, offset, data)
        assert store.verify_assembled(1)
        with pytest.raises(StoreError, match="outside"):
            store.write_block(1, 1000, memoryview(b"x" * 100))


@pytest.mark.parametrize("direct_io", [True, False])
def test_direct_io_round_trip_with_unaligned_file_tails(tmp_path: Path, direct_io: bool) -> None:
    """Pieces land and are read back exactly, whether or not the page cache is bypassed.

    The files' sizes are not multiples of 4 KiB, so every file's last block is
    written partly around the page cache and partly through it.
    """
    import mmap

    files = {"w.bin": os.urandom(3 * 8192 + 1234), "x.bin": os.urandom(5000)}
    sizes = [(p, len(d)) for p, d in files.items()]
    piece = 8192
    digests = [digest(files[p][o : o + n]) for p, o, n in Manifest.layout(sizes, piece)]
    m = Manifest.build(name="d", origin="file:///x", piece_size=piece, files=sizes, digests=digests)
    buf = mmap.mmap(-1, piece)  # page-aligned, like the engine's pool buffers
    with PieceStore(tmp_path, m, direct_io=direct_io) as store:
        if direct_io and not store.direct_io:
            pytest.skip(f"{tmp_path} is on a file system without O_DIRECT")
        assert store.direct_io == direct_io
        for i in range(m.num_pieces):
            p = m.piece(i)
            data = files[p.path][p.offset : p.offset + p.length]
            if i % 2:
                buf[: len(data)] = data
                store.write_piece(i, memoryview(buf)[: len(data)])
            else:  # as blocks, the way peers deliver them
                for off in range(0, len(data), 4096):
                    store.write_block(i, off, memoryview(data)[off : off + 4096])
                assert store.verify_assembled(i)
        for i in range(m.num_pieces):
            p = m.piece(i)
            want = files[p.path][p.offset : p.offset + p.length]
            if store.read_direct(i, 0, p.length, buf):
                assert direct_io
                assert buf[: p.length] == want
            else:
                assert not direct_io
            # An unaligned offset is never read around the cache: the caller falls back.
            assert not store.read_direct(i, 1, 10, buf)
        store.finish()
    for path, data in files.items():
        assert (tmp_path / path).read_bytes() == data


def test_twenty_thousand_files_within_a_small_descriptor_limit(tmp_path: Path) -> None:
    """Descriptors stay bounded however many files: 20,000 files under a soft limit of 1024."""
    import resource

    files = {f"shards/{i:05d}.bin": bytes([i % 251]) for i in range(20_000)}
    m = artifact(files)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        with PieceStore(tmp_path, m, durable=False) as store:
            for i in range(m.num_pieces):
                p = m.piece(i)
                store.write_piece(i, memoryview(files[p.path]))
            store.finish()
        with PieceStore(tmp_path, m, durable=False) as store:
            assert store.complete
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (tmp_path / "shards/12345.bin").read_bytes() == bytes([12345 % 251])


def unvalidated(path: str, data: bytes) -> Manifest:
    """A one-file manifest built without validation: the manifest caps path depth, and the
    store must not depend on that (its own limits are the file system's)."""
    from core.manifest import FileEntry

    return Manifest(
        "m", "file:///nowhere", KIB, (FileEntry(path, len(data), 0, 1),), (digest(data),)
    )


@pytest.fixture
def deep_dir(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, with the chain of ``d`` directories a test makes in it removed afterwards
    without recursion (pytest's own clean-up, shutil.rmtree, recurses once per level)."""
    yield tmp_path
    fds = [os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for _ in range(5000):  # deeper than any test here goes
            try:
                fds.append(os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
            except FileNotFoundError:
                break
        while len(fds) > 1:
            fd = fds.pop()
            for name in os.listdir(fd):
                if name != "d":
                    os.unlink(name, dir_fd=fd)
            os.close(fd)
            os.rmdir("d", dir_fd=fds[-1])
    finally:
        for fd in fds:
            os.close(fd)


def test_deep_paths_are_created_without_recursion(deep_dir: Path) -> None:
    tmp_path = deep_dir
    deep = "d/" * 1500 + "leaf.bin"  # 1,500 levels, still within PATH_MAX from tmp_path
    m = unvalidated(deep, b"deep")
    with PieceStore(tmp_path, m, durable=False) as store:
        store.write_piece(0, memoryview(b"deep"))
        store.finish()
    assert read_complete_marker(tmp_path) is not None


def test_a_path_too_long_for_the_file_system_is_a_clear_error(deep_dir: Path) -> None:
    tmp_path = deep_dir
    # 4,088 bytes: within a manifest's path limit, beyond PATH_MAX once under tmp_path.
    m = unvalidated("d/" * 2040 + "leaf.bin", b"deep")
    with pytest.raises(StoreError, match="too long for the file system"):
        PieceStore(tmp_path, m).open()


def test_one_process_at_a_time_per_destination(tmp_path: Path) -> None:
    m = artifact(FILES)
    with PieceStore(tmp_path, m):
        with pytest.raises(StoreError, match=rf"{tmp_path}.*in use.*pid {os.getpid()}"):
            PieceStore(tmp_path, m).open()
    with PieceStore(tmp_path, m) as store:  # released on close
        assert store.missing() == [0, 1, 2, 3]


def test_unverified_bytes_are_never_served(tmp_path: Path) -> None:
    m = artifact(FILES)
    buf = bytearray(KIB)
    with PieceStore(tmp_path, m) as store:
        store.write_block(0, 0, piece_bytes(m, 0)[:100])
        with pytest.raises(StoreError, match="not verified"):
            store.read_piece_into(0, memoryview(buf))
        with pytest.raises(StoreError, match="not verified"):
            store.piece_location(0)
        store.write_piece(0, piece_bytes(m, 0))
        store.read_piece_into(0, memoryview(buf))
        assert bytes(buf) == FILES["a.bin"][:KIB]
        # A verified piece is never overwritten by a late block.
        assert not store.write_block(0, 0, memoryview(bytes(100)))


def test_an_unchanged_complete_destination_is_reused_without_reading(tmp_path: Path) -> None:
    m = artifact(FILES)
    with PieceStore(tmp_path, m) as store:
        for i in range(m.num_pieces):
            store.write_piece(i, piece_bytes(m, i))
        store.finish()
    with PieceStore(tmp_path, m) as store:
        assert store.complete and store.rechecked_bytes == 0
        assert store.reused_bytes == m.total_size
    assert read_complete_marker(tmp_path) is not None
    # Bytes swapped behind the store's back with size and mtime put back (as ``cp -p``
    # or ``rsync -t --inplace`` do): the change time can't be put back, so the file's
    # pieces are hashed again and the damaged one is found.
    shard = tmp_path / "a.bin"
    before = shard.stat()
    with open(shard, "r+b") as f:
        f.write(b"\0" * 10)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    with PieceStore(tmp_path, m) as store:
        assert store.missing() == [0]
        assert store.rechecked_bytes == 2500
    assert read_complete_marker(tmp_path) is None


def test_another_version_in_the_same_tick_is_still_noticed(tmp_path: Path) -> None:
    """A version switch re-hashes even if sizes and mtimes happen to match."""
    m = artifact(FILES)
    other = dict(FILES, **{"a.bin": os.urandom(2500)})
    o = artifact(other)
    with PieceStore(tmp_path, m) as store:
        for i in range(m.num_pieces):
            store.write_piece(i, piece_bytes(m, i))
        store.finish()
    stamps = {p: (tmp_path / p).stat() for p in FILES}
    with PieceStore(tmp_path, o) as store:
        p = o.piece(1)
        store.write_piece(1, memoryview(other["a.bin"][p.offset : p.offset + p.length]))
    for path, st in stamps.items():  # as if all of it happened within one clock tick
        os.utime(tmp_path / path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with PieceStore(tmp_path, m) as store:
        assert store.missing() == [1]


def test_direct_and_cached_descriptors_are_both_bounded(tmp_path: Path) -> None:
    from swarm.store import MAX_OPEN_FILES

    files = {f"s/{i:03d}.bin": os.urandom(4096) for i in range(300)}  # direct-I/O sized
    m = artifact(files, piece_size=4096)

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    baseline = open_fds()
    most = 0
    with PieceStore(tmp_path, m, durable=False) as store:
        for i in range(m.num_pieces):
            p = m.piece(i)
            store.write_piece(i, memoryview(files[p.path]))
            most = max(most, open_fds())
        store.finish()
    # Two LRU caches, plus the lock and the two state files.
    assert most - baseline <= 2 * MAX_OPEN_FILES + 3
    assert open_fds() == baseline
    for path, data in files.items():
        assert (tmp_path / path).read_bytes() == data


def test_an_edit_right_after_finish_is_noticed(tmp_path: Path) -> None:
    """finish() records identities only once a later write would get a later mtime, so an
    edit in the same clock tick as the last verified write can't hide behind it (on
    kernels with coarse file times; 6.13 and later stamp this edit finely anyway)."""
    m = artifact(FILES)
    with PieceStore(tmp_path, m, durable=False) as store:
        for i in range(m.num_pieces):
            store.write_piece(i, piece_bytes(m, i))
        store.finish()
    with open(tmp_path / "sub/b.bin", "r+b") as f:  # no utime: as fast as it gets
        f.write(bytes([FILES["sub/b.bin"][0] ^ 0xFF]))
    with PieceStore(tmp_path, m) as store:
        assert store.missing() == [3]


def test_a_live_process_holds_the_destination_until_it_dies(tmp_path: Path) -> None:
    import signal
    import sys

    m = artifact(FILES)
    (tmp_path / "m.manifest").write_bytes(m.encode())
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from core.manifest import Manifest; "
            "from swarm.store import PieceStore; "
            "s = PieceStore(Path(sys.argv[1]) / 'dest', Manifest.decode(Path(sys.argv[1], 'm.manifest').read_bytes())); "
            "s.open(); print('ready', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(
            StoreError, match=rf"in use by another swarm process \(pid {holder.pid}\)"
        ):
            PieceStore(tmp_path / "dest", m).open()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()
    with PieceStore(tmp_path / "dest", m) as store:  # the kernel released the lock
        assert store.missing() == [0, 1, 2, 3]


# -- a destination someone else has been in --------------------------------------------


@pytest.mark.parametrize("planted", ["a.bin", "sub", ".swarm/lock", ".swarm"])
def test_symbolic_links_planted_in_a_destination_are_refused_not_followed(
    tmp_path: Path, planted: str
) -> None:
    m = artifact(FILES)
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    outside.mkdir()
    precious = outside / "precious"
    precious.write_bytes(b"keep me")
    (dest / ".swarm").mkdir(parents=True)
    link = dest / planted
    if link.exists():
        link.rmdir()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside if planted in ("sub", ".swarm") else precious)
    with pytest.raises(StoreError, match="symbolic link"):
        PieceStore(dest, m).open()
    assert precious.read_bytes() == b"keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]


def test_a_fifo_among_the_state_files_is_refused_not_waited_on(tmp_path: Path) -> None:
    import threading

    m = artifact(FILES)
    with PieceStore(tmp_path, m) as store:
        store.write_piece(0, piece_bytes(m, 0))
    state = tmp_path / ".swarm" / f"{m.root_hex}.state"
    state.unlink()
    os.mkfifo(state)
    outcome: list[BaseException | None] = []

    def open_it() -> None:
        try:
            PieceStore(tmp_path, m).open()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=open_it, daemon=True)
    worker.start()
    worker.join(10.0)
    assert not worker.is_alive(), "opening the store blocked on a FIFO"
    assert isinstance(outcome[0], StoreError) and "not a regular file" in str(outcome[0])


def test_huge_state_records_are_not_read_into_memory(tmp_path: Path) -> None:
    m = artifact(FILES)
    with PieceStore(tmp_path, m) as store:
        for i in range(m.num_pieces):
            store.write_piece(i, piece_bytes(m, i))
        store.finish()
    for name in (".swarm/owner", ".swarm-complete"):
        with open(tmp_path / name, "r+b") as f:
            f.truncate(3 << 30)  # sparse: costs no disk, would cost 3 GiB to read
    with PieceStore(tmp_path, m) as store:
        # Neither record is believed: the owner is unknown, so every file is re-hashed.
        assert store.complete and store.rechecked_bytes == m.total_size
    assert not (tmp_path / COMPLETE_MARKER).exists(), "a bogus marker was left standing"
