"""Exception hierarchy. Every message is one line that names the problem."""

from __future__ import annotations


class SupermachineError(Exception):
    """Base class of every error supermachine raises on purpose."""


class InputError(SupermachineError):
    """An input file or directory is missing, unreadable or malformed."""
