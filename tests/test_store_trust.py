"""A destination's state is checked against the files it describes before it is trusted.

Each finding below was reproducible with the whole fetch path (``fetch_direct``
from a ``file://`` origin): the per-version state under ``DIR/.swarm/`` was taken
on its word, so a fetch exited "verified" over another version's bytes, a byte
edited by hand, or a truncated or deleted file. The property test then throws
crashes, version switches and damage at one DIR in any order and holds the store
to one promise: a fetch that returns verified leaves exactly the manifest's bytes.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from core.manifest import Manifest
from seeder.publish import publish
from swarm.fetch import FetchConfig, FetchResult, fetch_direct
from swarm.store import COMPLETE_MARKER, PieceStore, read_complete_marker

KIB = 1024
CONFIG = FetchConfig(durable=False)  # no fsync: the tests model process crashes, not power loss


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)


def publish_version(tmp: Path, label: str, files: dict[str, bytes], piece_size: int) -> Manifest:
    """Files at their own origin prefix, published under one name into one catalog."""
    origin = tmp / "origin" / label
    write_tree(origin, files)
    catalog = (tmp / "catalog").as_uri()
    return asyncio.run(publish(origin.as_uri(), "m", catalog, piece_size=piece_size))


def fetch(manifest: Manifest, dest: Path) -> FetchResult:
    return asyncio.run(fetch_direct(manifest, dest, config=CONFIG))


def tick(path: Path) -> None:
    """Move a file's mtime a second ahead after editing it.

    Linux stamps mtime from a coarse clock (one scheduler tick, 1-10 ms; since
    6.13 a fine one once the time was read), and a test edits a file within
    microseconds of the fetch that wrote it, where a real edit comes at least a
    tick later. This models that passing of time on any kernel.
    """
    st_ = path.stat()
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000_000))


def assert_files(dest: Path, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        assert (dest / path).read_bytes() == data, f"{path} differs from the manifest"


MODEL_A = {
    "config.json": b'{"layers": 2, "version": "A"}' * 3,
    "weights/w.bin": random.Random(1).randbytes(5 * KIB + 17),
}
MODEL_B = {**MODEL_A, "config.json": b'{"layers": 2, "version": "B", "extra": 1}' * 5}


def test_switching_back_to_a_version_rechecks_files_another_version_wrote(tmp_path: Path) -> None:
    a = publish_version(tmp_path, "a", MODEL_A, KIB)
    b = publish_version(tmp_path, "b", MODEL_B, KIB)
    dest = tmp_path / "dest"
    assert fetch(a, dest).verified
    assert fetch(b, dest).verified
    assert_files(dest, MODEL_B)
    again = fetch(a, dest)
    assert again.verified
    assert_files(dest, MODEL_A)
    # Only config.json was re-read: the weights were re-hashed and found intact.
    assert again.origin_bytes == len(MODEL_A["config.json"])
    assert again.extra["rechecked_bytes"] == len(MODEL_A["config.json"]) + len(
        MODEL_A["weights/w.bin"]
    )
    marker = read_complete_marker(dest)
    assert marker is not None and marker["root"] == a.root_hex


def test_a_byte_changed_by_hand_is_fetched_again(tmp_path: Path) -> None:
    a = publish_version(tmp_path, "a", MODEL_A, KIB)
    dest = tmp_path / "dest"
    assert fetch(a, dest).verified
    shard = dest / "weights/w.bin"
    with open(shard, "r+b") as f:
        f.seek(3 * KIB + 5)
        byte = f.read(1)
        f.seek(3 * KIB + 5)
        f.write(bytes([byte[0] ^ 0x40]))
    tick(shard)
    again = fetch(a, dest)
    assert again.verified
    assert_files(dest, MODEL_A)
    assert again.origin_bytes == KIB  # exactly the damaged piece


def test_a_truncated_or_deleted_shard_is_not_complete(tmp_path: Path) -> None:
    a = publish_version(tmp_path, "a", MODEL_A, KIB)
    dest = tmp_path / "dest"
    assert fetch(a, dest).verified
    shard = dest / "weights/w.bin"
    os.truncate(shard, 2 * KIB + 3)
    tick(shard)
    # Opening the store proves the marker wrong before anything else happens.
    store = PieceStore(dest, a, durable=False)
    store.open()
    try:
        assert not (dest / COMPLETE_MARKER).exists()
        # config.json is piece 0; the shard's pieces 1 and 2 lie before the cut.
        assert store.missing() == [3, 4, 5, 6]
    finally:
        store.close()
    again = fetch(a, dest)
    assert again.verified
    assert_files(dest, MODEL_A)
    shard.unlink()
    again = fetch(a, dest)
    assert again.verified
    assert_files(dest, MODEL_A)
    assert again.origin_bytes == len(MODEL_A["weights/w.bin"])


# --- the property --------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    kind: str  # "fetch", "crash", "damage"
    version: int  # which version to fetch or crash in
    pieces: int  # how many pieces a crashing fetch verifies before it dies
    path: int  # which file to damage
    how: str  # "flip", "truncate", "delete", "extend"
    where: int  # byte to flip or length to keep


steps = st.builds(
    Step,
    kind=st.sampled_from(["fetch", "crash", "crash", "damage", "damage"]),
    version=st.integers(0, 2),
    pieces=st.integers(0, 12),
    path=st.integers(0, 2),
    how=st.sampled_from(["flip", "truncate", "delete", "extend"]),
    where=st.integers(0, 10_000),
)

PATHS = ("config.json", "weights/a.bin", "weights/b.bin")


def versions() -> list[dict[str, bytes]]:
    """Three versions sharing paths: same sizes, different sizes, and one shared file."""
    rng = random.Random(7)
    base = {
        "config.json": rng.randbytes(700),
        "weights/a.bin": rng.randbytes(3 * KIB + 100),
        "weights/b.bin": rng.randbytes(2 * KIB),
    }
    same_size = {**base, "weights/a.bin": rng.randbytes(3 * KIB + 100)}
    resized = {**base, "config.json": rng.randbytes(1500), "weights/b.bin": rng.randbytes(KIB)}
    return [base, same_size, resized]


VERSIONS = versions()


def crash_midway(
    m: Manifest, files: dict[str, bytes], dest: Path, pieces: int, rng_seed: int
) -> None:
    """A fetch that verifies some pieces, leaves torn unverified bytes, and dies.

    A SIGKILLed process has its descriptors closed by the kernel and does nothing
    else; ``close()`` writes nothing, so closing without ``finish()`` is that crash.
    """
    rng = random.Random(rng_seed)
    store = PieceStore(dest, m, durable=False)
    store.open()
    todo = store.missing()
    rng.shuffle(todo)
    for index in todo[:pieces]:
        p = m.piece(index)
        store.write_piece(index, memoryview(files[p.path][p.offset : p.offset + p.length]))
    for index in todo[pieces : pieces + 2]:  # a torn write of bytes that never verified
        p = m.piece(index)
        store.write_block(index, 0, memoryview(rng.randbytes(max(1, p.length // 2))))
    store.close()


def damage(dest: Path, step: Step) -> None:
    path = dest / PATHS[step.path]
    if not path.exists():
        return
    size = path.stat().st_size
    if step.how == "delete":
        path.unlink()
        return
    if step.how == "truncate":
        os.truncate(path, step.where % (size + 1))
    elif step.how == "extend":
        with open(path, "ab") as f:
            f.write(b"\0junk")
    elif size:
        with open(path, "r+b") as f:
            f.seek(step.where % size)
            b = f.read(1)
            f.seek(step.where % size)
            f.write(bytes([b[0] ^ 0xFF]))
    tick(path)


@settings(max_examples=50, deadline=None)
@given(st.lists(steps, min_size=1, max_size=8), st.sampled_from([KIB, 2 * KIB, 4 * KIB]))
def test_a_verified_fetch_always_leaves_the_manifests_bytes(
    plan: list[Step], piece_size: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifests = [
            publish_version(root, f"v{i}", files, piece_size) for i, files in enumerate(VERSIONS)
        ]
        dest = root / "dest"
        for n, step in enumerate([*plan, Step("fetch", plan[-1].version, 0, 0, "flip", 0)]):
            m, files = manifests[step.version], VERSIONS[step.version]
            if step.kind == "crash":
                crash_midway(m, files, dest, step.pieces, n)
            elif step.kind == "damage":
                damage(dest, step)
            else:
                result = fetch(m, dest)
                assert result.verified
                assert_files(dest, files)
                marker = read_complete_marker(dest)
                assert marker is not None and marker["root"] == m.root_hex
