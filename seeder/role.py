"""The seeder role: one piece pulled from the origin, verified and stored.

A peer the tracker assigns a piece to, and ``swarm fetch --direct`` for every
piece, do the same thing: read the piece's bytes from the origin into a buffer
(the ranged reader retries transient origin failures under its ``RetryPolicy``),
hand them to the store, which verifies them against the manifest before writing,
and if they do not verify, read them once more. A second mismatch means the
origin's object changed after the manifest was published: reading again cannot
help, and the error says to republish.

The store is anything with ``write_piece`` (``swarm.store.PieceStore``): the
seeder package does not import the swarm package.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final, Protocol

from core.errors import VerificationError
from core.manifest import Manifest
from seeder.reader import RangedReader

log = logging.getLogger("swarm.seeder")

# Reads after the first that a piece gets when its bytes fail verification: one
# more tells a corrupted transfer (passes) from an origin that changed (fails again).
DEFAULT_VERIFY_RETRIES: Final = 1


class PieceSink(Protocol):
    """Where a pulled piece goes: verified against the manifest, then written."""

    def write_piece(self, index: int, data: memoryview) -> None:
        """Store piece ``index``; raise VerificationError if ``data`` does not match it."""
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
) -> int:
    """Read piece ``index`` from the origin into ``buf``, verify and store it.

    ``buf`` holds exactly the piece's length. ``progress(n)`` is called as each range
    of ``n`` bytes arrives from the origin, and ``on_attempt(attempt)`` (0 first, then
    1, ...) before each read, so a caller reporting progress can start over when a
    piece is read again. ``store.write_piece`` runs in a worker thread (it hashes
    and writes).

    Returns how many reads failed verification before one passed. Raises
    VerificationError once ``verify_retries`` further reads have failed too: the
    origin no longer holds what the manifest describes.
    """
    if verify_retries < 0:
        raise ValueError(f"verify_retries must be >= 0, got {verify_retries}")
    piece = manifest.piece(index)
    if len(buf) != piece.length:
        raise ValueError(
            f"buffer of {len(buf)} bytes for {manifest.describe_piece(index)} "
            f"of {piece.length} bytes"
        )
    failures = 0
    while True:
        if on_attempt is not None:
            on_attempt(failures)
        await reader.read(piece.path, piece.offset, buf, progress)
        try:
            await asyncio.to_thread(store.write_piece, index, buf)
            return failures
        except VerificationError as exc:
            if failures == verify_retries:
                raise VerificationError(
                    f"{exc}: the origin's data no longer matches the published manifest "
                    f"{manifest.ref}; republish the artifact",
                    piece=index,
                ) from exc
            failures += 1
            log.warning("%s; reading it from the origin again", exc)
