"""``run -t``: a command on a terminal in the guest, driven from ours as ``docker run -it`` does.

Our terminal goes into raw mode for the command's lifetime, so every key (``^C``, ``^D``, arrows)
reaches the guest's terminal as typed and its line discipline, not ours, acts on it; our window
size is given at the start and again on every ``SIGWINCH``. The terminal is put back as it was
however the command ends.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import threading
import tty
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

from supermachine.errors import AgentError, InputError

if TYPE_CHECKING:
    # Only for annotations: the agent client is heavy, and `run --help` loads this module.
    from supermachine.agent import Process

DEFAULT_SIZE = (24, 80)
_READ = 4096


@dataclass(frozen=True)
class Stdio:
    """How a command's standard streams connect to ours (``-i``, ``-t``)."""

    interactive: bool = False
    """Our stdin goes to the command's until end of file."""
    tty: bool = False
    """The command runs on a terminal in the guest; its output comes as one stream."""

    def check(self) -> None:
        """docker's rule: with ``-i`` our stdin must be a terminal to be one in the guest."""
        if self.tty and self.interactive and not os.isatty(sys.stdin.fileno()):
            raise InputError("the input device is not a TTY; leave out -t (or -i)")


PLAIN = Stdio()
"""No ``-i``, no ``-t``: the command reads nothing and its output comes as two streams."""


def window_size() -> tuple[int, int]:
    """Our terminal's rows and columns (stdout's, else stdin's, else 24x80)."""
    for stream in (sys.stdout, sys.stdin):
        with contextlib.suppress(OSError, ValueError):
            columns, lines = os.get_terminal_size(stream.fileno())
            if lines > 0 and columns > 0:
                return min(lines, 0xFFFF), min(columns, 0xFFFF)
    return DEFAULT_SIZE


def guest_env(config_env: Mapping[str, str]) -> dict[str, str]:
    """``TERM`` for the guest's terminal: ours (``xterm`` without one), unless ``-e`` set it."""
    if "TERM" in config_env:
        return {}
    return {"TERM": os.environ.get("TERM") or "xterm"}


@contextlib.contextmanager
def raw_terminal(process: Process, interactive: bool) -> Iterator[None]:
    """Our terminal in raw mode (when stdin is one and ``interactive``), our keys forwarded to
    ``process``, and window size changes passed on, until the block ends."""
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if interactive and os.isatty(stdin) else None
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    stop = threading.Event()

    def on_resize(_signum: int, _frame: FrameType | None) -> None:
        # Only a byte into a pipe: the forwarding thread sends the resize (a handler that sent
        # it could interrupt this thread inside a send of its own).
        with contextlib.suppress(OSError):
            os.write(wake_write, b"r")

    previous = signal.signal(signal.SIGWINCH, on_resize)
    thread = threading.Thread(
        target=_forward, args=(process, stdin if interactive else None, wake_read, stop), daemon=True
    )
    try:
        if saved is not None:
            tty.setraw(stdin, termios.TCSANOW)
        thread.start()
        yield
    finally:
        stop.set()
        signal.signal(signal.SIGWINCH, previous)
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        with contextlib.suppress(OSError):
            os.write(wake_write, b"s")  # wakes the thread to see `stop`
        thread.join(timeout=5)
        os.close(wake_read)
        os.close(wake_write)


def _forward(process: Process, stdin: int | None, wake: int, stop: threading.Event) -> None:
    """Our keys to the process's stdin (closed at our end of file) and resizes, until ``stop``."""
    with contextlib.suppress(AgentError, OSError, ValueError):
        while not stop.is_set():
            watched = [wake] if stdin is None else [wake, stdin]
            ready, _, _ = select.select(watched, [], [])
            if wake in ready:
                os.read(wake, _READ)
                if not stop.is_set():
                    process.resize(*window_size())
            if stdin is not None and stdin in ready:
                chunk = os.read(stdin, _READ)
                if chunk:
                    process.write_stdin(chunk)
                else:
                    process.close_stdin()
                    stdin = None
