"""Digests and identifiers: blake3 of pieces and manifests, and the peer id's size."""

from __future__ import annotations

from typing import Final

import blake3

DIGEST_SIZE: Final = 32
"""Bytes of a blake3 digest (a piece's, a manifest root)."""
PEER_ID_LENGTH: Final = 20
"""Bytes of a peer id, on the wire and in announces."""


def digest(data: memoryview | bytes | bytearray, max_threads: int = blake3.blake3.AUTO) -> bytes:
    """blake3 of ``data``, by default on every core for large inputs (the GIL is released).

    ``max_threads=1`` where the caller already spreads work over threads: blake3's own
    pool then only adds CPU (4 MiB blocks here: 0.17 CPU-s per GiB on one thread,
    0.22 with the pool) and threads spinning for work on cores the workers need.
    """
    return blake3.blake3(data, max_threads=max_threads).digest()


def block_layer(piece: memoryview | bytes | bytearray, block_size: int) -> bytes:
    """A piece's block layer: the blake3 digests of its ``block_size`` blocks, joined.

    The last block of a piece may be short. A manifest of format 2 carries every
    piece's layer, and the piece's digest is :func:`layer_digest` of it, so a block
    can be checked the moment it lands and a piece whose blocks were all checked
    needs no second pass over its bytes.
    """
    view = memoryview(piece)
    return b"".join(
        digest(view[offset : offset + block_size]) for offset in range(0, len(view), block_size)
    )


def layer_digest(layer: bytes) -> bytes:
    """The digest of a piece of format 2: blake3 of its block layer."""
    return blake3.blake3(layer).digest()


class PieceHasher:
    """A piece's digest from its bytes streamed in order, in chunks of any size.

    ``block_size`` 0: format 1, blake3 of the bytes. Otherwise format 2: the piece
    is cut into blocks of ``block_size`` bytes, each hashed, and the digest is
    blake3 of the joined block digests (:func:`layer_digest` of the layer).
    """

    __slots__ = ("_block", "_block_size", "_filled", "_layer", "_threads", "_whole")

    def __init__(self, block_size: int = 0, max_threads: int = blake3.blake3.AUTO) -> None:
        self._block_size = block_size
        self._threads = max_threads
        self._whole = blake3.blake3(max_threads=max_threads) if not block_size else None
        self._block = blake3.blake3(max_threads=max_threads)
        self._filled = 0  # bytes of the current block in ``_block``
        self._layer: list[bytes] = []

    def update(self, data: memoryview | bytes | bytearray) -> None:
        if self._whole is not None:
            self._whole.update(data)
            return
        view = memoryview(data)
        while view:
            take = min(len(view), self._block_size - self._filled)
            self._block.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self._block_size:
                self._end_block()

    def _end_block(self) -> None:
        self._layer.append(self._block.digest())
        self._block = blake3.blake3(max_threads=self._threads)
        self._filled = 0

    def layer(self) -> bytes:
        """The block layer of what was hashed (format 2 only)."""
        if self._whole is not None:
            raise ValueError("a format-1 piece has no block layer")
        if self._filled:
            self._end_block()
        return b"".join(self._layer)

    def digest(self) -> bytes:
        if self._whole is not None:
            return self._whole.digest()
        return layer_digest(self.layer())


def piece_digest(data: memoryview | bytes | bytearray, block_size: int = 0) -> bytes:
    """The digest of a whole piece in memory, of format 1 (``block_size`` 0) or 2."""
    if not block_size:
        return digest(data)
    return layer_digest(block_layer(data, block_size))
