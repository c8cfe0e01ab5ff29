"""virtio-blk over virtio-mmio, driven by a tiny guest driver; requests are placed in guest RAM
by the test (descriptor table and available ring), the guest sets the device up and notifies.
Also: misbehaving drivers are contained."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import vmm_guests as g

StartVm = Callable[..., Any]

DESC, AVAIL, USED = 0x400000, 0x401000, 0x402000
HEADER, DATA, STATUS = 0x410000, 0x411000, 0x412000
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
NEEDS_RESET = 0x40
SECTOR = 512


@dataclass
class Result:
    status: int  # device status register after DRIVER_OK + notify
    isr: int
    magic: int
    used_idx: int
    used: list[tuple[int, int]]


def make_disk(path: Path, sectors: int = 8) -> Path:
    path.write_bytes(b"".join(bytes([ord("A") + i]) * SECTOR for i in range(sectors)))
    return path


def desc(vm: Any, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
    vm.write_memory(DESC + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))


def request_header(vm: Any, kind: int, sector: int, at: int = HEADER) -> None:
    vm.write_memory(at, struct.pack("<IIQ", kind, 0, sector))


def simple_request(vm: Any, kind: int, sector: int, length: int = SECTOR, write_data: bool = True) -> None:
    """Chain 0 -> 1 -> 2: header, data, status (data device-writable for reads)."""
    request_header(vm, kind, sector)
    desc(vm, 0, HEADER, 16, F_NEXT, 1)
    desc(vm, 1, DATA, length, F_NEXT | (0 if kind == T_OUT else F_WRITE), 2)
    desc(vm, 2, STATUS, 1, F_WRITE, 0)
    vm.write_memory(STATUS, b"\xee")


def run_driver(
    vm: Any,
    heads: Sequence[int],
    *,
    queue_size: int = 16,
    features_hi: int = 1,
    bogus_accesses: int = 0,
    avail_idx: int | None = None,
) -> Result:
    ring = struct.pack(f"<HH{len(heads)}H", 0, len(heads) if avail_idx is None else avail_idx, *heads)
    vm.write_memory(AVAIL, ring)
    params = struct.pack(
        "<QIIQQQIII",
        vm.devices[0].mmio_base,
        queue_size,
        0,
        DESC,
        AVAIL,
        USED,
        0,
        features_hi,
        bogus_accesses,
    )
    vm.write_memory(g.PARAMS + 8, params)
    vm.write_memory(g.PARAMS, struct.pack("<Q", 1))
    outcome = vm.wait(10)
    assert outcome is not None and outcome.kind == "poweroff", (outcome, vm.console())
    assert vm.read_memory(g.RESULTS, 8) == struct.pack("<Q", 1)
    status, isr, magic = struct.unpack("<QQQ", vm.read_memory(g.RESULTS + 8, 24))
    used_idx = struct.unpack("<H", vm.read_memory(USED + 2, 2))[0]
    used = [struct.unpack("<II", vm.read_memory(USED + 4 + 8 * i, 8)) for i in range(min(used_idx, 16))]
    return Result(status & 0xFFFFFFFF, isr & 0xFFFFFFFF, magic & 0xFFFFFFFF, used_idx, used)


@pytest.fixture
def blk_vm(start_vm: StartVm, tmp_path: Path) -> Callable[..., Any]:
    def start(read_only: bool = False, sectors: int = 8) -> Any:
        disk = make_disk(tmp_path / "disk.img", sectors)
        vm = start_vm(g.VIRTIO_DRIVER, disks=[{"path": str(disk), "read_only": read_only}])
        assert [(d.kind, d.mmio_base, d.gsi, d.path, d.read_only) for d in vm.devices] == [
            ("blk", 0xD0000000, 5, disk, read_only)
        ]
        return vm

    return start


def test_read_a_sector(blk_vm: Callable[..., Any]) -> None:
    vm = blk_vm()
    simple_request(vm, T_IN, 3)
    r = run_driver(vm, [0])
    assert r.magic == 0x74726976
    assert r.status == 0xF, hex(r.status)
    assert r.isr & 1
    assert r.used == [(0, SECTOR + 1)]
    assert vm.read_memory(STATUS, 1) == bytes([S_OK])
    assert vm.read_memory(DATA, SECTOR) == b"D" * SECTOR
    assert vm.console().endswith(b"virtio done\n")


def test_write_then_the_file_changes(blk_vm: Callable[..., Any], tmp_path: Path) -> None:
    vm = blk_vm()
    vm.write_memory(DATA, b"w" * SECTOR)
    simple_request(vm, T_OUT, 5)
    r = run_driver(vm, [0])
    assert r.used == [(0, 1)]
    assert vm.read_memory(STATUS, 1) == bytes([S_OK])
    data = (tmp_path / "disk.img").read_bytes()
    assert data[5 * SECTOR : 6 * SECTOR] == b"w" * SECTOR
    assert data[4 * SECTOR : 5 * SECTOR] == b"E" * SECTOR


def test_read_only_disk_refuses_writes(blk_vm: Callable[..., Any], tmp_path: Path) -> None:
    vm = blk_vm(read_only=True)
    vm.write_memory(DATA, b"w" * SECTOR)
    simple_request(vm, T_OUT, 0)
    r = run_driver(vm, [0])
    assert vm.read_memory(STATUS, 1) == bytes([S_IOERR])
    assert r.status == 0xF
    assert (tmp_path / "disk.img").read_bytes()[:SECTOR] == b"A" * SECTOR


def test_get_id_flush_and_unsupported(blk_vm: Callable[..., Any]) -> None:
    vm = blk_vm()
    # Three chains: GET_ID (0,1,2), FLUSH (3,4), unknown type 77 (5,6).
    request_header(vm, T_GET_ID, 0)
    desc(vm, 0, HEADER, 16, F_NEXT, 1)
    desc(vm, 1, DATA, 20, F_NEXT | F_WRITE, 2)
    desc(vm, 2, STATUS, 1, F_WRITE)
    request_header(vm, T_FLUSH, 0, HEADER + 0x100)
    desc(vm, 3, HEADER + 0x100, 16, F_NEXT, 4)
    desc(vm, 4, STATUS + 1, 1, F_WRITE)
    request_header(vm, 77, 0, HEADER + 0x200)
    desc(vm, 5, HEADER + 0x200, 16, F_NEXT, 6)
    desc(vm, 6, STATUS + 2, 1, F_WRITE)
    r = run_driver(vm, [0, 3, 5])
    assert r.used_idx == 3
    assert vm.read_memory(DATA, 8) == b"disk.img"
    assert vm.read_memory(STATUS, 3) == bytes([S_OK, S_OK, S_UNSUPP])


def test_bad_buffers_get_an_error_status(blk_vm: Callable[..., Any]) -> None:
    vm = blk_vm()
    # 0: data buffer outside guest RAM; 3: huge length; 6: past the end of the disk;
    # 9: not a whole sector; 12: data buffer readable on a read (wrong direction).
    cases = [
        (0xDEAD0000, SECTOR, F_WRITE, 0),
        (DATA, 0xFFFFF000, F_WRITE, 0),
        (DATA, SECTOR, F_WRITE, 8),
        (DATA, 100, F_WRITE, 0),
        (DATA, SECTOR, 0, 0),
    ]
    heads = []
    for n, (addr, length, flags, sector) in enumerate(cases):
        head = 3 * n
        hdr = HEADER + 0x20 * n
        request_header(vm, T_IN, sector, hdr)
        desc(vm, head, hdr, 16, F_NEXT, head + 1)
        desc(vm, head + 1, addr, length, F_NEXT | flags, head + 2)
        desc(vm, head + 2, STATUS + n, 1, F_WRITE)
        heads.append(head)
    r = run_driver(vm, heads)
    assert r.used_idx == len(cases)
    assert vm.read_memory(STATUS, len(cases)) == bytes([S_IOERR] * len(cases))
    assert r.status == 0xF, "bad buffers are the request's problem, not the device's"


def test_descriptor_loop_marks_the_device_broken(blk_vm: Callable[..., Any]) -> None:
    vm = blk_vm()
    desc(vm, 0, HEADER, 16, F_NEXT, 1)
    desc(vm, 1, DATA, SECTOR, F_NEXT | F_WRITE, 0)
    r = run_driver(vm, [0])
    assert r.status & NEEDS_RESET
    assert r.used == [(0, 0)]
    assert vm.device_status(0) & NEEDS_RESET


@pytest.mark.parametrize(
    ("heads", "kwargs"),
    [
        ([0], {"queue_size": 6}),  # not a power of two
        ([0], {"queue_size": 1024}),  # above the maximum
        ([0], {"avail_idx": 5000}),  # more chains than the queue holds
        ([99], {}),  # head index out of range
    ],
    ids=["queue-size-6", "queue-size-1024", "avail-index-jump", "head-out-of-range"],
)
def test_broken_rings_are_contained(
    blk_vm: Callable[..., Any], heads: list[int], kwargs: dict[str, int]
) -> None:
    vm = blk_vm()
    simple_request(vm, T_IN, 0)
    r = run_driver(vm, heads, **kwargs)
    assert r.status & NEEDS_RESET
    assert vm.read_memory(STATUS, 1) == b"\xee", "no request may be served"


def test_indirect_descriptor_is_refused(blk_vm: Callable[..., Any]) -> None:
    vm = blk_vm()
    desc(vm, 0, 0xFFFF0000, 64, F_INDIRECT)
    r = run_driver(vm, [0])
    assert r.status & NEEDS_RESET


def test_driver_without_version_1_is_refused(blk_vm: Callable[..., Any]) -> None:
    vm = blk_vm()
    simple_request(vm, T_IN, 0)
    r = run_driver(vm, [0], features_hi=0)
    assert r.status == 0x3, "FEATURES_OK must not stick, DRIVER_OK must not activate"
    assert r.used_idx == 0


def test_bogus_register_accesses_are_harmless(blk_vm: Callable[..., Any]) -> None:
    vm = blk_vm()
    simple_request(vm, T_IN, 1)
    r = run_driver(vm, [0], bogus_accesses=3)
    assert r.status == 0xF
    assert vm.read_memory(DATA, 4) == b"BBBB"


def test_missing_disk_is_a_file_not_found(start_vm: StartVm, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"disk image .*nope\.img not found"):
        start_vm(g.CLI_HLT, disks=[str(tmp_path / "nope.img")])
