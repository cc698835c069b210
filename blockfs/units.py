"""Human sizes, for examples and the command line."""

from __future__ import annotations

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str | int) -> int:
    """'10G', '512M', '64KiB', '4096' -> bytes (binary units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    raw = str(text).strip()
    s = raw.upper().removesuffix("B").removesuffix("I")
    unit = s[-1:] if s[-1:] in _UNITS else ""
    number = s[: len(s) - len(unit)].strip()
    if not number.isdigit():
        raise ValueError(f"size: expected a number with an optional K/M/G/T/P suffix, got {raw!r}")
    return int(number) * _UNITS[unit]
