"""Byte sizes as people write them: `4194304`, `4MiB`, `64k`, `1.5GB`.

Binary suffixes (KiB, MiB, GiB, TiB, and the short K, M, G, T, with or without a
trailing B) are powers of 1024; decimal ones (kB, MB, GB, TB) powers of 1000, as
in IEC 80000-13. Case does not matter except that `kB`/`KB` and `KiB` differ only
by the `i`: `4K` and `4KiB` are 4096, `4kB` and `4KB` are 4000.
"""

from __future__ import annotations

import re

__all__ = ["format_size", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "ki": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "ti": 1024**4,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes in `text` (`16MiB`, `4096`, `1.5G`); ValueError naming the accepted forms."""
    match = _SIZE.fullmatch(text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(
            f"not a size: {text!r} (a number of bytes, optionally with a unit: "
            "4096, 64KiB, 16MiB, 2GiB, 1GB)"
        )
    value = float(match.group(1)) * unit
    if value != int(value):
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(value)


def format_size(n: int) -> str:
    """The shortest exact binary form of `n` bytes: 16777216 -> '16MiB', 1000 -> '1000'."""
    for suffix, unit in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)
