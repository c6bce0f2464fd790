"""Sizes and rates as operators write them: ``256MiB``, ``100GB``, ``1TiB``, ``4096``."""

from __future__ import annotations

import re

from core.errors import ConfigError

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "p": 1000**5,
    "pb": 1000**5,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
    "pi": 1024**5,
    "pib": 1024**5,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse a byte count with an optional IEC (``MiB``) or SI (``MB``) suffix.

    >>> parse_size("256MiB"), parse_size("100GB"), parse_size("4096")
    (268435456, 100000000000, 4096)
    """
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size must not be negative: {text}")
        return text
    match = _SIZE.match(text)
    if match is None:
        raise ConfigError(f"not a size: {text!r} (expected e.g. 4096, 16MiB, 100GB, 1TiB)")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ConfigError(
            f"unknown size unit {unit!r} in {text!r} (use B, KB/KiB, MB/MiB, GB/GiB, TB/TiB)"
        )
    value = float(number) * factor if "." in number else int(number) * factor
    if value != int(value):
        raise ConfigError(f"size is not a whole number of bytes: {text!r}")
    return int(value)


def format_size(n: float) -> str:
    """Format a byte count with IEC units, e.g. ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_gbps(text: str | float) -> float:
    """Parse a link rate in Gbit/s (10^9 bits per second) and return bytes per second."""
    try:
        gbps = float(text)
    except ValueError as exc:
        raise ConfigError(f"not a rate in Gbit/s: {text!r}") from exc
    if gbps <= 0:
        raise ConfigError(f"rate must be positive: {text!r} Gbit/s")
    return gbps * 1e9 / 8
