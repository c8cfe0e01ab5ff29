"""Rules for the entries of archives we did not write (image layers, a guest's archives).

Each name says where an entry goes beneath a destination, so it must be relative, free of ``..``
and of NUL bytes (which no file name can hold: the operating system would refuse it with an
exception rather than an answer), and bounded in bytes and in depth. Times are set in nanoseconds
and must fit the system's signed 64-bit count. One set of rules for both readers of such archives
(:mod:`supermachine.oci.rootfs` and :mod:`supermachine.transfer`), each of which words a refusal
in its own error type.
"""

from __future__ import annotations

import enum
import math


class NameProblem(enum.Enum):
    """Why a name was refused; the value completes a sentence about the name."""

    TOO_LONG = "is longer than {limit} bytes"
    ABSOLUTE = "is an absolute path"
    PARENT = "contains '..'"
    NUL = "contains a NUL byte"
    TOO_DEEP = "is more than {limit} levels deep"

    @property
    def is_limit(self) -> bool:
        """A size bound was exceeded (the name itself could be harmless)."""
        return self in (NameProblem.TOO_LONG, NameProblem.TOO_DEEP)


class UnsafeName(ValueError):
    """A name the rule refuses: :attr:`problem`, and the limit it exceeded where there is one."""

    def __init__(self, name: str, problem: NameProblem, limit: int = 0) -> None:
        self.name, self.problem, self.limit = name, problem, limit
        super().__init__(f"{self.shown} {self.reason}")

    @property
    def reason(self) -> str:
        return self.problem.value.format(limit=self.limit)

    @property
    def shown(self) -> str:
        """The name as an error message quotes it: cut short when it is the problem's size."""
        return f"{self.name[:64]!r}..." if self.problem.is_limit else repr(self.name)


MAX_TIME_NS = 2**63 - 1
"""Entry times are set as a signed 64-bit count of nanoseconds (the years 1678 to 2262)."""


def time_ns(seconds: float) -> int | None:
    """``seconds`` (an entry's mtime, any float a header can spell) in nanoseconds, or None when
    no file can have it (not finite, or beyond a signed 64-bit count)."""
    if not math.isfinite(seconds) or abs(seconds) * 1_000_000_000 > MAX_TIME_NS:
        return None
    return int(seconds * 1_000_000_000)


def has_nul(text: str) -> bool:
    return "\0" in text


def name_parts(name: str, *, max_bytes: int, max_depth: int) -> list[str]:
    """The path components of ``name`` (``.`` and empty ones dropped), or :class:`UnsafeName`."""
    if len(name.encode("utf-8", "surrogateescape")) > max_bytes:
        raise UnsafeName(name, NameProblem.TOO_LONG, max_bytes)
    if has_nul(name):
        raise UnsafeName(name, NameProblem.NUL)
    if name.startswith("/"):
        raise UnsafeName(name, NameProblem.ABSOLUTE)
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeName(name, NameProblem.PARENT)
    if len(parts) > max_depth:
        raise UnsafeName(name, NameProblem.TOO_DEEP, max_depth)
    return parts
