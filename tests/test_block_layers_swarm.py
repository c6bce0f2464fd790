"""Format 1 and format 2 manifests through real ``swarm`` processes on loopback.

``swarm publish`` writes format 2 (block layers); a catalog may still hold format-1
manifests written before it, and those must still fetch, peer to peer, verified a
piece at a time. Unit tests of the formats are in ``tests/test_block_layers.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fetch_helpers import make_model, publish, swarm, swarm_concurrently
from servers import LOOPBACK, populate
from swarm_helpers import TrackerProcess

from core.digest import digest
from core.manifest import Manifest
from seeder.catalog import Catalog
from swarm.verify import verify_dir

KiB = 1024
PIECE = 16 * KiB


def _fetch(tracker: str, dest: Path, block_size: str = "4KiB") -> list[str]:
    return [
        "fetch",
        "m",
        "--tracker",
        tracker,
        "--dest",
        str(dest),
        "--listen",
        f"{LOOPBACK}:0",
        "--linger",
        "20",
        "--block-size",
        block_size,
        "--no-fsync",
        "--json",
    ]


def _swarm_of_two(
    tmp_path: Path, catalog: str, block_sizes: tuple[str, str] = ("4KiB", "4KiB")
) -> list[dict[str, object]]:
    tracker = TrackerProcess(
        catalog, {}, tmp_path / "logs", announce_interval=2.0, peer_ttl=30.0, stall_timeout=20.0
    )
    tracker.start()
    try:
        runs = swarm_concurrently(
            _fetch(tracker.url, tmp_path / "a", block_sizes[0]),
            _fetch(tracker.url, tmp_path / "b", block_sizes[1]),
            timeout=60,
        )
    finally:
        tracker.stop()
    return [run.ok() for run in runs]


def test_a_format_1_manifest_still_fetches_peer_to_peer(tmp_path: Path) -> None:
    files = make_model(11, {"model.bin": 12 * PIECE - 5, "config.json": 40})
    origin = tmp_path / "origin" / "m"
    populate(origin, files)
    sizes = sorted((path, len(data)) for path, data in files.items())
    digests = [digest(files[p][o : o + n]) for p, o, n in Manifest.layout(sizes, PIECE)]
    manifest = Manifest.build(
        name="m", origin=origin.as_uri(), piece_size=PIECE, files=sizes, digests=digests
    )
    assert manifest.format == 1
    catalog = (tmp_path / "catalog").as_uri()

    async def put() -> None:
        async with Catalog(catalog) as c:
            await c.put(manifest)

    asyncio.run(put())

    results = _swarm_of_two(tmp_path, catalog)
    for result, dest in zip(results, ("a", "b"), strict=True):
        assert result["verified"] and result["root"] == manifest.root_hex, result
        assert verify_dir(tmp_path / dest).ok
        for path, data in files.items():
            assert (tmp_path / dest / path).read_bytes() == data
    # One origin copy; the rest moved between the two, checked a piece at a time.
    assert sum(r["origin_pieces"] for r in results) == manifest.num_pieces  # type: ignore[misc]
    assert sum(r["peer_bytes"] for r in results) > 0  # type: ignore[misc]
    assert all(r["corrupt_blocks"] == 0 for r in results)


def test_a_format_2_manifest_checks_every_block_as_it_lands(tmp_path: Path) -> None:
    """8 MiB pieces in the manifest's 4 MiB blocks, two peers told --block-size 1MiB
    and 8MiB: both ask for exactly the manifest's blocks, each block is checked in
    memory, none is read back, and the pieces left the origin once."""
    mib = 1024 * KiB
    files = make_model(12, {"model.bin": 2 * 8 * mib - 5, "config.json": 40})
    origin = tmp_path / "origin" / "m"
    populate(origin, files)
    catalog = (tmp_path / "catalog").as_uri()
    published = publish(origin.as_uri(), "m", catalog, piece_size="8MiB", files=sorted(files))
    results = _swarm_of_two(tmp_path, catalog, ("1MiB", "8MiB"))
    for result, dest in zip(results, ("a", "b"), strict=True):
        assert result["verified"] and result["root"] == published["root"], result
        assert verify_dir(tmp_path / dest).ok
    assert sum(r["peer_bytes"] for r in results) > 0  # type: ignore[misc]
    assert all(r["read_back_bytes"] == 0 and r["corrupt_blocks"] == 0 for r in results)
    # One origin copy: each piece came from the origin once and went peer to peer.
    assert sum(r["origin_pieces"] for r in results) == published["pieces"]  # type: ignore[misc]
    assert all(r["pending_refused"] == 0 for r in results)


def test_publish_writes_the_block_size_it_is_told(tmp_path: Path) -> None:
    files = make_model(13, {"model.bin": 3 * PIECE - 7})
    origin = tmp_path / "origin" / "m"
    populate(origin, files)
    catalog = (tmp_path / "catalog").as_uri()
    base = ["publish", origin.as_uri(), "--name", "m", "--catalog", catalog]
    result = swarm(*base, "--piece-size", "16KiB", "--block-size", "2KiB", "--json").ok()
    assert result["block_size"] == 2 * KiB

    async def get() -> Manifest:
        async with Catalog(catalog) as c:
            return await c.get("m")

    manifest = asyncio.run(get())
    assert manifest.block_size == 2 * KiB and manifest.root_hex == result["root"]
    assert manifest.blocks_in(0) == PIECE // (2 * KiB)
    # A size no manifest may carry is refused before anything is read.
    bad = swarm(*base, "--piece-size", "16KiB", "--block-size", "512", "--json")
    assert "block size must be between" in bad.error_line()


def _publish_slow_model(tmp_path: Path, seed: int) -> tuple[str, dict[str, object]]:
    """32 MiB in four 8 MiB pieces of 256 KiB blocks, from a file origin: (catalog, publish JSON)."""
    files = make_model(seed, {"model.bin": 4 * 8 * 1024 * KiB})
    origin = tmp_path / "origin" / "m"
    populate(origin, files)
    catalog = (tmp_path / "catalog").as_uri()
    base = ["publish", origin.as_uri(), "--name", "m", "--catalog", catalog]
    return catalog, swarm(*base, "--piece-size", "8MiB", "--block-size", "256KiB", "--json").ok()


def _slow_swarm(
    tmp_path: Path,
    catalog: str,
    root: str,
    prefix: str,
    fetch_extra: Sequence[str] = (),
    tracker_extra: Sequence[str] = (),
) -> tuple[list[dict[str, object]], dict[str, Any] | None]:
    """Three peers whose origin and peer reads are capped at 8 MiB/s, origin windows of
    1 MiB (4 ranges of 256 KiB): a piece takes a second to pull, time enough for the
    others to be told of, and ask for, the blocks of it already in. Returns their
    results (into ``prefix``-0..2) and the tracker's status of the swarm at the end."""
    tracker = TrackerProcess(
        catalog,
        {},
        tmp_path / "logs",
        announce_interval=1.0,
        peer_ttl=30.0,
        stall_timeout=20.0,
        extra=tracker_extra,
    )
    extra = ["--range-size", "256KiB", "--max-download-rate", "8MiB", "--linger", "5"]
    tracker.start()
    try:
        runs = swarm_concurrently(
            *(
                _fetch(tracker.url, tmp_path / f"{prefix}-{n}") + extra + list(fetch_extra)
                for n in range(3)
            ),
            timeout=90,
        )
        status = tracker.swarm_status(root)
    finally:
        tracker.stop()
    results = [run.ok() for run in runs]
    for n, result in enumerate(results):
        assert result["verified"] and result["root"] == root, result
        assert verify_dir(tmp_path / f"{prefix}-{n}").ok
    return results, status


def test_cut_through_serves_checked_blocks_of_pieces_not_yet_whole(tmp_path: Path) -> None:
    """With cut-through (the default), blocks of a piece still arriving from the
    origin or a peer go out to others before the piece is whole; without it, none
    do. Either way every byte is checked, and the origin is read once."""
    catalog, published = _publish_slow_model(tmp_path, 14)
    relayed = {}
    for cut_through in (2, 0):
        results, _ = _slow_swarm(
            tmp_path,
            catalog,
            str(published["root"]),
            f"ct{cut_through}",
            ["--cut-through", str(cut_through)],
        )
        assert all(r["read_back_bytes"] == 0 and r["corrupt_blocks"] == 0 for r in results)
        assert sum(r["origin_pieces"] for r in results) == 4  # type: ignore[misc]
        assert sum(r["origin_bytes"] for r in results) == 32 * 1024 * KiB  # type: ignore[misc]
        relayed[cut_through] = sum(r["cut_through_bytes"] for r in results)  # type: ignore[misc]
    assert relayed[0] == 0
    assert relayed[2] >= 256 * KiB, relayed


def test_origin_copies_let_the_idle_origin_serve_a_peer_within_the_budget(
    tmp_path: Path,
) -> None:
    """``swarm tracker --origin-copies 2``: three peers, four pieces, two pulls a peer:
    the first two announces take every piece, and once they are present the peers
    with origin slots free pull copies of what they lack. Every byte is still
    checked; the origin sends at most 2 x F; by default (test above) exactly F."""
    catalog, published = _publish_slow_model(tmp_path, 15)
    results, status = _slow_swarm(
        tmp_path, catalog, str(published["root"]), "oc", tracker_extra=["--origin-copies", "2"]
    )
    size = 32 * 1024 * KiB
    total = sum(r["origin_bytes"] for r in results)  # type: ignore[misc]
    assert size < total <= 2 * size, total
    assert status is not None
    copies = status["origin"]
    assert copies["copies_allowed"] == 2.0 and copies["copies"] >= 1, copies
    assert 0 < copies["copy_bytes"] <= size
