"""The seeder role: one piece pulled from the origin, verified and stored.

A peer the tracker assigns a piece to, and ``swarm fetch --direct`` for every
piece, do the same thing: read the piece's bytes from the origin into a buffer
(the ranged reader retries transient origin failures under its ``RetryPolicy``),
hand them to the store, which verifies them against the manifest before writing,
and if they do not verify, read them once more. A second mismatch means the
origin's object changed after the manifest was published: reading again cannot
help, and the error says to republish.

A piece of a format-2 manifest may be pulled through a *window* smaller than the
piece (a whole number of its blocks): each window is read, handed to the store,
which checks every block in it before writing, and the next window reuses the
buffer; a window that fails is read once more. Memory per pull is then the
window, not the piece: 64 MiB, not 256 (see :func:`origin_window`).

The store is anything with ``write_piece``, ``write_block`` and
``verify_assembled`` (``swarm.store.PieceStore``): the seeder package does not
import the swarm package.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final, Protocol

from core.errors import VerificationError
from core.manifest import Manifest
from seeder.reader import Activity, RangedReader

log = logging.getLogger("swarm.seeder")

# Reads after the first that a piece gets when its bytes fail verification: one
# more tells a corrupted transfer (passes) from an origin that changed (fails again).
DEFAULT_VERIFY_RETRIES: Final = 1
# Ranges of a window read at once: with 4 pulls in flight, the 16 concurrent origin
# requests a whole 256 MiB piece used to get.
WINDOW_RANGES: Final = 4


def window_size(piece_size: int, block_size: int, range_size: int, *, relayed: bool = True) -> int:
    """Bytes a pull of pieces of ``piece_size`` reads at a time: ``WINDOW_RANGES``
    ranges rounded up to whole blocks, and at most a quarter of the piece (whole
    blocks too); the whole piece when ``block_size`` is 0 (format 1). The
    simulators read pulls through it too.

    At most a quarter: a window's blocks are served cut-through when it lands, and
    a piece pulled in one window helps nobody until it is whole. In a burst of
    small pieces every seeder's first piece landed at once, and until then the
    fabric idled: dragonfly-1200 (4 MiB pieces) moved nothing peer to peer for its
    first 0.4 s. It needs requests that move off a slow holder
    (``PiecePicker.take_over``): without them, a slow node's quarter-pulled
    blocks were asked of it by every fast node, which waited for it at the end
    (session model, mixed fleet seed 4: 1.28 x the fast nodes' own bound; 1.05
    with whole-piece windows, 1.05 with both). Pieces of 256 MiB and more keep
    their ``WINDOW_RANGES`` ranges (64 MiB). A pull nobody is served from
    (``relayed`` false: ``swarm fetch --direct``) keeps them for small pieces too:
    there a smaller window would only cost requests.
    """
    if not block_size:
        return piece_size
    window = -(-WINDOW_RANGES * range_size // block_size) * block_size
    if relayed:
        window = min(window, -(-piece_size // (4 * block_size)) * block_size)
    return min(piece_size, window)


def origin_window(manifest: Manifest, range_size: int, *, relayed: bool = True) -> int:
    """The buffer one origin pull needs: a window (:func:`window_size`) of the
    largest piece; the piece itself in format 1."""
    largest = max(manifest.piece_lengths, default=1)
    return window_size(largest, manifest.block_size, range_size, relayed=relayed)


class PieceSink(Protocol):
    """Where a pulled piece goes: verified against the manifest, then written."""

    def write_piece(self, index: int, data: memoryview) -> None:
        """Store piece ``index``; raise VerificationError if ``data`` does not match it."""
        ...

    def write_block(self, index: int, offset: int, data: memoryview) -> bool:
        """Check the manifest's blocks in ``data`` and write it; VerificationError if not."""
        ...

    def verify_assembled(self, index: int) -> bool:
        """Record the piece whose blocks were written; False if they don't verify."""
        ...

    def holds_checked(self, index: int, start: int, end: int) -> bool:
        """Whether bytes [start, end) of piece ``index`` are on disk, every block checked."""
        ...


async def pull_piece(
    reader: RangedReader,
    store: PieceSink,
    manifest: Manifest,
    index: int,
    buf: memoryview,
    progress: Callable[[int], None] | None = None,
    *,
    on_attempt: Callable[[int], None] | None = None,
    verify_retries: int = DEFAULT_VERIFY_RETRIES,
    activity: Activity | None = None,
    checked: Callable[[int], None] | None = None,
) -> int:
    """Read piece ``index`` from the origin into ``buf``, verify and store it.

    ``buf`` holds exactly the piece's length. ``progress(n)`` is called as each range
    of ``n`` bytes arrives from the origin, and ``on_attempt(attempt)`` (0 first, then
    1, ...) before each read, so a caller reporting progress can start over when a
    piece is read again. ``store.write_piece`` runs in a worker thread (it hashes
    and writes). ``activity`` is passed to :meth:`RangedReader.read` (what the
    pull's ranges are doing: reading, or waiting out a throttled answer).
    ``checked(end)`` is called when a window pull has bytes ``[0, end)`` of the
    piece on disk, every block checked: a cut-through peer serves them at once.

    Returns how many reads failed verification before one passed. Raises
    VerificationError once ``verify_retries`` further reads have failed too: the
    origin no longer holds what the manifest describes.
    """
    if verify_retries < 0:
        raise ValueError(f"verify_retries must be >= 0, got {verify_retries}")
    piece = manifest.piece(index)
    if len(buf) < piece.length and manifest.block_size and not len(buf) % manifest.block_size:
        return await _pull_windows(
            reader,
            store,
            manifest,
            index,
            buf,
            progress,
            on_attempt,
            verify_retries,
            activity,
            checked,
        )
    if len(buf) != piece.length:
        raise ValueError(
            f"buffer of {len(buf)} bytes for {manifest.describe_piece(index)} "
            f"of {piece.length} bytes"
        )
    failures = 0
    while True:
        if on_attempt is not None:
            on_attempt(failures)
        await reader.read(piece.path, piece.offset, buf, progress, activity)
        try:
            await asyncio.to_thread(store.write_piece, index, buf)
            return failures
        except VerificationError as exc:
            if failures == verify_retries:
                raise _origin_changed(exc, manifest, index) from exc
            failures += 1
            log.warning("%s; reading it from the origin again", exc)


async def _pull_windows(
    reader: RangedReader,
    store: PieceSink,
    manifest: Manifest,
    index: int,
    buf: memoryview,
    progress: Callable[[int], None] | None,
    on_attempt: Callable[[int], None] | None,
    verify_retries: int,
    activity: Activity | None = None,
    checked: Callable[[int], None] | None = None,
) -> int:
    """Pull a format-2 piece a window (``len(buf)``, whole blocks) at a time."""
    piece = manifest.piece(index)
    failures = 0
    if on_attempt is not None:
        on_attempt(0)
    for start in range(0, piece.length, len(buf)):
        view = buf[: min(len(buf), piece.length - start)]
        end = start + len(view)
        written = False
        # Blocks kept from a run that stopped part-way through this piece are not read again.
        while not store.holds_checked(index, start, end):
            await reader.read(piece.path, piece.offset + start, view, progress, activity)
            try:
                written = await asyncio.to_thread(store.write_block, index, start, view)
                break
            except VerificationError as exc:
                if failures == verify_retries:
                    raise _origin_changed(exc, manifest, index) from exc
                failures += 1
                log.warning("%s; reading it from the origin again", exc)
                if on_attempt is not None:
                    on_attempt(failures)
        # Served once written here, or held checked (kept, or written by another
        # writer while this one was turned away).
        if checked is not None and (written or store.holds_checked(index, start, end)):
            checked(end)
    if not await asyncio.to_thread(store.verify_assembled, index):
        # Every block was checked as it was written: only a block another writer
        # put there unchecked can fail here. Its piece is pulled again whole.
        raise VerificationError(
            f"{manifest.describe_piece(index)} failed verification after its blocks were written",
            piece=index,
        )
    return failures


def _origin_changed(exc: VerificationError, manifest: Manifest, index: int) -> VerificationError:
    """The error once every read of a piece failed: the origin changed, republish."""
    return VerificationError(
        f"{exc}: the origin's data no longer matches the published manifest "
        f"{manifest.ref}; republish the artifact",
        piece=index,
    )
