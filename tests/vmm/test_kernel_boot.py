"""The real guest kernel booted by the VMM through its PVH entry, with a busybox initramfs and a
virtio-blk disk. Slow on hosts that emulate guest kernel code (about 30 s per boot)."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from supermachine import _core

BUSYBOX = Path("/bin/busybox")
APPLETS = ["sh", "echo", "reboot", "mount", "cat", "head"]
CMDLINE = "console=ttyS0 reboot=k panic=-1 loglevel=4"


def _newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """Uncompressed newc cpio: (name, mode, data, rdev major<<8|minor)."""
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], start=1):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(raw), 0)
        out += b"070701" + b"".join(f"{v:08x}".encode() for v in fields) + raw
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def _initramfs(path: Path, init: str) -> Path:
    d = stat.S_IFDIR | 0o755
    entries = [(n, d, b"", 0) for n in ("bin", "dev", "proc", "sys")]
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", (5 << 8) | 1))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes(), 0))
    entries += [(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox", 0) for a in APPLETS]
    entries.append(("init", stat.S_IFREG | 0o755, init.encode(), 0))
    path.write_bytes(_newc(entries))
    return path


@pytest.fixture(scope="module")
def vmlinux(kvm: None) -> Path:
    from supermachine import kernel

    if not BUSYBOX.exists():
        pytest.skip("static busybox (/bin/busybox) is needed for the initramfs")
    try:
        return Path(kernel.kernel_path())
    except Exception as e:  # building needs the kernel source package and minutes
        pytest.skip(f"no guest kernel: {e}")


@pytest.mark.slow
def test_kernel_boots_reads_the_disk_and_resets(vmlinux: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"SUPERMACHINE-DISK".ljust(4096, b"\0"))
    init = (
        "#!/bin/sh\n"
        "mount -t devtmpfs dev /dev\n"
        "mount -t sysfs sys /sys\n"
        'echo "disk: $(head -c 17 /dev/vda) sectors: $(cat /sys/block/vda/size)"\n'
        "echo VMM-BOOT-OK\n"
        "reboot -f\n"
    )
    vm: Any = _core.Vm.start(
        {
            "kernel": str(vmlinux),
            "initramfs": str(_initramfs(tmp_path / "initrd.cpio", init)),
            "cmdline": CMDLINE,
            "memory_mib": 256,
            "disks": [{"path": str(disk), "read_only": True}],
            "console_log": str(tmp_path / "console.log"),
        }
    )
    try:
        assert "virtio_mmio.device=4K@0xd0000000:5" in vm.cmdline
        outcome = vm.wait(180)
        console = vm.console().decode(errors="replace")
        assert outcome is not None, console[-2000:]
        assert "disk: SUPERMACHINE-DISK sectors: 8" in console, console[-2000:]
        assert "VMM-BOOT-OK" in console
        assert outcome.kind == "reset", outcome
    finally:
        vm.stop()


@pytest.mark.slow
def test_kernel_panic_is_reported_as_panic(vmlinux: Path, tmp_path: Path) -> None:
    # /init exits: "Kernel panic - not syncing: Attempted to kill init!", then panic=-1 resets.
    vm: Any = _core.Vm.start(
        {
            "kernel": str(vmlinux),
            "initramfs": str(_initramfs(tmp_path / "initrd.cpio", "#!/bin/sh\necho bye\nexit 3\n")),
            "cmdline": CMDLINE,
            "memory_mib": 256,
        }
    )
    try:
        outcome = vm.wait(180)
        assert outcome is not None, vm.console()[-2000:]
        assert outcome.kind == "panic", outcome
        assert "Attempted to kill init" in outcome.reason
    finally:
        vm.stop()
