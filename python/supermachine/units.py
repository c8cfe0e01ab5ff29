"""Human-readable sizes and ratios for tables."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``; exact bytes below 1 KiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def percent(part: float, whole: float) -> float:
    """``part / whole`` in percent; 0 for an empty whole."""
    return 100.0 * part / whole if whole else 0.0
