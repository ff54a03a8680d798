"""Parsing of the SIZE and RATE arguments (docs/reference.md): ``65536``, ``64K``, ``64KiB``, ``1M``, ``1G``.

Multiples are binary (K = 1024) as in QEMU; RATE is bytes per second and 0 means unlimited.
"""

from __future__ import annotations

import re

from .errors import UsageError

_MULTIPLIERS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Parse a byte count such as ``64K`` or ``1GiB``.

    Args:
        text: the value as the user wrote it (an int passes through after a range check).
        what: how to name the value in an error message.

    Raises:
        UsageError: the text is not a non-negative size.
    """
    if isinstance(text, bool):
        raise UsageError(f"invalid {what} {text!r}: expected a number of bytes such as 65536, 64K or 1G")
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"invalid {what} {text}: must not be negative")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise UsageError(f"invalid {what} {text!r}: expected a number of bytes such as 65536, 64K or 1G")
    return int(match.group(1)) * _MULTIPLIERS[match.group(2).upper()]


def format_size(n: float) -> str:
    """Render a byte count for people: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
