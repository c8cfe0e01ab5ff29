"""Human-readable sizes and ratios for tables, and sizes as users write them."""

from __future__ import annotations

from supermachine.errors import InputError


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


_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, what: str) -> int:
    """``"512M"`` -> bytes (suffixes K, M, G, T are powers of 1024; a trailing ``iB``/``B`` is allowed)."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, suffix = (raw[:-1], raw[-1]) if raw[-1:] in _SIZE_SUFFIXES else (raw, "")
    if not number.isdigit():
        raise InputError(f"{what}={text!r} is not a size (bytes, or a number with K, M, G or T)")
    return int(number) * _SIZE_SUFFIXES[suffix]
