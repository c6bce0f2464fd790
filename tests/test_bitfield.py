from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.bitfield import Bitfield


def test_bit_order_is_bittorrent() -> None:
    bf = Bitfield(10)
    bf.add(0)
    bf.add(9)
    assert bf.to_bytes() == bytes([0b1000_0000, 0b0100_0000])


def test_empty_and_full() -> None:
    assert Bitfield(0).to_bytes() == b""
    assert Bitfield(0).all()
    assert Bitfield.full(0).complete
    full = Bitfield.full(11)
    assert full.to_bytes() == b"\xff\xe0"
    assert full.count() == 11
    assert full.complete
    assert list(full.missing()) == []
    assert list(full) == list(range(11))


def test_add_discard_contains_count() -> None:
    bf = Bitfield(20)
    assert bf.add(5) is True
    assert bf.add(5) is False
    assert 5 in bf
    assert 6 not in bf
    assert -1 not in bf
    assert 20 not in bf
    assert "5" not in bf
    assert bf.count() == 1
    assert len(bf) == 20
    assert bf.discard(5) is True
    assert bf.discard(5) is False
    assert bf.count() == 0
    assert not bf.all()


def test_out_of_range_add_raises() -> None:
    bf = Bitfield(8)
    with pytest.raises(ValueError, match="piece 8 is out of range"):
        bf.add(8)
    with pytest.raises(ValueError, match="out of range"):
        bf.discard(-1)
    with pytest.raises(ValueError):
        Bitfield(-1)


def test_from_bytes_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="must be 2 bytes, got 1"):
        Bitfield.from_bytes(b"\x00", 9)
    with pytest.raises(ValueError, match="must be 1 bytes, got 2"):
        Bitfield.from_bytes(b"\x00\x00", 8)


def test_from_bytes_rejects_spare_bits() -> None:
    # 9 pieces: byte 1 may only use its high bit.
    Bitfield.from_bytes(b"\x00\x80", 9)
    with pytest.raises(ValueError, match="spare bits"):
        Bitfield.from_bytes(b"\x00\x40", 9)
    with pytest.raises(ValueError, match="spare bits"):
        Bitfield.from_bytes(b"\x01", 7)


def test_copy_is_independent_and_equal() -> None:
    bf = Bitfield.from_indices([1, 3], 4)
    other = bf.copy()
    assert other == bf
    other.add(0)
    assert other != bf
    assert 0 not in bf
    assert bf != Bitfield.from_indices([1, 3], 5)


@given(
    st.integers(min_value=0, max_value=200).flatmap(
        lambda size: st.tuples(
            st.just(size), st.sets(st.integers(0, max(size - 1, 0)), max_size=size)
        )
    )
)
def test_round_trip_and_iteration(case: tuple[int, set[int]]) -> None:
    size, indices = case
    indices = {i for i in indices if i < size}
    bf = Bitfield.from_indices(indices, size)
    assert list(bf) == sorted(indices)
    assert list(bf.missing()) == sorted(set(range(size)) - indices)
    assert bf.count() == len(indices)
    assert bf.complete == (len(indices) == size)
    parsed = Bitfield.from_bytes(bf.to_bytes(), size)
    assert parsed == bf
    assert parsed.count() == bf.count()


def test_million_pieces_is_fast() -> None:
    size = 1_000_000
    start = time.perf_counter()
    bf = Bitfield(size)
    for index in range(0, size, 3):
        bf.add(index)
    data = bf.to_bytes()
    parsed = Bitfield.from_bytes(data, size)
    assert parsed.count() == len(range(0, size, 3))
    assert sum(1 for _ in parsed.missing()) == size - parsed.count()
    full = Bitfield.full(size)
    assert next(iter(full.missing()), None) is None
    assert time.perf_counter() - start < 5.0
