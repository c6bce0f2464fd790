"""Digests and identifiers: blake3 of pieces and manifests, and the peer id's size."""

from __future__ import annotations

from typing import Final

import blake3

DIGEST_SIZE: Final = 32
"""Bytes of a blake3 digest (a piece's, a manifest root)."""
PEER_ID_LENGTH: Final = 20
"""Bytes of a peer id, on the wire and in announces."""


def digest(data: memoryview | bytes | bytearray) -> bytes:
    """blake3 of a piece, using every core for large pieces (the GIL is released)."""
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()
