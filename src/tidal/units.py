"""Sizes and durations as users type them ("512M", "1.5G", "10G") and as Tidal prints them."""

from __future__ import annotations

import re

from tidal.errors import ConfigError

SECTOR_BYTES = 512
"""The block layer's addressing unit: extents are counted in 512-byte sectors."""

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB]?)\s*$")
_MULT = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}


def parse_size(text: str | int) -> int:
    """Parse ``"512M"``, ``"1G"``, ``"4096"`` or ``"1.5GiB"`` into bytes (binary multiples)."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size must not be negative, got {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"cannot parse size {text!r}; use e.g. 4096, 512K, 64M, 1G")
    number, unit = float(m.group(1)), m.group(2).lower()
    return int(number * _MULT[unit])


def format_size(size_bytes: float) -> str:
    """Human-readable size with binary units, e.g. ``1.5 MiB``."""
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_cpus(text: str | float) -> float:
    """Parse a CPU count such as ``"0.5"``, ``2`` or ``"500m"`` (millicores)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        t = text.strip()
        try:
            value = float(t[:-1]) / 1000 if t.endswith("m") else float(t)
        except ValueError:
            raise ConfigError(f"cannot parse CPU count {text!r}; use e.g. 0.5, 2 or 500m") from None
    if value <= 0:
        raise ConfigError(f"CPU count must be positive, got {text!r}")
    return value
