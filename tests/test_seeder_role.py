"""The seeder role: a piece pulled from a real ``file://`` origin into a real PieceStore.

The origin's object is edited under the reader to model an artifact changed after
it was published: once (a bad transfer: the second read passes) and for good (the
error tells the operator to republish).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aio_helpers import run_bounded

from core.digest import block_layer
from core.errors import VerificationError
from core.manifest import Manifest
from seeder.origin import open_origin
from seeder.publish import publish
from seeder.reader import RangedReader
from seeder.role import origin_window, pull_piece, window_size
from swarm.store import PieceStore

KIB = 1024
PIECE = 4 * KIB
DATA = random.Random(7).randbytes(3 * PIECE + 100)  # a short last piece
TIMEOUT = 30.0


@dataclass
class Pull:
    """What one pull reported through its hooks."""

    attempts: list[int] = field(default_factory=list)
    progress: list[int] = field(default_factory=list)  # bytes since the last attempt began

    def on_attempt(self, attempt: int) -> None:
        self.attempts.append(attempt)
        self.progress.append(0)

    def advance(self, n: int) -> None:
        self.progress[-1] += n


def published(tmp_path: Path) -> tuple[Path, Manifest]:
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "w.bin").write_bytes(DATA)
    manifest = asyncio.run(
        publish(origin.as_uri(), "m", (tmp_path / "catalog").as_uri(), piece_size=PIECE)
    )
    return origin / "w.bin", manifest


@asynccontextmanager
async def seeder(
    tmp_path: Path, manifest: Manifest
) -> AsyncIterator[tuple[RangedReader, PieceStore]]:
    origin = open_origin(manifest.origin)
    # Ranges smaller than a piece: progress comes in several steps.
    reader = RangedReader(origin, range_size=KIB, max_concurrency=2)
    store = PieceStore(tmp_path / "dest", manifest, durable=False, direct_io=False)
    await asyncio.to_thread(store.open)
    try:
        yield reader, store
    finally:
        store.close()
        await origin.close()


def corrupt(path: Path, at: int) -> bytes:
    """Flip one byte of the origin's object at ``at``; returns the object as it was."""
    before = path.read_bytes()
    edited = bytearray(before)
    edited[at] ^= 0xFF
    path.write_bytes(bytes(edited))
    return before


@pytest.mark.parametrize("index", [0, 3])
def test_a_good_piece_is_stored_on_the_first_read(tmp_path: Path, index: int) -> None:
    _, manifest = published(tmp_path)
    length = manifest.piece_lengths[index]
    pull = Pull()

    async def body() -> None:
        async with seeder(tmp_path, manifest) as (reader, store):
            buf = memoryview(bytearray(length))
            failures = await pull_piece(
                reader, store, manifest, index, buf, pull.advance, on_attempt=pull.on_attempt
            )
            assert failures == 0
            assert store.has(index) and store.missing() == [i for i in range(4) if i != index]

    run_bounded(body, TIMEOUT)
    assert pull.attempts == [0]
    assert pull.progress == [length]
    start = index * PIECE
    assert (tmp_path / "dest" / "w.bin").read_bytes()[start : start + length] == DATA[
        start : start + length
    ]


def test_a_piece_that_fails_verification_once_is_read_again_and_stored(tmp_path: Path) -> None:
    path, manifest = published(tmp_path)
    original = corrupt(path, PIECE + 5)  # piece 1
    pull = Pull()

    def on_attempt(attempt: int) -> None:
        pull.on_attempt(attempt)
        if attempt == 1:
            path.write_bytes(original)  # the bad read was a one-off

    async def body() -> None:
        async with seeder(tmp_path, manifest) as (reader, store):
            buf = memoryview(bytearray(PIECE))
            failures = await pull_piece(
                reader, store, manifest, 1, buf, pull.advance, on_attempt=on_attempt
            )
            assert failures == 1
            assert store.has(1)

    run_bounded(body, TIMEOUT)
    assert pull.attempts == [0, 1]
    assert pull.progress == [PIECE, PIECE]  # each attempt reported from zero


@pytest.mark.parametrize("verify_retries", [0, 1, 3])
def test_an_origin_that_changed_for_good_is_an_error_naming_the_piece_and_the_fix(
    tmp_path: Path, verify_retries: int
) -> None:
    path, manifest = published(tmp_path)
    corrupt(path, 2 * PIECE)  # piece 2, for good
    pull = Pull()

    async def body() -> None:
        async with seeder(tmp_path, manifest) as (reader, store):
            buf = memoryview(bytearray(PIECE))
            with pytest.raises(VerificationError) as caught:
                await pull_piece(
                    reader,
                    store,
                    manifest,
                    2,
                    buf,
                    on_attempt=pull.on_attempt,
                    verify_retries=verify_retries,
                )
            assert not store.has(2)
            assert caught.value.piece == 2
            message = str(caught.value)
            assert "no longer matches the published manifest" in message
            assert manifest.ref in message and "republish" in message

    run_bounded(body, TIMEOUT)
    assert pull.attempts == list(range(verify_retries + 1))


def test_a_buffer_of_the_wrong_length_is_refused_before_any_read(tmp_path: Path) -> None:
    _, manifest = published(tmp_path)
    pull = Pull()

    async def body() -> None:
        async with seeder(tmp_path, manifest) as (reader, store):
            with pytest.raises(ValueError, match="buffer of"):
                await pull_piece(
                    reader,
                    store,
                    manifest,
                    3,
                    memoryview(bytearray(PIECE)),
                    on_attempt=pull.on_attempt,
                )
            with pytest.raises(ValueError, match="verify_retries"):
                await pull_piece(
                    reader, store, manifest, 0, memoryview(bytearray(PIECE)), verify_retries=-1
                )
            assert store.missing() == [0, 1, 2, 3]

    run_bounded(body, TIMEOUT)
    assert pull.attempts == []


# -- windows: a format-2 piece pulled through a buffer smaller than itself ----------


WINDOWED = random.Random(8).randbytes(2 * 16 * KIB - 300)  # two 16 KiB pieces, the last short


def windowed(tmp_path: Path) -> tuple[Path, Manifest]:
    """A format-2 manifest of 16 KiB pieces in 1 KiB blocks, over a ``file://`` origin."""
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "w.bin").write_bytes(WINDOWED)
    sizes = [("w.bin", len(WINDOWED))]
    layers = [block_layer(WINDOWED[o : o + n], KIB) for _, o, n in Manifest.layout(sizes, 16 * KIB)]
    manifest = Manifest.build(
        name="m",
        origin=origin.as_uri(),
        piece_size=16 * KIB,
        files=sizes,
        block_size=KIB,
        layers=layers,
    )
    return origin / "w.bin", manifest


def test_origin_window_is_whole_blocks_and_at_most_the_largest_piece() -> None:
    mib = 1024 * KIB
    sizes = [("a", 1024 * mib)]
    v2 = Manifest.build(
        name="m",
        origin="file:///x",
        piece_size=256 * mib,
        files=sizes,
        block_size=4 * mib,
        layers=[bytes(64 * 32)] * 4,
    )
    assert origin_window(v2, 16 * mib) == 64 * mib  # 4 ranges, not the 256 MiB piece
    assert origin_window(v2, 3 * mib) == 12 * mib
    assert origin_window(v2, 1 * mib) == 4 * mib  # never less than a block
    v1 = Manifest.build(
        name="m", origin="file:///x", piece_size=256 * mib, files=sizes, digests=[bytes(32)] * 4
    )
    assert origin_window(v1, 16 * mib) == 256 * mib  # format 1: the piece is checked whole


def test_the_simulators_read_pulls_in_the_seeders_windows() -> None:
    mib = 1024 * KIB
    assert window_size(4 * mib, 256 * KIB, 16 * mib) == mib  # small: a quarter of the piece
    assert window_size(16 * mib, 4 * mib, 16 * mib) == 4 * mib  # ... never less than a block
    assert window_size(4 * mib, 4 * mib, 16 * mib) == 4 * mib  # one block: the piece
    # A pull nobody is served from (swarm fetch --direct): the ranges, at most the piece.
    assert window_size(4 * mib, 256 * KIB, 16 * mib, relayed=False) == 4 * mib
    assert window_size(256 * mib, 4 * mib, 16 * mib) == 64 * mib  # large: 4 ranges
    assert window_size(256 * mib, 3 * mib, 16 * mib) == 66 * mib  # whole blocks
    assert window_size(256 * mib, 0, 16 * mib) == 256 * mib  # format 1


@pytest.mark.parametrize("window", [KIB, 3 * KIB, 8 * KIB])
def test_a_format_2_piece_is_pulled_a_window_at_a_time(tmp_path: Path, window: int) -> None:
    _, manifest = windowed(tmp_path)
    pull = Pull()

    async def body() -> None:
        async with seeder(tmp_path, manifest) as (reader, store):
            for index in range(manifest.num_pieces):
                buf = memoryview(bytearray(window))
                failures = await pull_piece(
                    reader, store, manifest, index, buf, pull.advance, on_attempt=pull.on_attempt
                )
                assert failures == 0 and store.has(index)
            assert store.read_back_bytes == 0  # every block was checked as it was written

    run_bounded(body, TIMEOUT)
    assert pull.attempts == [0, 0]
    assert pull.progress == manifest.piece_lengths
    assert (tmp_path / "dest" / "w.bin").read_bytes() == WINDOWED


def test_a_window_that_fails_once_is_read_again(tmp_path: Path) -> None:
    path, manifest = windowed(tmp_path)
    original = corrupt(path, 16 * KIB + 5 * KIB + 7)  # piece 1, its sixth block
    pull = Pull()

    def on_attempt(attempt: int) -> None:
        pull.on_attempt(attempt)
        if attempt == 1:
            path.write_bytes(original)

    async def body() -> None:
        async with seeder(tmp_path, manifest) as (reader, store):
            buf = memoryview(bytearray(4 * KIB))
            failures = await pull_piece(
                reader, store, manifest, 1, buf, pull.advance, on_attempt=on_attempt
            )
            assert failures == 1 and store.has(1)

    run_bounded(body, TIMEOUT)
    assert pull.attempts == [0, 1]
    # The second attempt re-reads from the failed window (bytes 4-8 KiB of the piece) on.
    assert pull.progress == [8 * KIB, manifest.piece_lengths[1] - 4 * KIB]
    assert (tmp_path / "dest" / "w.bin").read_bytes()[16 * KIB :] == WINDOWED[16 * KIB :]


def test_a_window_that_keeps_failing_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    path, manifest = windowed(tmp_path)
    corrupt(path, 100)  # piece 0, for good

    async def body() -> None:
        async with seeder(tmp_path, manifest) as (reader, store):
            buf = memoryview(bytearray(4 * KIB))
            with pytest.raises(VerificationError, match="republish") as caught:
                await pull_piece(reader, store, manifest, 0, buf, verify_retries=1)
            assert caught.value.piece == 0 and not store.has(0)

    run_bounded(body, TIMEOUT)
