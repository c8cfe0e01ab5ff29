"""Tiny helpers to boot a guest kernel under QEMU: a newc initramfs writer and the QEMU command line."""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# CPUID features the kernel must not use on hosts that emulate guest kernel code (kvm_pvm): their
# instructions cannot be emulated there. A VMM that sets CPUID itself simply does not advertise them.
COMPAT_CLEARCPUID = (
    "smap,smep,pku,ospke,fsgsbase,rdpid,rdrand,rdseed,popcnt,serialize,pcid,invpcid,cx16,movbe,"
    "bmi1,bmi2,erms,fsrm,la57,waitpkg,movdiri,movdir64b,clflushopt,clwb"
)


@dataclass(frozen=True)
class Entry:
    """One member of a newc archive."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _header(ino: int, entry: Entry, namesize: int) -> bytes:
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,
        0,  # mtime
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        namesize,
        0,  # check
    )
    return b"070701" + b"".join(f"{value:08x}".encode() for value in fields)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def newc_archive(entries: Iterable[Entry]) -> bytes:
    """An uncompressed newc cpio archive (the format the kernel unpacks as initramfs)."""
    out = bytearray()
    for ino, entry in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        out += _header(0 if entry.name == "TRAILER!!!" else ino, entry, len(name))
        out += name
        out += _pad(len(out))
        out += entry.data
        out += _pad(len(out))
    return bytes(out)


def busybox_initramfs(busybox: Path, init_script: str, applets: Iterable[str]) -> bytes:
    """An initramfs with static busybox at /bin/busybox, symlinks for ``applets`` and ``/init``."""
    directory = stat.S_IFDIR | 0o755
    entries = [
        Entry("bin", directory),
        Entry("dev", directory),
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("mnt", directory),
        Entry("proc", directory),
        Entry("sys", directory),
        Entry("tmp", stat.S_IFDIR | 0o1777),
        Entry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()),
    ]
    entries += [Entry(f"bin/{name}", stat.S_IFLNK | 0o777, b"busybox") for name in applets]
    entries.append(Entry("init", stat.S_IFREG | 0o755, init_script.encode()))
    return newc_archive(entries)


def qemu_command(
    kernel: Path,
    initrd: Path,
    profile: str,
    extra_append: str = "",
    disk: Path | None = None,
    memory_mib: int = 256,
) -> list[str]:
    """QEMU microvm booting ``kernel`` through its PVH note; the guest stops QEMU with ``reboot -f``.

    ``reboot=k`` makes the kernel reset through the i8042 controller, which QEMU turns into an exit
    because of ``-no-reboot``.
    """
    append = ["console=ttyS0", "reboot=k", "panic=-1", "loglevel=4"]
    cpu = "host"
    if profile != "normal":  # compat and compat-smp
        append += ["noxsave", f"clearcpuid={COMPAT_CLEARCPUID}"]
        # With an AMD vendor the kernel runs an FPU workaround that cannot be emulated: present an
        # Intel CPU. QEMU then also sets IA32_ARCH_CAPABILITIES, which such hosts refuse.
        cpu = "host,vendor=GenuineIntel,-arch-capabilities"
    if extra_append:
        append.append(extra_append)
    command = [
        "qemu-system-x86_64",
        "-M",
        "microvm,x-option-roms=off,rtc=off,acpi=off,pic=on,pit=on,isa-serial=on",
        "-enable-kvm",
        "-cpu",
        cpu,
        "-smp",
        "1",
        "-m",
        str(memory_mib),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-no-reboot",
        "-device",
        "i8042",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        " ".join(append),
    ]
    if disk is not None:
        command += [
            "-drive",
            f"id=d0,file={disk},format=raw,if=none,readonly=on",
            "-device",
            "virtio-blk-device,drive=d0",
        ]
    return command
