"""End to end: the agent as PID 1 of the real guest kernel, booted in QEMU microvm.

Boots reach the agent's "ready" line without any vsock device; the protocol is exercised over vsock
only when the host offers vhost-vsock (``/dev/vhost-vsock``), else that part is skipped with the
reason printed. Guest-side times on hosts whose KVM emulates guest kernel code (kvm_pvm) say
nothing about real hardware.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from supermachine import initramfs, kernel
from supermachine.agent import DEFAULT_PORT, AgentClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guest"))
from qemu_boot import qemu_command

BOOT_TIMEOUT_S = 300
READY = "supermachine-agent: 0.1.0 ready on vsock port 1024"
SQUASHFS_TEXT = b"hello from the squashfs root\n"
# 2031-01-01T00:00:00Z, for the sync check: years away from any real clock.
Y2031_NS = 1_924_992_000 * 10**9
# A static busybox to run `date` in a guest whose initramfs holds only the agent.
BUSYBOX = Path("/bin/busybox")
# CPUID features the compat kernel must not use (their instructions cannot be emulated there).


def _skip_reason() -> str | None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not accessible"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (Debian package qemu-system-x86)"
    return None


def _vsock_reason() -> str | None:
    """Why the host cannot give the guest a vsock device (None if it can)."""
    if not os.path.exists("/dev/vhost-vsock"):
        return "/dev/vhost-vsock does not exist (vhost_vsock module not loaded or not available)"
    if not os.access("/dev/vhost-vsock", os.R_OK | os.W_OK):
        return "/dev/vhost-vsock is not accessible"
    if not hasattr(socket, "AF_VSOCK"):
        return "this Python has no AF_VSOCK"
    return None


def _qemu_command(
    vmlinux: Path, initrd: Path, append: list[str], disk: Path | None, cid: int | None
) -> list[str]:
    """The kernel tests' QEMU microvm command line, plus a vhost-vsock device when ``cid`` is given."""
    profile = kernel.default_profile()
    command = qemu_command(vmlinux, initrd, profile, extra_append=" ".join(append), disk=disk)
    if cid is not None:
        command += ["-device", f"vhost-vsock-device,guest-cid={cid}"]
    return command


@contextmanager
def _qemu(command: list[str], console: Path) -> Iterator[subprocess.Popen[bytes]]:
    with console.open("wb") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def _wait_for(console: Path, process: subprocess.Popen[bytes], needle: str) -> str:
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while time.monotonic() < deadline:
        text = console.read_text(errors="replace")
        if needle in text or "supermachine-agent: fatal" in text or process.poll() is not None:
            return text
        time.sleep(0.5)
    pytest.fail(f"no {needle!r} within {BOOT_TIMEOUT_S} s; console:\n{console.read_text(errors='replace')}")


def _connect_vsock(cid: int, timeout: float = 60) -> AgentClient:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.settimeout(30)
        try:
            sock.connect((cid, DEFAULT_PORT))
            client = AgentClient(sock, timeout=30)
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        return client


def _check_sync(agent: AgentClient) -> None:
    """sync as PID 1 sets the guest's wall clock and credits the entropy."""
    entropy = os.urandom(64)
    result = agent.sync(time_ns=Y2031_NS, entropy=entropy)
    assert result.clock_set
    assert result.entropy_added == len(entropy)
    assert Y2031_NS <= result.guest_time_ns < Y2031_NS + 600 * 10**9
    if not BUSYBOX.is_file():
        print(f"skipping `date` in the guest: {BUSYBOX} is missing (Debian package busybox-static)")
        return
    agent.write_file("/tmp/busybox", BUSYBOX.read_bytes(), mode=0o755)
    date = agent.exec(["/tmp/busybox", "date", "+%Y"])
    assert date.stdout == b"2031\n", date


@pytest.mark.slow
@pytest.mark.parametrize("root", ["none", "squashfs"])
def test_agent_boots_as_pid1_in_qemu(tmp_path: Path, root: str) -> None:
    reason = _skip_reason()
    if reason is not None:
        print(f"skipping the QEMU boot test: {reason}")
        pytest.skip(reason)
    if root == "squashfs" and shutil.which("mksquashfs") is None:
        pytest.skip("mksquashfs is not installed (Debian package squashfs-tools)")
    vmlinux = kernel.kernel_path()
    initrd = initramfs.initramfs_path()

    disk = None
    append = ["sm.hostname=agent-test"]
    if root == "none":
        append.append("sm.root=none")
    else:
        content = tmp_path / "rootfs"
        for directory in ("etc", "proc", "sys", "dev", "run", "tmp"):
            (content / directory).mkdir(parents=True)
        (content / "hello.txt").write_bytes(SQUASHFS_TEXT)
        (content / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        disk = tmp_path / "root.squashfs"
        subprocess.run(
            ["mksquashfs", str(content), str(disk), "-noappend", "-quiet", "-no-progress", "-all-root"],
            check=True,
            capture_output=True,
        )

    vsock_reason = _vsock_reason()
    cid = None if vsock_reason else random.randrange(1000, 60000)
    console = tmp_path / "console.log"
    started = time.monotonic()
    with _qemu(_qemu_command(vmlinux, initrd, append, disk, cid), console) as process:
        text = _wait_for(console, process, READY)
        boot = time.monotonic() - started
        assert READY in text, f"agent did not become ready; console:\n{text}"
        ready_line = next(line for line in text.splitlines() if READY in line)
        print(f"{ready_line.strip()} after {boot:.1f} s of QEMU (emulated guest kernel on kvm_pvm hosts)")
        if root == "none":
            assert "root: initramfs" in ready_line
        else:
            assert "root: /dev/vda (squashfs) + tmpfs overlay" in ready_line

        if cid is None:
            print(f"skipping the vsock exec part: {vsock_reason}")
            return
        with _connect_vsock(cid) as agent:
            assert agent.ping() == "0.1.0"
            result = agent.exec(["/init", "--version"])
            assert result.stdout == b"supermachine-agent 0.1.0 (protocol 1)\n"
            assert agent.read_file("/proc/sys/kernel/hostname") == b"agent-test\n"
            agent.write_file("/tmp/x.bin", bytes(range(256)) * 100, mode=0o600)
            assert agent.read_file("/tmp/x.bin") == bytes(range(256)) * 100
            if root == "squashfs":
                assert agent.read_file("/hello.txt") == SQUASHFS_TEXT
                agent.write_file("/hello.txt", b"changed in the overlay\n")
                assert agent.read_file("/hello.txt") == b"changed in the overlay\n"
            _check_sync(agent)
            agent.shutdown()
        assert process.wait(timeout=120) == 0


@pytest.mark.slow
def test_fatal_boot_error_is_one_console_line_and_stops_the_vm(tmp_path: Path) -> None:
    reason = _skip_reason()
    if reason is not None:
        print(f"skipping the QEMU boot test: {reason}")
        pytest.skip(reason)
    vmlinux = kernel.kernel_path()
    initrd = initramfs.initramfs_path()
    console = tmp_path / "console.log"
    # No disk attached: mounting the root must fail, and the VM must end instead of hanging.
    with _qemu(_qemu_command(vmlinux, initrd, ["sm.root=/dev/vdb"], None, None), console) as process:
        try:
            returncode = process.wait(timeout=BOOT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"the VM did not stop after a fatal error; console:\n{console.read_text(errors='replace')}"
            )
    text = console.read_text(errors="replace")
    assert returncode == 0, text
    fatal = [line for line in text.splitlines() if "supermachine-agent: fatal:" in line]
    assert fatal == ["supermachine-agent: fatal: mount squashfs on /mnt/lower: No such file or directory"], (
        text
    )
