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


def _online_cpus(vmlinux: Path, vcpus: int) -> str:
    """What the guest lists in /sys/devices/system/cpu/online: every vCPU, unless the kernel was
    built without SMP (the compat profile, for now: see guest/kernel/README.md)."""
    smp = "CONFIG_SMP=y" in (vmlinux.parent / ".config").read_text()
    return f"0-{vcpus - 1}" if smp and vcpus > 1 else "0"


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
def test_kernel_boots_on_two_vcpus_reads_the_last_of_19_disks_and_resets(
    vmlinux: Path, tmp_path: Path
) -> None:
    """The MP table gives the guest both vCPUs (an SMP kernel brings them up) and the I/O APIC,
    whose pins carry interrupts beyond the legacy PIC's 16 lines: the 19th disk is on GSI 23."""
    disks = []
    for n in range(_core.MAX_VIRTIO_DEVICES):
        disk = tmp_path / f"disk{n}.img"
        disk.write_bytes(f"SUPERMACHINE-DISK-{n:02}".encode().ljust(512 * (n + 1), b"\0"))
        disks.append({"path": str(disk), "read_only": True})
    last = "vd" + chr(ord("a") + len(disks) - 1)
    init = (
        "#!/bin/sh\n"
        "mount -t devtmpfs dev /dev\n"
        "mount -t sysfs sys /sys\n"
        "mount -t proc proc /proc\n"
        f'echo "disk: $(head -c 20 /dev/{last}) sectors: $(cat /sys/block/{last}/size)"\n'
        'echo "cpus: $(cat /sys/devices/system/cpu/online)"\n'
        "cat /proc/interrupts\n"
        "echo VMM-BOOT-OK\n"
        "reboot -f\n"
    )
    vm: Any = _core.Vm.start(
        {
            "kernel": str(vmlinux),
            "initramfs": str(_initramfs(tmp_path / "initrd.cpio", init)),
            "cmdline": CMDLINE,
            "memory_mib": 256,
            "vcpus": 2,
            "disks": disks,
            "console_log": str(tmp_path / "console.log"),
        }
    )
    try:
        assert "virtio_mmio.device=4K@0xd0000000:5" in vm.cmdline
        assert f"virtio_mmio.device=4K@{0xD0000000 + 0x1000 * (len(disks) - 1):#x}:23" in vm.cmdline
        outcome = vm.wait(300)
        console = vm.console().decode(errors="replace")
        assert outcome is not None, console[-2000:]
        assert f"disk: SUPERMACHINE-DISK-{len(disks) - 1} sectors: {len(disks)}" in console, console[-2000:]
        assert f"cpus: {_online_cpus(vmlinux, 2)}" in console, console[-3000:]
        routed = [line for line in console.splitlines() if "virtio" in line and "IO-APIC" in line]
        assert len(routed) == len(disks), console[-3000:]
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
