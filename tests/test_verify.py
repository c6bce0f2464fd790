"""``verify_dir``: every piece hashed again, bad ones named by file and byte range, and
the destination's state rewritten so the next fetch fetches exactly those pieces."""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path

import pytest

from core.errors import StoreError
from core.manifest import Manifest
from seeder.publish import publish
from swarm.fetch import FetchConfig, FetchResult, fetch_direct
from swarm.store import COMPLETE_MARKER, PieceStore, read_complete_marker
from swarm.verify import BadFile, BadPiece, verify_dir

KIB = 1024
PIECE = 2 * KIB
rng = random.Random(3)
MODEL = {
    "config.json": b'{"model": "tiny"}',
    "empty.txt": b"",
    "tokenizer.model": rng.randbytes(3 * KIB),
    "weights/w-1.bin": rng.randbytes(9 * KIB + 11),
    "weights/w-2.bin": rng.randbytes(4 * KIB),
}


def publish_at(tmp: Path, label: str, files: dict[str, bytes]) -> Manifest:
    origin = tmp / "origin" / label
    for path, data in files.items():
        (origin / path).parent.mkdir(parents=True, exist_ok=True)
        (origin / path).write_bytes(data)
    catalog = (tmp / "catalog").as_uri()
    return asyncio.run(publish(origin.as_uri(), "tiny", catalog, piece_size=PIECE))


def fetch(m: Manifest, dest: Path) -> FetchResult:
    return asyncio.run(fetch_direct(m, dest, config=FetchConfig(durable=False)))


@pytest.fixture
def fetched(tmp_path: Path) -> tuple[Manifest, Path]:
    m = publish_at(tmp_path, "v1", MODEL)
    dest = tmp_path / "dest"
    assert fetch(m, dest).verified
    return m, dest


def flip(path: Path, offset: int, *, keep_mtime: bool = False) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))
    if keep_mtime:  # an edit the file's identity can't show
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_an_intact_destination_verifies(fetched: tuple[Manifest, Path]) -> None:
    m, dest = fetched
    hashed: list[int] = []
    report = verify_dir(dest, workers=3, progress=hashed.append)
    assert report.ok and report.bad_pieces == [] and report.bad_files == []
    assert (report.root, report.artifact, report.pieces) == (m.root_hex, "tiny", m.num_pieces)
    assert sum(hashed) == m.total_size == report.bytes
    out = json.loads(json.dumps(report.to_json()))
    assert out["verified"] is True and out["bad_pieces"] == [] and out["root"] == m.root_hex
    assert read_complete_marker(dest) is not None


def test_bad_pieces_are_named_and_exactly_they_are_fetched_again(
    fetched: tuple[Manifest, Path],
) -> None:
    m, dest = fetched
    # Pieces (2 KiB): config.json 0, tokenizer.model 1-2, w-1 3-7, w-2 8-9.
    flip(dest / "weights/w-1.bin", 4 * KIB + 7, keep_mtime=True)  # piece 5
    os.truncate(dest / "tokenizer.model", KIB)  # pieces 1 (short) and 2 (beyond the end)
    (dest / "weights/w-2.bin").unlink()  # pieces 8, 9
    (dest / "empty.txt").unlink()
    report = verify_dir(dest, workers=2)
    assert not report.ok
    assert report.bad_pieces == [
        BadPiece(1, "tokenizer.model", 0, PIECE, "short"),
        BadPiece(2, "tokenizer.model", PIECE, KIB, "short"),
        BadPiece(5, "weights/w-1.bin", 2 * PIECE, PIECE, "mismatch"),
        BadPiece(8, "weights/w-2.bin", 0, PIECE, "missing"),
        BadPiece(9, "weights/w-2.bin", PIECE, PIECE, "missing"),
    ]
    assert report.bad_files == [
        BadFile("empty.txt", None, 0),
        BadFile("tokenizer.model", KIB, 3 * KIB),
        BadFile("weights/w-2.bin", None, 4 * KIB),
    ]
    out = report.to_json()
    assert out["bad_pieces"][2] == {
        "piece": 5,
        "path": "weights/w-1.bin",
        "start": 4 * KIB,
        "end": 6 * KIB,
        "reason": "mismatch",
    }
    assert out["bad_bytes"] == report.bad_bytes == 4 * PIECE + KIB
    assert not (dest / COMPLETE_MARKER).exists()
    with PieceStore(dest, m, durable=False) as store:
        assert store.missing() == [1, 2, 5, 8, 9]
        # The good pieces were recorded against the files as verify read them: no re-hash.
        assert store.rechecked_bytes == 0
    again = fetch(m, dest)
    assert again.verified
    assert again.origin_bytes == 4 * PIECE + KIB
    for path, data in MODEL.items():
        assert (dest / path).read_bytes() == data
    assert verify_dir(dest).ok


def test_one_worker_and_many_agree(fetched: tuple[Manifest, Path]) -> None:
    _, dest = fetched
    flip(dest / "weights/w-1.bin", 0)
    one, many = verify_dir(dest, workers=1), verify_dir(dest, workers=8)
    assert [p.index for p in one.bad_pieces] == [p.index for p in many.bad_pieces] == [3]
    assert (one.workers, many.workers) == (1, 8)


def test_an_oversized_file_is_bad_and_the_fetch_trims_it(fetched: tuple[Manifest, Path]) -> None:
    m, dest = fetched
    with open(dest / "config.json", "ab") as f:
        f.write(b"trailing junk")
    report = verify_dir(dest)
    assert report.bad_pieces == []
    assert report.bad_files == [BadFile("config.json", len(MODEL["config.json"]) + 13, 17)]
    assert not (dest / COMPLETE_MARKER).exists()
    again = fetch(m, dest)
    assert again.verified and again.origin_bytes == 0
    assert (dest / "config.json").read_bytes() == MODEL["config.json"]


def test_versions_are_chosen_by_marker_or_root(tmp_path: Path) -> None:
    v1 = publish_at(tmp_path, "v1", MODEL)
    v2 = publish_at(tmp_path, "v2", {**MODEL, "config.json": b'{"model": "tiny", "v": 2}'})
    dest = tmp_path / "dest"
    assert fetch(v1, dest).verified
    assert fetch(v2, dest).verified
    assert verify_dir(dest).root == v2.root_hex  # the one marked complete
    old = verify_dir(dest, root=v1.root_hex[:12])
    assert old.root == v1.root_hex
    # config.json is v2's now; v1 is reported bad there and no longer complete.
    assert [p.index for p in old.bad_pieces] == [0]
    assert read_complete_marker(dest) is not None  # v2's marker: verify of v1 leaves it
    with pytest.raises(StoreError, match=r"no version .* starts with 'ffff'"):
        verify_dir(dest, root="ffff")


def test_no_artifact_and_a_busy_destination_are_clear_errors(
    tmp_path: Path, fetched: tuple[Manifest, Path]
) -> None:
    with pytest.raises(StoreError, match="holds no swarm artifact"):
        verify_dir(tmp_path / "nothing")
    m, dest = fetched
    with PieceStore(dest, m):
        with pytest.raises(StoreError, match=f"{dest} is in use .*pid {os.getpid()}"):
            verify_dir(dest)


def test_a_stopped_verify_changes_nothing(fetched: tuple[Manifest, Path]) -> None:
    import threading

    m, dest = fetched
    flip(dest / "weights/w-1.bin", 5)
    state = (dest / ".swarm" / f"{m.root_hex}.state").read_bytes()
    stop = threading.Event()
    with pytest.raises(StoreError, match="stopped before the end; nothing was changed"):
        verify_dir(dest, workers=1, progress=lambda _n: stop.set(), stop=stop)
    assert (dest / ".swarm" / f"{m.root_hex}.state").read_bytes() == state
    assert read_complete_marker(dest) is not None  # a stopped check withdraws nothing
