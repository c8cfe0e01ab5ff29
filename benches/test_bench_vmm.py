"""VMM cold start: supermachine's `Vm.start` against `qemu-system-x86_64 -M microvm`, both booting
the very same tiny PVH ELF guest (it writes one byte to COM1 and powers off through port 0x501),
and supermachine's VMM-side phases (build, first KVM_RUN, first serial byte).

Host-side figures (VM build, time to the first KVM_RUN) are meaningful on any host. Guest-side
times (anything after the first KVM_RUN) are only meaningful on hardware KVM: on hosts whose KVM
emulates guest kernel code (kvm_pvm) every guest instruction at CPL 0 is emulated."""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import skip_unless_kvm, wait_until_gone, worker_runtime
from interleave import interleave
from supermachine import _core

EMULATING = os.path.exists("/sys/module/kvm_pvm")
NOTE = (
    "guest-side times are NOT representative on this host (kvm_pvm emulates guest kernel code)"
    if EMULATING
    else "hardware KVM: guest-side times are representative"
)

# A PVH ELF: the XEN_ELFNOTE_PHYS32_ENTRY note (type 18) points at 32-bit code.
PVH_GUEST = """
.section .note.Xen, "a", @note
.balign 4
.long 4
.long 4
.long 18
.asciz "Xen"
.long _start
.text
.code32
.globl _start
_start:
    mov $0x3f8, %dx
    mov $'X', %al
    out %al, %dx
    mov $0x501, %dx
    xor %eax, %eax
    out %eax, %dx
1:  hlt
    jmp 1b
"""


@pytest.fixture(scope="module")
def pvh_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    skip_unless_kvm()
    d = tmp_path_factory.mktemp("vmm-bench")
    (d / "g.S").write_text(PVH_GUEST)
    subprocess.run(["as", "--64", "-o", str(d / "g.o"), str(d / "g.S")], check=True)
    elf = d / "guest.elf"
    link = ["ld", "-m", "elf_x86_64", "-nostdlib", "-Ttext=0x100000", "-e", "_start"]
    subprocess.run([*link, "-o", str(elf), str(d / "g.o")], check=True)
    print(f"\nvmm benchmarks: {NOTE}")
    return elf


def test_supermachine_cold_start(benchmark: Any, pvh_elf: Path) -> None:
    """Vm.start to the guest's power-off. Tearing the VM down (closing the KVM VM, which the host
    kernel does synchronously) happens between rounds, untimed; its cost is in extra_info."""
    live: list[Any] = []
    samples: list[dict[str, Any]] = []
    teardown: list[float] = []

    def drop_previous() -> None:
        if live:
            t = time.perf_counter()
            live.pop().stop()
            gc.collect()
            teardown.append(time.perf_counter() - t)

    def boot() -> None:
        vm = _core.Vm.start({"kernel": str(pvh_elf), "memory_mib": 64})
        outcome = vm.wait(30)
        assert outcome is not None and outcome.kind == "poweroff", outcome
        assert vm.console() == b"X"
        t = vm.timings
        samples.append(
            {
                "running": t.running,
                "first_kvm_run": t.first_kvm_run,
                "first_console_byte": t.first_console_byte,
            }
        )
        live.append(vm)

    benchmark.pedantic(boot, setup=drop_previous, rounds=20, warmup_rounds=2)
    drop_previous()
    for key in ("running", "first_kvm_run", "first_console_byte"):
        values = [s[key] for s in samples if s[key] is not None]
        benchmark.extra_info[f"{key}_ms_median"] = round(statistics.median(values) * 1e3, 3)
    benchmark.extra_info["teardown_ms_median"] = round(statistics.median(teardown) * 1e3, 3)
    benchmark.extra_info["note"] = NOTE


def test_cold_start_against_qemu(benchmark: Any, pvh_elf: Path) -> None:
    """The same guest under supermachine and QEMU microvm, interleaved round by round in rotating
    order, each timed over the whole life of the VM: from the call (or the process start) to the
    guest's power-off, then the teardown until the VM (and its process) is gone. Peers:
    supermachine with its VMM in a jailed process of its own (process start included, as for
    QEMU), supermachine's in-process VMM, and ``qemu-system-x86_64 -M microvm`` as one command."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")

    cmd = [
        qemu,
        "-M",
        "microvm,x-option-roms=off,rtc=off,acpi=off,pic=on,pit=on,isa-serial=on",
        "-enable-kvm",
        "-cpu",
        # Emulating hosts refuse IA32_ARCH_CAPABILITIES (MSR 0x10a), which QEMU sets by default.
        "host,-arch-capabilities" if EMULATING else "host",
        "-m",
        "64",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0x501,iosize=4",
        "-kernel",
        str(pvh_elf),
    ]

    def qemu_boot() -> None:
        r = subprocess.run(cmd, capture_output=True, timeout=60)
        # isa-debug-exit exits with (value << 1) | 1.
        assert r.returncode == 1, r.stderr.decode(errors="replace")
        assert r.stdout == b"X"

    def supermachine(worker: bool) -> Any:
        def boot() -> None:
            with worker_runtime(worker) as options:
                vm = _core.Vm.start({"kernel": str(pvh_elf), "memory_mib": 64}, options)
                outcome = vm.wait(30)
                assert outcome is not None and outcome.kind == "poweroff", outcome
                assert vm.console() == b"X"
                pid = vm.pid
                vm.stop()
                del vm
                wait_until_gone(pid)

        return boot

    t = time.monotonic()
    qemu_boot()
    if time.monotonic() - t > 30:
        pytest.skip("QEMU takes over 30 s per start here")
    interleave(
        benchmark,
        "cold start to power-off, then teardown, of the same PVH guest",
        {
            "supermachine (jailed worker)": supermachine(worker=True),
            "supermachine (in-process)": supermachine(worker=False),
            "qemu microvm": qemu_boot,
        },
        rounds=12,
        before=gc.collect,
    )
    benchmark.extra_info["note"] = NOTE
