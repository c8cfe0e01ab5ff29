"""Processes on a pseudo-terminal (``spawn(..., tty=True)``) with the real agent: the process sees a
terminal of the asked size as its stdin, stdout and stderr and its controlling terminal; a resize
reaches it; ^C typed on it interrupts the foreground job and ^D ends a reader's input; the exit
status comes back. A bad size is refused on both sides."""

from __future__ import annotations

import re
import time

import pytest
from supermachine.agent import AgentClient, Process
from supermachine.errors import AgentError, AgentRequestError


def read_until(process: Process, pattern: bytes, seen: bytearray, timeout: float = 30) -> bytes:
    """Output until ``pattern`` (a regex) shows up in it; everything read so far is in ``seen``."""
    deadline = time.monotonic() + timeout
    for event in process:
        assert event.stream == "stdout", event  # a terminal has one output stream
        seen += event.data
        if re.search(pattern, seen):
            return bytes(seen)
        assert time.monotonic() < deadline, seen
    raise AssertionError(f"the process ended before {pattern!r}: {bytes(seen)!r}")


def test_the_process_runs_on_a_terminal_of_the_asked_size(client: AgentClient) -> None:
    script = "tty; stty size; [ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo all-terminals; echo err >&2; exit 7"
    process = client.spawn(["sh", "-c", script], tty=True, tty_size=(30, 100), timeout=30)
    result = process.wait()
    lines = result.stdout.decode().splitlines()
    assert re.fullmatch(r"/dev/pts/\d+", lines[0]), lines
    assert lines[1:] == ["30 100", "all-terminals", "err"]
    assert (result.status, result.stderr) == (7, b"")


def test_resize_ctrl_c_and_ctrl_d_reach_the_process(client: AgentClient) -> None:
    script = (
        "trap 'echo got-INT' INT; stty size; echo ready; "
        'while read -r line; do [ "$line" = size ] && stty size; [ "$line" = spin ] && '
        "{ sleep 60; echo woke; }; done; echo input-ended; exit 4"
    )
    process = client.spawn(["sh", "-c", script], stdin=True, tty=True, tty_size=(24, 80), timeout=120)
    seen = bytearray()
    read_until(process, rb"24 80\r\nready", seen)
    process.resize(40, 132)
    process.write_stdin(b"size\n")
    read_until(process, rb"40 132", seen)
    # ^C is a byte typed on the terminal: its line discipline interrupts the foreground job (the
    # sleep), the shell's trap runs, and the loop reads on.
    process.write_stdin(b"spin\n")
    time.sleep(1)
    process.write_stdin(b"\x03")
    read_until(process, rb"got-INT", seen)
    # ^D at the start of a line ends the shell's input.
    process.write_stdin(b"\x04")
    result = process.wait()
    assert result.status == 4, bytes(seen) + result.stdout
    assert b"input-ended" in bytes(seen) + result.stdout


def test_bad_terminal_sizes_are_refused(client: AgentClient) -> None:
    with pytest.raises(AgentError, match="rows and columns of 1 to 65535"):
        client.spawn(["true"], tty=True, tty_size=(0, 80))
    process = client.spawn(["sleep", "5"], stdin=True, tty=True, timeout=30)
    with pytest.raises(AgentError, match="rows and columns"):
        process.resize(70000, 10)
    process.signal(9)
    assert process.wait().signal == 9
    # The agent checks the size too (a client that skips the check above).
    from supermachine.agent import EXEC, STARTED, _encode

    with pytest.raises(AgentRequestError, match="terminal size"):
        client._send(EXEC, _encode([(1, [b"true"]), (9, 1), (10, 0), (11, 80)]), None, "exec")
        kind, payload = client._recv_frame(None, "reply")
        assert kind != STARTED
        client._unexpected(kind, payload, "in reply to exec")
