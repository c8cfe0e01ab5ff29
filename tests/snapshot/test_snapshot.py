"""VM snapshots on real KVM with tiny guests: state survives, clones diverge, damage is refused."""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import snap_guests as g
from supermachine import _core


def counter(vm: Any, offset: int = 0) -> int:
    return int(struct.unpack("<Q", vm.read_memory(g.RESULTS + offset, 8))[0])


def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_counter_continues_from_the_saved_value(vms: Any, tmp_path: Path) -> None:
    vm = vms.start(g.COUNTER)
    wait_until(lambda: counter(vm) > 10_000, what="the guest to count")
    report = vm.snapshot(str(tmp_path))
    assert set(report["phases"]) == {"pause", "capture", "memory", "state", "commit"}
    # Paused: the counter stands still and the saved RAM holds exactly that value.
    saved = counter(vm)
    time.sleep(0.05)
    assert counter(vm) == saved
    mem = (tmp_path / "memory.bin").read_bytes()
    assert len(mem) == 16 << 20
    assert struct.unpack_from("<Q", mem, g.RESULTS)[0] == saved
    vm.stop()

    clone = vms.restore(tmp_path)
    first = counter(clone)
    assert first >= saved
    wait_until(lambda: counter(clone) > saved + 10_000, what="the restored guest to count on")
    assert clone.outcome is None
    assert clone.memory_size == 16 << 20
    phases = list(clone.timings.phases)
    # A worker's start-up first spawns the process, sets its limits and greets it.
    owner = ["spawn", "limits", "hello"] if clone.pid is not None else []
    assert phases[: len(owner) + 2] == [*owner, "load_state", "memory"]
    assert "vcpu_state" in phases


def test_the_source_vm_resumes_after_a_snapshot(vms: Any, tmp_path: Path) -> None:
    vm = vms.start(g.COUNTER)
    wait_until(lambda: counter(vm) > 1000, what="the guest to count")
    vm.snapshot(str(tmp_path / "s"))
    saved = counter(vm)
    vm.resume()
    wait_until(lambda: counter(vm) > saved + 1000, what="the resumed guest to count")


def test_two_clones_diverge_and_the_snapshot_stays_unchanged(vms: Any, tmp_path: Path) -> None:
    vm = vms.start(g.CLONE)
    wait_until(lambda: counter(vm) > 1000, what="the guest to start")
    assert vm.console() == b"up\n"
    vm.snapshot(str(tmp_path))
    vm.stop()
    before = {name: digest(tmp_path / name) for name in ("memory.bin", "vmstate.bin")}

    a = vms.restore(tmp_path)
    b = vms.restore(tmp_path)
    a.write_memory(g.PARAMS, struct.pack("<Q", 3))
    b.write_memory(g.PARAMS, struct.pack("<Q", 5))
    ended = a.wait(10)
    assert ended is not None
    assert (ended.kind, ended.code, ended.reason) == ("poweroff", 3, "guest powered off with code 3")
    assert b.wait(10).code == 5
    # Serial output goes on after the restore, each clone with its own.
    assert a.console() == b"clone 3\n"
    assert b.console() == b"clone 5\n"
    assert counter(a, 8) == 0x0303030303030303
    assert counter(b, 8) == 0x0505050505050505
    assert a.read_memory(0x400000, 0x10000) == b"\x03" * 0x10000
    assert b.read_memory(0x400000, 0x10000) == b"\x05" * 0x10000
    after = {name: digest(tmp_path / name) for name in before}
    assert after == before


def test_a_restored_vm_can_be_snapshotted_again(vms: Any, tmp_path: Path) -> None:
    vm = vms.start(g.CLONE)
    wait_until(lambda: counter(vm) > 1000, what="the guest to start")
    vm.snapshot(str(tmp_path / "one"))
    vm.stop()
    mid = vms.restore(tmp_path / "one")
    wait_until(lambda: counter(mid) > 0, what="the restored guest to run")
    # Written by the host into the private copy: must reach the second snapshot.
    mid.write_memory(0x500000, b"second generation")
    mid.snapshot(str(tmp_path / "two"))
    mid.stop()
    last = vms.restore(tmp_path / "two")
    assert last.read_memory(0x500000, 17) == b"second generation"
    last.write_memory(g.PARAMS, struct.pack("<Q", 7))
    assert last.wait(10).code == 7
    assert last.console() == b"clone 7\n"


def test_snapshot_memory_leaves_untouched_ram_as_holes(vms: Any, tmp_path: Path) -> None:
    vm = vms.start(g.COUNTER, memory_mib=256)
    wait_until(lambda: counter(vm) > 1000, what="the guest to count")
    report = vm.snapshot(str(tmp_path))
    assert report["memory_bytes"] < 1 << 20
    mem = tmp_path / "memory.bin"
    assert mem.stat().st_size == 256 << 20
    assert mem.stat().st_blocks * 512 < 8 << 20


DESC, AVAIL, USED, HEADER, DATA, STATUS = 0x400000, 0x401000, 0x402000, 0x410000, 0x411000, 0x412000


def _blk_read_request(vm: Any, sector: int, slot: int) -> None:
    vm.write_memory(HEADER, struct.pack("<IIQ", 0, 0, sector))  # VIRTIO_BLK_T_IN
    vm.write_memory(DESC, struct.pack("<QIHH", HEADER, 16, 1, 1))
    vm.write_memory(DESC + 16, struct.pack("<QIHH", DATA, 512, 1 | 2, 2))
    vm.write_memory(DESC + 32, struct.pack("<QIHH", STATUS, 1, 2, 0))
    vm.write_memory(STATUS, b"\xff")
    vm.write_memory(AVAIL + 4 + 2 * slot, struct.pack("<H", 0))
    vm.write_memory(AVAIL + 2, struct.pack("<H", slot + 1))


def _used_idx(vm: Any) -> int:
    return int(struct.unpack("<H", vm.read_memory(USED + 2, 2))[0])


def test_virtio_blk_keeps_working_after_restore(vms: Any, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"".join(bytes([ord("a") + i]) * 512 for i in range(8)))
    vm = vms.start(g.VIRTIO_ONE_QUEUE, disks=[str(disk)])
    vm.write_memory(g.PARAMS + 0x10, struct.pack("<IIQQQ", 8, 0, DESC, AVAIL, USED))
    vm.write_memory(g.PARAMS, struct.pack("<Q", 1))
    wait_until(lambda: vm.read_memory(g.PARAMS + 0x100, 1) == b"\x01", what="the driver set-up")
    _blk_read_request(vm, 2, 0)
    vm.write_memory(g.PARAMS + 0x80, struct.pack("<I", 1))
    wait_until(lambda: _used_idx(vm) == 1, what="the first request")
    assert vm.read_memory(DATA, 512) == b"c" * 512
    snap = tmp_path / "snap"
    vm.snapshot(str(snap))
    vm.stop()

    moved = tmp_path / "moved.img"
    disk.rename(moved)
    # The state file names no disk: the caller gives every one.
    with pytest.raises(ValueError, match="the snapshot has 1 disks but 0 disk paths were given"):
        _core.Vm.restore(str(snap))
    with pytest.raises(FileNotFoundError):
        _core.Vm.restore(str(snap), {"disks": [str(disk)]})
    clone = vms.restore(snap, disks=[str(moved)])
    assert clone.devices[0].kind == "blk"
    assert clone.device_status(0) == 15
    _blk_read_request(clone, 5, 1)
    clone.write_memory(g.PARAMS + 0x80, struct.pack("<I", 2))
    wait_until(lambda: _used_idx(clone) == 2, what="the request after the restore")
    assert clone.read_memory(DATA, 512) == b"f" * 512
    assert clone.read_memory(STATUS, 1) == b"\x00"
    clone.write_memory(g.PARAMS + 0x80, struct.pack("<I", 0xFFFFFFFF))
    assert clone.wait(10).kind == "poweroff"


@pytest.fixture
def snapshot_dir(vms: Any, tmp_path: Path) -> Path:
    vm = vms.start(g.COUNTER)
    wait_until(lambda: counter(vm) > 100, what="the guest to count")
    vm.snapshot(str(tmp_path / "snap"))
    vm.stop()
    return tmp_path / "snap"


def _restore_error(directory: Path) -> str:
    with pytest.raises(ValueError) as e:
        _core.Vm.restore(str(directory))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_truncated_state_is_refused(snapshot_dir: Path) -> None:
    state = snapshot_dir / "vmstate.bin"
    data = state.read_bytes()
    for cut in (0, 5, 30, len(data) // 2, len(data) - 1):
        state.write_bytes(data[:cut])
        assert _restore_error(snapshot_dir) == f"snapshot {state} is truncated"


def test_bit_flips_in_the_state_are_refused(snapshot_dir: Path) -> None:
    state = snapshot_dir / "vmstate.bin"
    data = state.read_bytes()
    for at in (30, 100, len(data) // 2, len(data) - 2):
        flipped = bytearray(data)
        flipped[at] ^= 0x04
        state.write_bytes(bytes(flipped))
        assert _restore_error(snapshot_dir) == f"snapshot {state} is corrupt: checksum mismatch"


def test_other_format_versions_and_foreign_files_are_refused(snapshot_dir: Path) -> None:
    state = snapshot_dir / "vmstate.bin"
    data = bytearray(state.read_bytes())
    data[8:12] = struct.pack("<I", 99)
    state.write_bytes(bytes(data))
    assert _restore_error(snapshot_dir) == (
        f"snapshot {state} has format version 99, but this build reads only version 6"
        " (it was made by another version of supermachine): take the snapshot again"
    )
    state.write_bytes(b"#!/bin/sh\necho not a snapshot\n")
    assert "not a supermachine VM snapshot" in _restore_error(snapshot_dir)


def test_memory_file_of_the_wrong_size_is_refused(snapshot_dir: Path) -> None:
    with open(snapshot_dir / "memory.bin", "r+b") as f:
        f.truncate(8 << 20)
    assert "has 8388608 bytes, but the VM had 16777216" in _restore_error(snapshot_dir)


def test_missing_snapshot_and_bad_overrides(kvm: None, snapshot_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _core.Vm.restore(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown restore override 'memory_mib'"):
        _core.Vm.restore(str(snapshot_dir), {"memory_mib": 4})
    with pytest.raises(ValueError, match="no vsock device"):
        _core.Vm.restore(str(snapshot_dir), {"vsock_path": str(tmp_path / "v.sock")})


def test_snapshot_of_an_ended_vm_fails_cleanly(vms: Any, tmp_path: Path) -> None:
    vm = vms.start(g.CLONE)
    wait_until(lambda: counter(vm) > 0, what="the guest to start")
    vm.write_memory(g.PARAMS, struct.pack("<Q", 1))
    assert vm.wait(10).kind == "poweroff"
    with pytest.raises(RuntimeError, match="has ended"):
        vm.snapshot(str(tmp_path / "s"))
    assert not (tmp_path / "s" / "vmstate.bin").exists()


def _dirty(bitmap: bytes) -> set[int]:
    return {i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1}


def test_dirty_pages_report_what_the_guest_wrote(vms: Any, tmp_path: Path) -> None:
    vm = vms.start(g.CLONE, track_dirty_pages=True)
    wait_until(lambda: counter(vm) > 1000, what="the guest to start")
    first = vm.dirty_pages()
    assert len(first) == (16 << 20) // 4096 // 8
    assert g.RESULTS // 4096 in _dirty(first)
    vm.write_memory(0x600000, b"host write")  # not the guest's: not logged
    second: set[int] = set()

    def counter_page_dirty_again() -> bool:
        second.update(_dirty(vm.dirty_pages()))
        return g.RESULTS // 4096 in second

    wait_until(counter_page_dirty_again, what="the counter page to be logged again")
    assert 0x600000 // 4096 not in second
    assert len(second) < 8
    # The guest fills 0x400000..0x410000 (16 pages) once the host asks.
    vm.write_memory(g.PARAMS, struct.pack("<Q", 2))
    assert vm.wait(10).code == 2
    assert set(range(0x400, 0x410)) <= _dirty(vm.dirty_pages())


def test_dirty_pages_need_tracking(vms: Any, tmp_path: Path) -> None:
    vm = vms.start(g.COUNTER)
    with pytest.raises(RuntimeError, match="dirty-page tracking is off"):
        vm.dirty_pages()
    vm.snapshot(str(tmp_path))
    vm.stop()
    clone = vms.restore(tmp_path, track_dirty_pages=True)
    wait_until(lambda: g.RESULTS // 4096 in _dirty(clone.dirty_pages()), what="the restored guest's writes")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_restore_maps_memory_without_reading_it(vms: Any, tmp_path: Path) -> None:
    vm = vms.start(g.COUNTER, memory_mib=1024)
    wait_until(lambda: counter(vm) > 100, what="the guest to count")
    data = bytes(range(256)) * ((4 << 20) // 256)
    for i in range(4):
        vm.write_memory((256 + 128 * i) << 20, data)
    vm.snapshot(str(tmp_path))
    vm.stop()
    before = _rss_bytes()
    clones = [vms.restore(tmp_path) for _ in range(2)]
    grown = _rss_bytes() - before
    assert grown < 48 << 20, f"restoring two 1 GiB clones grew RSS by {grown >> 20} MiB"
    for clone in clones:
        wait_until(lambda c=clone: counter(c) > 0, what="the clone to run")
        assert clone.read_memory(640 << 20, len(data)) == data
    clones[0].write_memory(640 << 20, b"mine")
    assert clones[1].read_memory(640 << 20, 4) == data[:4]


def test_a_vsock_socket_is_only_where_the_caller_says(vms: Any, tmp_path: Path) -> None:
    sock = tmp_path / "v.sock"
    vm = vms.start(g.COUNTER, vsock_path=str(sock))
    wait_until(lambda: counter(vm) > 100, what="the guest to count")
    vm.snapshot(str(tmp_path / "snap"))
    # The state file keeps no socket path: a restore binds only where its caller says.
    with pytest.raises(ValueError, match="pass the vsock_path"):
        _core.Vm.restore(str(tmp_path / "snap"))
    clone = vms.restore(tmp_path / "snap", vsock_path=str(tmp_path / "clone.sock"))
    assert clone.vsock_path == str(tmp_path / "clone.sock")
    assert [d.kind for d in clone.devices] == ["vsock"]
    wait_until(lambda: counter(clone) > 100, what="the restored guest to count")


def test_every_vcpu_is_saved_and_restored(vms: Any, tmp_path: Path) -> None:
    # vCPU 0 counts; the others wait for a start-up IPI, and must still be waiting afterwards.
    vm = vms.start(g.COUNTER, vcpus=3)
    wait_until(lambda: counter(vm) > 1000, what="the guest to count")
    vm.snapshot(str(tmp_path))
    saved = counter(vm)
    vm.stop()
    clone = vms.restore(tmp_path)
    wait_until(lambda: counter(clone) > saved + 1000, what="the restored guest to count")
    assert clone.outcome is None
    assert clone.timings.refused_msrs == 0


def test_ram_above_the_mmio_hole_survives(vms: Any, tmp_path: Path) -> None:
    vm = vms.start(g.COUNTER, memory_mib=3328)  # 3 GiB below the hole, 256 MiB above 4 GiB
    wait_until(lambda: counter(vm) > 100, what="the guest to count")
    high = (4 << 30) + (100 << 20)
    vm.write_memory(high, b"above the hole")
    vm.snapshot(str(tmp_path))
    vm.stop()
    mem = tmp_path / "memory.bin"
    with open(mem, "rb") as f:
        f.seek((3 << 30) + (100 << 20))  # the file continues where low RAM ends
        assert f.read(14) == b"above the hole"
    clone = vms.restore(tmp_path)
    assert clone.read_memory(high, 14) == b"above the hole"
    wait_until(lambda: counter(clone) > 100, what="the restored guest to count")
