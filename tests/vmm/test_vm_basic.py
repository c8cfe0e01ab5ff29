"""Raw test guests on real KVM: console, power-off, memory, MMIO exits, reset, faults, pause."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
import vmm_guests as g
from supermachine import _core, errors
from supermachine.errors import VmError
from supermachine.vm import VmConfig

StartVm = Callable[..., Any]


def test_serial_output_and_power_off_code(start_vm: StartVm) -> None:
    vm = start_vm(g.HELLO)
    outcome = vm.wait(10)
    assert outcome is not None
    assert (outcome.kind, outcome.code, outcome.reason) == ("poweroff", 42, "guest powered off with code 42")
    assert vm.outcome == outcome
    assert vm.console() == b"hello from the guest\n"
    assert vm.cmdline == ""
    assert vm.cpu_template in ("normal", "compat")


@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_every_vcpu_is_in_the_mp_table_and_starts_on_a_sipi(start_vm: StartVm, vcpus: int) -> None:
    """vCPU 0 finds one processor per vCPU in the VMM's MP table and wakes the others with
    INIT and SIPI through its local APIC; each runs the real-mode trampoline and checks in."""
    vm = start_vm(g.SMP, vcpus=vcpus)
    ended = vm.wait(60)
    assert ended is not None, f"not every AP checked in: {vm.read_memory(g.AP_COUNTER, 4)!r}"
    assert (ended.kind, ended.code) == ("poweroff", 0x40 + vcpus)
    assert struct.unpack("<Q", vm.read_memory(g.RESULTS, 8))[0] == vcpus
    assert struct.unpack("<I", vm.read_memory(g.AP_COUNTER, 4))[0] == vcpus - 1


def test_console_log_file(start_vm: StartVm, tmp_path: Any) -> None:
    log = tmp_path / "console.log"
    vm = start_vm(g.HELLO, console_log=str(log))
    assert vm.wait(10).kind == "poweroff"
    assert log.read_bytes() == b"hello from the guest\n"


def test_real_mode_guest(start_vm: StartVm) -> None:
    vm = start_vm(g.REAL_MODE, load_addr=0x7C00, raw_mode="real", raw_load_addr=0x7C00)
    ended = vm.wait(10)
    assert ended is not None
    assert (ended.kind, ended.code, ended.reason) == ("poweroff", 5, "guest powered off with code 5")
    assert vm.console() == b"R\n"


def test_guest_ram_is_shared_both_ways(start_vm: StartVm) -> None:
    vm = start_vm(g.MEMORY)
    deadline = time.monotonic() + 10
    while vm.read_memory(0x200000, 8) != struct.pack("<Q", 0x1122334455667788):
        assert time.monotonic() < deadline, "the guest's write never showed up"
        time.sleep(0.01)
    vm.write_memory(g.PARAMS + 8, struct.pack("<Q", 0xFEEDFACE0BADF00D))
    vm.write_memory(g.PARAMS, struct.pack("<Q", 1))
    assert vm.wait(10).code == 7
    assert vm.read_memory(g.RESULTS, 8) == struct.pack("<Q", 0xFEEDFACE0BADF00D)


def test_memory_access_outside_ram_is_refused(start_vm: StartVm) -> None:
    vm = start_vm(g.CLI_HLT, memory_mib=2)
    assert vm.memory_size == 2 << 20
    assert len(vm.read_memory((2 << 20) - 4, 4)) == 4
    with pytest.raises(ValueError, match="outside guest RAM"):
        vm.read_memory((2 << 20) - 4, 8)
    with pytest.raises(ValueError, match="outside guest RAM"):
        vm.write_memory(0xFFFF_FFFF_FFFF_FFF0, b"x" * 32)
    with pytest.raises(OverflowError):
        vm.read_memory(-1, 1)


def test_unmapped_mmio_does_not_crash_the_vmm(start_vm: StartVm) -> None:
    vm = start_vm(g.MMIO_HOLE)
    assert vm.wait(10).kind == "poweroff"
    assert vm.console() == b"survived\n"
    assert vm.read_memory(g.RESULTS, 4) == b"\xff\xff\xff\xff"
    _pio, mmio = vm.unhandled_exits
    assert mmio >= 3


def test_i8042_reset_is_a_reset(start_vm: StartVm) -> None:
    vm = start_vm(g.I8042_RESET)
    outcome = vm.wait(10)
    assert outcome.kind == "reset"
    assert "i8042" in outcome.reason
    assert vm.console() == b"resetting\n"


def test_triple_fault_ends_the_vm(start_vm: StartVm) -> None:
    vm = start_vm(g.TRIPLE_FAULT)
    outcome = vm.wait(10)
    assert outcome is not None, "a triple-faulting guest must end the VM"
    # Hardware KVM reports KVM_EXIT_SHUTDOWN (a reset); an emulating host may fail the
    # instruction instead (a crash). Both are defined outcomes with a reason.
    assert outcome.kind in ("reset", "crash"), outcome
    assert outcome.reason


def test_halted_guest_keeps_running_until_stopped(start_vm: StartVm) -> None:
    vm = start_vm(g.CLI_HLT)
    assert vm.wait(0.3) is None
    assert vm.outcome is None
    t = time.monotonic()
    vm.stop()
    assert time.monotonic() - t < 2
    ended = vm.outcome
    assert ended is not None
    assert (ended.kind, ended.code, ended.reason) == ("stopped", None, "stopped by the host")
    vm.stop()  # idempotent
    assert vm.wait(0) == vm.outcome


def test_pause_freezes_and_resume_continues(start_vm: StartVm) -> None:
    vm = start_vm(g.COUNTER)

    def counter() -> int:
        return int.from_bytes(vm.read_memory(g.RESULTS, 8), "little")

    deadline = time.monotonic() + 10
    while counter() == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    vm.pause()
    frozen = counter()
    time.sleep(0.3)
    assert counter() == frozen
    vm.pause()  # pausing twice is fine
    vm.resume()
    deadline = time.monotonic() + 10
    while counter() == frozen:
        assert time.monotonic() < deadline, "counter did not advance after resume"
        time.sleep(0.01)
    vm.stop()
    with pytest.raises(RuntimeError, match="ended"):
        vm.pause()
    with pytest.raises(RuntimeError, match="ended"):
        vm.resume()


def test_context_manager_stops(start_vm: StartVm) -> None:
    vm = start_vm(g.CLI_HLT)
    with vm as v:
        assert v is vm
    assert vm.outcome.kind == "stopped"


def test_memory_file_backing(start_vm: StartVm, tmp_path: Any) -> None:
    ram = tmp_path / "guest.ram"
    vm = start_vm(g.MEMORY, memory_file=str(ram), memory_mib=4)
    vm.write_memory(g.PARAMS + 8, b"ABCDEFGH")
    vm.write_memory(g.PARAMS, struct.pack("<Q", 1))
    assert vm.wait(10).code == 7
    assert ram.stat().st_size == 4 << 20
    data = ram.read_bytes()
    assert data[g.RESULTS : g.RESULTS + 8] == b"ABCDEFGH"
    assert data[0x200000:0x200008] == struct.pack("<Q", 0x1122334455667788)


def test_cpu_template_override(start_vm: StartVm) -> None:
    for name in ("normal", "compat"):
        vm = start_vm(g.HELLO, cpu_template=name)
        assert vm.cpu_template == name
        assert vm.wait(10).code == 42


class TestConfigErrors:
    def test_missing_and_conflicting_sources(self, kvm: None) -> None:
        with pytest.raises(ValueError, match="needs 'kernel'"):
            _core.Vm.start({})
        with pytest.raises(ValueError, match="both 'kernel' and 'raw'"):
            _core.Vm.start({"kernel": "/a", "raw": "/b"})
        with pytest.raises(ValueError, match="unknown config key 'memory'"):
            _core.Vm.start({"raw": "/b", "memory": 5})
        with pytest.raises(TypeError, match="'memory_mib' has the wrong type"):
            _core.Vm.start({"raw": "/b", "memory_mib": "lots"})
        with pytest.raises(ValueError, match="cpu_template must be"):
            _core.Vm.start({"raw": "/b", "cpu_template": "fast"})

    def test_missing_files(self, kvm: None, tmp_path: Any) -> None:
        with pytest.raises(FileNotFoundError, match=r"kernel image /x/vmlinux not found"):
            _core.Vm.start({"kernel": "/x/vmlinux"})
        with pytest.raises(FileNotFoundError, match=r"raw image .* not found"):
            _core.Vm.start({"raw": str(tmp_path / "nope.bin")})

    def test_not_elf_and_no_pvh_note(self, kvm: None, guest_dir: Any, tmp_path: Any) -> None:
        junk = tmp_path / "bzImage"
        junk.write_bytes(b"MZ" + b"\0" * 100)
        with pytest.raises(ValueError, match="is not an ELF vmlinux"):
            _core.Vm.start({"kernel": str(junk)})
        elf = g.build(g.HELLO, guest_dir, elf=True)
        with pytest.raises(ValueError, match="has no PVH entry note"):
            _core.Vm.start({"kernel": str(elf)})

    def test_bad_sizes(self, kvm: None, guest_dir: Any) -> None:
        binary = g.build(g.HELLO, guest_dir)
        limit = rf"memory_mib must be between 1 and {_core.MAX_MEMORY_MIB}"
        for memory_mib in (0, _core.MAX_MEMORY_MIB + 1):
            with pytest.raises(errors.VmConfigError, match=limit):
                _core.Vm.start({"raw": str(binary), "memory_mib": memory_mib})
        for vcpus in (0, _core.MAX_VCPUS + 1):
            with pytest.raises(errors.VmConfigError, match=rf"vcpus must be between 1 and {_core.MAX_VCPUS}"):
                _core.Vm.start({"raw": str(binary), "vcpus": vcpus})
        with pytest.raises(ValueError, match="does not fit"):
            _core.Vm.start({"raw": str(binary), "memory_mib": 1})


def test_the_vmm_and_the_python_api_share_one_default_memory_size(kvm: None, guest_dir: Any) -> None:
    """A VM started through ``_core`` with no size, and the public ``VmConfig``, both get the
    VMM's default (they once differed: 128 MiB against 512 MiB)."""
    vm = _core.Vm.start({"raw": str(g.build(g.HELLO, guest_dir))})
    try:
        assert vm.memory_size == VmConfig().memory_mib << 20
    finally:
        vm.stop()
    top = _core.MAX_MEMORY_MIB
    with pytest.raises(VmError, match=rf"memory_mib must be between 64 and {top}, got {top + 1}"):
        VmConfig(memory_mib=top + 1).validated()
