"""``supermachine boot -it ... sh`` in a real terminal (a tmux pane), as a user types at it: the
guest's shell prompts, runs a command, sees our window size and its changes, loses its foreground
job to ^C, and its exit status comes back; our terminal is usable again afterwards."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


class Pane:
    """One tmux session on a private server, 100 columns by 30 rows."""

    def __init__(self, name: str, command: str) -> None:
        self.tmux = ["tmux", "-L", name]
        subprocess.run(
            [
                *self.tmux,
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-s",
                name,
                "-x",
                "100",
                "-y",
                "30",
                command,
            ],
            check=True,
        )
        subprocess.run([*self.tmux, "set-option", "-g", "window-size", "manual"], check=True)
        self.name = name

    def text(self) -> str:
        return subprocess.run(
            [*self.tmux, "capture-pane", "-p", "-J", "-S", "-200", "-t", self.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", self.name, *keys], check=True)

    def wait_for(self, needle: str, timeout: float) -> str:
        """The pane's text once ``needle`` shows up in it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if needle in text:
                return text
            time.sleep(0.5)
        raise AssertionError(f"{needle!r} did not show up within {timeout} s:\n{self.text()}")

    def resize(self, columns: int, rows: int) -> None:
        subprocess.run(
            [*self.tmux, "resize-window", "-t", self.name, "-x", str(columns), "-y", str(rows)], check=True
        )

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)


@pytest.fixture
def pane(kvm: None, rootfs: Path, tmp_path: Path) -> Iterator[Pane]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed; run scripts/setup.sh")
    cli = [sys.executable, "-m", "supermachine", "boot", "--rootfs", str(rootfs), "--memory", "256"]
    command = shlex.join([*cli, "-it", "--", "sh"])
    # After the VM: the exit status, and whether our terminal is back in cooked mode (echo on).
    script = f"{command}; echo EXIT=$?; stty -a | grep -o -- '-\\?icanon' | head -1; sleep 600"
    env = f"cd {shlex.quote(str(tmp_path))} && TERM=xterm PYTHONPATH={shlex.quote(os.pathsep.join(sys.path))}"
    terminal = Pane(f"sm-tty-{os.getpid()}", f"sh -c {shlex.quote(env + ' ' + script)}")
    try:
        yield terminal
    finally:
        terminal.close()


def test_an_interactive_shell_in_a_real_terminal(pane: Pane) -> None:
    pane.wait_for("/ # ", timeout=600)  # busybox sh, as root, in /
    pane.keys("echo $TERM; stty size", "Enter")
    pane.wait_for("30 100", timeout=120)
    assert "xterm" in pane.text()
    pane.resize(120, 40)
    pane.keys("stty size", "Enter")
    pane.wait_for("40 120", timeout=120)
    # ^C interrupts the foreground job: the shell prompts again long before the sleep would end.
    pane.keys("sleep 300", "Enter")
    time.sleep(2)
    pane.keys("C-c")
    pane.keys("echo after-interrupt", "Enter")
    pane.wait_for("\nafter-interrupt\n", timeout=120)  # the output line, not the typed one
    pane.keys("exit 3", "Enter")
    text = pane.wait_for("EXIT=3", timeout=300)
    # Our terminal is back as it was: canonical mode (raw mode would show -icanon).
    pane.wait_for("icanon", timeout=30)
    assert "-icanon" not in pane.text().split("EXIT=3", 1)[1], text
