"""Boot to a ready guest agent: supermachine's VMM vs QEMU microvm booting the very same guest
kernel and agent initramfs (``sm.root=none``), timed from VMM start to the agent's ready line on
the serial console, one round each (a boot costs tens of seconds on emulating hosts).

On hosts whose KVM emulates guest kernel code (kvm_pvm) both numbers are dominated by the
emulated guest kernel and say little about hardware KVM; the VMM-side share is what differs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import skip_unless_kvm
from supermachine import _core, initramfs, kernel

READY = b"ready on vsock port"
EMULATING = os.path.exists("/sys/module/kvm_pvm")
COMPAT_ARGS = (
    "noxsave clearcpuid=smap,smep,pku,ospke,fsgsbase,rdpid,rdrand,rdseed,popcnt,serialize,pcid,"
    "invpcid,cx16,movbe,bmi1,bmi2,erms,fsrm,la57,waitpkg,movdiri,movdir64b,clflushopt,clwb"
)
CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet sm.root=none"


@pytest.fixture(scope="module")
def guest() -> tuple[Path, Path]:
    skip_unless_kvm()
    return kernel.kernel_path(), initramfs.initramfs_path()


def _note(benchmark: Any) -> None:
    benchmark.extra_info["note"] = (
        "guest-side boot is emulated on this host: not representative of hardware KVM"
        if EMULATING
        else "hardware KVM"
    )


@pytest.mark.benchmark(group="boot to agent ready: same kernel + initramfs")
def test_boot_to_agent_supermachine(benchmark: Any, guest: tuple[Path, Path]) -> None:
    vmlinux, initrd = guest

    def boot() -> float:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            vm = _core.Vm.start(
                {
                    "kernel": str(vmlinux),
                    "initramfs": str(initrd),
                    "cmdline": CMDLINE,
                    "memory_mib": 256,
                    "vsock_path": f"{d}/v.sock",
                }
            )
            try:
                while READY not in vm.console():
                    if vm.outcome is not None:
                        raise RuntimeError(f"guest ended: {vm.outcome}")
                    time.sleep(0.01)
                return time.perf_counter() - start
            finally:
                vm.stop()

    benchmark.pedantic(boot, rounds=1, iterations=1)
    _note(benchmark)


@pytest.mark.benchmark(group="boot to agent ready: same kernel + initramfs")
def test_boot_to_agent_qemu_microvm(benchmark: Any, guest: tuple[Path, Path]) -> None:
    vmlinux, initrd = guest
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    cpu = "host,vendor=GenuineIntel,-arch-capabilities" if EMULATING else "host"
    append = f"{CMDLINE} {COMPAT_ARGS}" if EMULATING else CMDLINE
    cmd = [
        qemu, "-M", "microvm,x-option-roms=off,rtc=off,acpi=off", "-enable-kvm", "-cpu", cpu,
        "-smp", "1", "-m", "256", "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "stdio", "-no-reboot", "-kernel", str(vmlinux), "-initrd", str(initrd),
        "-append", append,
    ]  # fmt: skip

    def boot() -> float:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        seen = b""
        try:
            while READY not in seen:
                chunk = proc.stdout.read1(4096)
                if not chunk:
                    raise RuntimeError(f"qemu ended before the agent was ready: {seen[-500:]!r}")
                seen += chunk
            return time.perf_counter() - start
        finally:
            proc.kill()
            proc.wait()

    benchmark.pedantic(boot, rounds=1, iterations=1)
    _note(benchmark)
