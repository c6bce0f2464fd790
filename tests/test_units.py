from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import ConfigError
from core.units import format_size, parse_gbps, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("4MiB", 4 * 2**20),
        ("256MiB", 256 * 2**20),
        ("1TiB", 2**40),
        ("100GB", 100 * 10**9),
        ("1.5GiB", 3 * 2**29),
        ("16 mib", 16 * 2**20),
        ("2k", 2000),
        ("7B", 7),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "-1", "1.3B", "5 parsecs", "1e9", "0x10"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


@given(st.integers(min_value=0, max_value=2**50))
def test_plain_counts_round_trip(n: int) -> None:
    assert parse_size(str(n)) == n
    assert format_size(n)


def test_gbps_is_decimal_bits() -> None:
    assert parse_gbps("100") == 12.5e9
    with pytest.raises(ConfigError):
        parse_gbps("0")
