"""A compact set of piece indices: which pieces a peer holds.

The layout is BitTorrent's: piece ``i`` is bit ``0x80 >> (i % 8)`` of byte
``i // 8``, so piece 0 is the high bit of byte 0. The last byte's unused low bits
("spare bits") are always zero; :meth:`Bitfield.from_bytes` refuses input where
they are not, because a peer that sets them is either buggy or lying about
pieces that don't exist.

For a million pieces the whole set is 125 KiB. Membership, ``add`` and
``discard`` are O(1); the population count is kept up to date so ``count`` and
``complete`` are O(1); iteration skips whole zero (or, for :meth:`missing`, whole
0xFF) bytes.

The bytes live in a ``librt.vecs`` ``vec[u8]`` rather than a bytearray: the
same buffer (it exports the buffer protocol, so the regex scans and
``bytes()`` work unchanged), but the compiled simulator (``swarm simulate
--native``) reads and writes its elements as machine bytes, where a
bytearray element goes through a boxed int on every HAVE.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from librt.vecs import vec
from mypy_extensions import u8

__all__ = ["Bitfield"]

# For each byte value, the bit positions (0 = high bit) that are set.
_SET_BITS: tuple[tuple[int, ...], ...] = tuple(
    tuple(bit for bit in range(8) if value & (0x80 >> bit)) for value in range(256)
)

_NONZERO = re.compile(rb"[^\x00]")
_NOT_FULL = re.compile(rb"[^\xff]")


class Bitfield:
    """A set of piece indices in ``range(size)`` backed by a byte vector."""

    __slots__ = ("_bits", "_count", "_size")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"bitfield size must be >= 0, got {size}")
        self._size = size
        self._bits = vec[u8](bytes((size + 7) // 8))
        self._count = 0

    # -- construction -------------------------------------------------------

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, size: int) -> Bitfield:
        """Parse a wire bitfield of ``size`` pieces.

        Raises ValueError if ``data`` is not exactly ``ceil(size / 8)`` bytes or
        any spare bit past ``size`` is set.
        """
        bitfield = cls(size)
        expected = len(bitfield._bits)
        if len(data) != expected:
            raise ValueError(
                f"bitfield for {size} pieces must be {expected} bytes, got {len(data)}"
            )
        spare = expected * 8 - size
        if spare and data[-1] & ((1 << spare) - 1):
            raise ValueError(f"bitfield for {size} pieces has spare bits set in its last byte")
        bitfield._bits = vec[u8](bytes(data))
        bitfield._count = int.from_bytes(bytes(data), "big").bit_count()
        return bitfield

    @classmethod
    def from_indices(cls, indices: Iterable[int], size: int) -> Bitfield:
        """A bitfield of ``size`` pieces holding ``indices`` (ValueError if one is out of range)."""
        bitfield = cls(size)
        for index in indices:
            bitfield.add(index)
        return bitfield

    @classmethod
    def full(cls, size: int) -> Bitfield:
        """A bitfield with every one of ``size`` pieces set (a seed's)."""
        bitfield = cls(size)
        nbytes = len(bitfield._bits)
        if nbytes:
            spare = nbytes * 8 - size
            bitfield._bits = vec[u8](b"\xff" * (nbytes - 1) + bytes([(0xFF << spare) & 0xFF]))
        bitfield._count = size
        return bitfield

    def to_bytes(self) -> bytes:
        """The wire form: ``ceil(size / 8)`` bytes, spare bits zero."""
        return bytes(self._bits)

    def copy(self) -> Bitfield:
        other = Bitfield(0)
        other._size = self._size
        other._bits = vec[u8](self._bits)
        other._count = self._count
        return other

    # -- set operations -----------------------------------------------------

    def _check(self, index: int) -> None:
        if not 0 <= index < self._size:
            raise ValueError(f"piece {index} is out of range for a bitfield of {self._size}")

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or not 0 <= index < self._size:
            return False
        return bool(self._bits[index >> 3] & u8(0x80 >> (index & 7)))

    def add(self, index: int) -> bool:
        """Set ``index``; return True if it was not set before."""
        if not 0 <= index < self._size:  # _check, inlined: this runs on every HAVE
            self._check(index)
        byte_index = index >> 3
        mask = u8(0x80 >> (index & 7))
        bits = self._bits
        byte = bits[byte_index]
        if byte & mask:
            return False
        bits[byte_index] = byte | mask
        self._count += 1
        return True

    def discard(self, index: int) -> bool:
        """Clear ``index``; return True if it was set before."""
        self._check(index)
        mask = u8(0x80 >> (index & 7))
        byte = self._bits[index >> 3]
        if not byte & mask:
            return False
        self._bits[index >> 3] = byte ^ mask
        self._count -= 1
        return True

    def count(self) -> int:
        """How many pieces are set."""
        return self._count

    def __len__(self) -> int:
        """The number of pieces the bitfield covers (not how many are set)."""
        return self._size

    @property
    def size(self) -> int:
        return self._size

    def all(self) -> bool:
        """True if every piece is set (an empty bitfield is complete)."""
        return self._count == self._size

    @property
    def complete(self) -> bool:
        return self._count == self._size

    def __iter__(self) -> Iterator[int]:
        """Set piece indices in ascending order."""
        if not self._count:
            return  # (an empty vector has no buffer to scan)
        table = _SET_BITS
        # The regex engine skips runs of zero bytes at C speed, which matters
        # for the sparse bitfields of peers that have just joined.
        for match in _NONZERO.finditer(self._bits):
            byte_index = match.start()
            base = byte_index << 3
            for bit in table[int(self._bits[byte_index])]:
                yield base + bit

    def missing(self) -> Iterator[int]:
        """Piece indices that are not set, in ascending order."""
        size = self._size
        if self._count == size:
            return  # nothing missing (and an empty vector has no buffer to scan)
        table = _SET_BITS
        for match in _NOT_FULL.finditer(self._bits):
            byte_index = match.start()
            base = byte_index << 3
            for bit in table[int(self._bits[byte_index]) ^ 0xFF]:
                index = base + bit
                if index >= size:
                    return
                yield index

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bitfield):
            return NotImplemented
        return self._size == other._size and self._bits == other._bits

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Bitfield(size={self._size}, count={self._count})"
