"""End to end: build (or take from the cache) this host's guest kernel and boot it in QEMU microvm.

Guest-side timings on hosts whose KVM emulates guest kernel code (kvm_pvm) say nothing about real
hardware: there the kernel runs roughly a thousand times slower than on a CPU with VMX/SVM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from qemu_boot import busybox_initramfs, qemu_command
from supermachine import kernel

BOOT_TIMEOUT_S = 300
BUSYBOX = Path("/bin/busybox")
MARKER = "SUPERMACHINE-GUEST-INIT-OK"
SQUASHFS_TEXT = "hello from a squashfs disk"

INIT = f"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo {MARKER}
echo "uname-r: $(uname -r)"
echo "root:" $(ls /)
cat /proc/version
if mount -t squashfs -o ro /dev/vda /mnt; then cat /mnt/hello.txt; fi
echo SUPERMACHINE-GUEST-DONE
reboot -f
"""
APPLETS = ("sh", "mount", "ls", "cat", "uname", "echo", "reboot")


def _skip_reason() -> str | None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not accessible"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (Debian package qemu-system-x86)"
    if not BUSYBOX.is_file():
        return f"{BUSYBOX} is missing (Debian package busybox-static)"
    if shutil.which("mksquashfs") is None:
        return "mksquashfs is not installed (Debian package squashfs-tools)"
    return None


@pytest.mark.slow
def test_guest_kernel_boots_busybox_in_qemu(tmp_path: Path) -> None:
    reason = _skip_reason()
    if reason is not None:
        print(f"skipping the QEMU boot test: {reason}")
        pytest.skip(reason)

    profile = kernel.default_profile()
    vmlinux = kernel.kernel_path(profile)

    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs(BUSYBOX, INIT, APPLETS))
    content = tmp_path / "squashfs"
    content.mkdir()
    (content / "hello.txt").write_text(SQUASHFS_TEXT + "\n")
    disk = tmp_path / "disk.squashfs"
    subprocess.run(
        ["mksquashfs", str(content), str(disk), "-comp", "xz", "-noappend", "-quiet", "-no-progress"],
        check=True,
        capture_output=True,
    )

    command = qemu_command(vmlinux, initrd, profile, disk=disk)
    console = tmp_path / "console.log"
    started = time.monotonic()
    with console.open("wb") as out:
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=BOOT_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            text = console.read_text(errors="replace")
            pytest.fail(f"QEMU did not exit within {BOOT_TIMEOUT_S} s; console:\n{text}")
    elapsed = time.monotonic() - started
    text = console.read_text(errors="replace")
    print(f"profile {profile}: QEMU ran {elapsed:.1f} s (guest-side time; emulated on kvm_pvm hosts)")

    assert result.returncode == 0, f"QEMU exited with {result.returncode}; console:\n{text}"
    assert MARKER in text, text
    assert f"uname-r: {_release(vmlinux)}" in text, text
    assert "root: bin dev init mnt proc root sys tmp" in text, text
    assert "Linux version 6.12" in text, text
    assert SQUASHFS_TEXT in text, text
    assert "SUPERMACHINE-GUEST-DONE" in text, text


def _release(vmlinux: Path) -> str:
    """The kernel release the recipe recorded next to vmlinux (``release 6.12.x`` in ``inputs``)."""
    for line in (vmlinux.parent / "inputs").read_text().splitlines():
        if line.startswith("release "):
            return line.split(" ", 1)[1]
    raise AssertionError(f"no release recorded in {vmlinux.parent / 'inputs'}")
