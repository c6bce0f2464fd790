"""A real ``swarm tracker`` asked for zstd bombs in its S3 catalog keeps its memory bounded.

Each bomb sits under a real-looking name, with ``latest`` pointing at it, as a
malicious or broken publisher could leave it: a few KiB that decompress to
hundreds of MiB. The tracker must answer an error for every request, stay up,
serve a legitimate manifest afterwards, and never grow its resident memory by
anything like the bombs' decompressed size (``VmHWM``, the peak, is checked, not
only the size at the end).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import blake3
import msgpack
import zstandard
from conftest import S3Bucket
from servers import S3Server, populate
from swarm_helpers import TrackerProcess, processes

from core.manifest import DIGEST_SIZE, MAX_PIECES, MIN_PIECE_SIZE
from seeder.publish import publish

MIB = 1024 * 1024
BOMB_SIZE = 200 * MIB
ROUNDS = 3
# Far below the bombs' total (4 x ~200 MiB, asked for 6 times each), far above the
# few MiB a rejected manifest may cost.
MAX_GROWTH = 200 * MIB


def _zeros(total: int) -> Iterator[bytes]:
    chunk = bytes(MIB)
    for start in range(0, total, MIB):
        yield chunk[: min(MIB, total - start)]


def _compress(chunks: Iterator[bytes], declared: int | None) -> bytes:
    """A zstd frame of ``chunks``, declaring its content size when ``declared`` is given."""
    cobj = zstandard.ZstdCompressor(level=3).compressobj(size=-1 if declared is None else declared)
    out = [cobj.compress(chunk) for chunk in chunks]
    out.append(cobj.flush())
    return b"".join(out)


def _digest_table_bomb(name: str) -> tuple[bytes, str]:
    """A *valid* manifest of MAX_PIECES pieces whose digests are all zero, and its root.

    Real digests are incompressible; these compress ~30,000-fold, so the frame is a
    few KiB that claims 128 MiB of canonical encoding.
    """
    pieces = MAX_PIECES
    files = [["w.bin", pieces * MIN_PIECE_SIZE, pieces]]
    head = msgpack.packb([1, name, "s3://nowhere/x", MIN_PIECE_SIZE, files], use_bin_type=True)
    # A msgpack array is a count and its items: make it a 6-element array whose last
    # item, a bin32 of the digest table, is streamed rather than built in memory.
    assert head[0] == 0x95
    head = bytes([0x96]) + head[1:]
    table = pieces * DIGEST_SIZE
    header = head + b"\xc6" + table.to_bytes(4, "big")
    hasher = blake3.blake3(header)
    for chunk in _zeros(table):
        hasher.update(chunk)

    def chunks() -> Iterator[bytes]:
        yield header
        yield from _zeros(table)

    return _compress(chunks(), len(header) + table), hasher.hexdigest()


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def test_zstd_bombs_in_the_catalog_do_not_blow_up_the_tracker(
    s3_server: S3Server, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    catalog_dir = s3_bucket.path / "catalog"
    bombs: dict[str, tuple[bytes, str]] = {}
    declared = _compress(_zeros(BOMB_SIZE), BOMB_SIZE)
    streamed = _compress(_zeros(BOMB_SIZE), None)
    bombs["org/llama-3-70b"] = (declared, blake3.blake3(b"a").hexdigest())
    bombs["org/mistral-7b"] = (streamed, blake3.blake3(b"b").hexdigest())
    bombs["org/qwen2-72b"] = _digest_table_bomb("org/qwen2-72b")
    # A frame that declares 200 MiB but is cut short: refused on its header alone.
    bombs["org/gemma-2-9b"] = (declared[:64], blake3.blake3(b"d").hexdigest())
    for name, (data, root) in bombs.items():
        assert len(data) < 64 * 1024, f"{name}: bomb is {len(data)} bytes"
        populate(catalog_dir / name, {f"{root}.manifest": data, "latest": root.encode()})

    rng = random.Random(5)
    origin = populate(tmp_path / "origin", {"weights.bin": rng.randbytes(300_000)})
    catalog = f"{s3_bucket.url}/catalog"
    good = asyncio.run(publish(origin.as_uri(), "org/good-model", catalog, piece_size=64 * 1024))

    with processes() as procs:
        tracker = procs.add(
            TrackerProcess(
                catalog,
                s3_server.env(),
                tmp_path / "logs",
                announce_interval=1.0,
                peer_ttl=10.0,
                stall_timeout=10.0,
            )
        )
        tracker.start()
        status, body = tracker.get(f"/v1/manifest/{good.name}", timeout=30.0)
        assert status == 200, body[:300]
        before = _status(tracker.pid)

        for _ in range(ROUNDS):
            for name, (_data, root) in bombs.items():
                for ref in (name, f"{name}@{root}"):
                    status, body = tracker.get(f"/v1/manifest/{ref}", timeout=60.0)
                    assert 400 <= status < 600, f"{ref}: HTTP {status}"
                    assert name.encode() in body, body[:300]
                    assert tracker.alive(), tracker.stderr_tail()

        status, body = tracker.get(f"/v1/manifest/{good.ref}", timeout=30.0)
        assert status == 200, body[:300]
        after = _status(tracker.pid)

    growth = after["VmHWM"] - before["VmRSS"]
    print(
        f"tracker RSS {before['VmRSS'] / MIB:.0f} MiB before the bombs, "
        f"{after['VmRSS'] / MIB:.0f} MiB after, peak {after['VmHWM'] / MIB:.0f} MiB"
    )
    assert growth < MAX_GROWTH, (
        f"tracker peak RSS grew by {growth / MIB:.0f} MiB "
        f"({before['VmRSS'] / MIB:.0f} -> peak {after['VmHWM'] / MIB:.0f} MiB)"
    )
    assert after["VmRSS"] - before["VmRSS"] < MAX_GROWTH
