"""Snapshot files written by an attacker (checksums recomputed: CRC32 is no signature): no host
path, FIFO, symlink, size or count from them reaches the host."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import snap_guests as g
from supermachine import _core
from supermachine.errors import SnapshotError, VmError
from supermachine.snapshots import metadata, verify
from supermachine.snapshots.metadata import FileIdentity, ImageIdentity
from supermachine.vm import Vm
from test_snapshot import DATA, _blk_read_request, _used_idx, counter, wait_until

SECTION_MACHINE = "machine"
SECTION_MEMORY = "memory"
BOUND = 20.0  # seconds a refusal may take at most: a hang fails the test instead of blocking it

# -- vmstate.bin surgery: the body (postcard: varint integers, length-prefixed strings and lists)
# starts with the machine and the memory record; they are taken apart, edited, and put back with
# the rest with a fresh length and CRC ---------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _read_varint(s: bytes, at: int) -> tuple[int, int]:
    n, shift = 0, 0
    while s[at] & 0x80:
        n |= (s[at] & 0x7F) << shift
        shift, at = shift + 7, at + 1
    return n | s[at] << shift, at + 1


def _string(s: bytes) -> bytes:
    return _varint(len(s)) + s


def _skip_string(s: bytes, at: int) -> int:
    n, at = _read_varint(s, at)
    return at + n


def _machine_end(body: bytes) -> int:
    at = _read_varint(body, 0)[1] + 2  # memory size, vCPUs, template
    at = _read_varint(body, _skip_string(body, at))[1]  # command line, console capacity
    return _skip_string(body, _skip_string(body, at) + 2)  # disks, vsock, net, shares


ID_LEN = 32
"""Bytes of a memory identity (BLAKE3)."""


def _memory_end(body: bytes, at: int) -> int:
    at += ID_LEN  # identity
    if body[at] == 1:  # base: path, identity, memory.bin length and mtime
        at = _read_varint(body, _read_varint(body, _skip_string(body, at + 1) + ID_LEN)[1])[1]
    else:
        at += 1
    return _skip_string(body, at + 1) if body[at] == 1 else at + 1  # page bitmap


def _split(data: bytes) -> dict[str, bytes]:
    body = data[24:-4]
    m = _machine_end(body)
    e = _memory_end(body, m)
    return {SECTION_MACHINE: body[:m], SECTION_MEMORY: body[m:e], "rest": body[e:]}


def _assemble(parts: dict[str, bytes], version: int = 6) -> bytes:
    body = parts[SECTION_MACHINE] + parts[SECTION_MEMORY] + parts["rest"]
    out = b"SMVMSNAP" + struct.pack("<IIQ", version, 0, 24 + len(body) + 4) + body
    return out + struct.pack("<I", zlib.crc32(out))


def _edit(state: Path, section: str, edit: Any) -> None:
    parts = _split(state.read_bytes())
    parts[section] = edit(parts[section])
    state.write_bytes(_assemble(parts))


def _machine(
    memory_size: int,
    vcpus: int,
    cmdline: bytes,
    console: int,
    disks: list[bool],
    vsock: bool,
    net: bool = False,
    shares: tuple[bool, ...] = (),
) -> bytes:
    return (
        _varint(memory_size)
        + bytes([vcpus, 0])
        + _string(cmdline)
        + _varint(console)
        + _string(bytes(disks))
        + bytes([vsock, net])
        + _string(bytes(shares))
    )


def _parse_machine(s: bytes) -> dict[str, Any]:
    memory_size, at = _read_varint(s, 0)
    vcpus = s[at]
    n, at = _read_varint(s, at + 2)
    cmdline = s[at : at + n]
    console, at = _read_varint(s, at + n)
    n, at = _read_varint(s, at)
    return {
        "memory_size": memory_size,
        "vcpus": vcpus,
        "cmdline": cmdline,
        "console": console,
        "disks": [bool(b) for b in s[at : at + n]],
        "vsock": bool(s[at + n]),
        "net": bool(s[at + n + 1]),
        "shares": [bool(b) for b in s[at + n + 3 : at + n + 3 + s[at + n + 2]]],
    }


def _machine_with(**changes: Any) -> Any:
    """An edit of the machine section: its fields as they are, but for ``changes``."""

    def edit(s: bytes) -> bytes:
        m = {**_parse_machine(s), **changes}
        fields = ("memory_size", "vcpus", "cmdline", "console", "disks", "vsock", "net")
        return _machine(*(m[f] for f in fields), shares=tuple(m["shares"]))

    return edit


def _with_base_path(path: bytes) -> Any:
    def edit(s: bytes) -> bytes:
        assert s[ID_LEN] == 1, "a diff"
        return s[: ID_LEN + 1] + _string(path) + s[_skip_string(s, ID_LEN + 1) :]

    return edit


def _restore_error(directory: Path, overrides: dict[str, Any] | None = None) -> str:
    with pytest.raises((ValueError, OSError)) as e:
        _core.Vm.restore(str(directory), overrides)
    message = str(e.value)
    assert "\n" not in message
    return message


# -- 1. no host path from vmstate.bin ----------------------------------------------------------------


def test_the_state_names_no_disk_path_and_a_saved_writable_flag_is_ignored(vms: Any, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"".join(bytes([ord("a") + i]) * 512 for i in range(8)))
    vm = vms.start(g.VIRTIO_ONE_QUEUE, disks=[{"path": str(disk), "read_only": True}])
    vm.write_memory(g.PARAMS + 0x10, struct.pack("<IIQQQ", 8, 0, 0x400000, 0x401000, 0x402000))
    vm.write_memory(g.PARAMS, struct.pack("<Q", 1))
    wait_until(lambda: vm.read_memory(g.PARAMS + 0x100, 1) == b"\x01", what="the driver set-up")
    snap = tmp_path / "snap"
    vm.snapshot(str(snap))
    vm.stop()
    assert _core.snapshot_info(str(snap))["disks"] == [True]

    # The state has no field for a path (a restore attaches only what its caller names); the
    # attacker marks the saved disk writable, in a state file with a valid checksum.
    state = snap / "vmstate.bin"

    _edit(state, SECTION_MACHINE, _machine_with(disks=[False]))
    assert "the snapshot has 1 disks but 0 disk paths were given" in _restore_error(snap)

    # With the caller's disk the guest reads the caller's disk, read-only as the caller asked.
    clone = vms.restore(snap, disks=[{"path": str(disk), "read_only": True}])
    assert [d.path for d in clone.devices] == [disk]
    assert clone.devices[0].read_only is True
    _blk_read_request(clone, 5, 0)
    clone.write_memory(g.PARAMS + 0x80, struct.pack("<I", 1))
    wait_until(lambda: _used_idx(clone) == 1, what="the request after the restore")
    assert clone.read_memory(DATA, 512) == b"f" * 512
    clone.stop()
    assert disk.read_bytes()[5 * 512 : 6 * 512] == b"f" * 512


def test_a_saved_read_only_flag_cannot_make_a_callers_disk_writable(vms: Any, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    vm = vms.start(g.COUNTER, disks=[{"path": str(disk), "read_only": False}])
    vm.snapshot(str(tmp_path / "snap"))
    vm.stop()
    clone = vms.restore(tmp_path / "snap", disks=[{"path": str(disk), "read_only": True}])
    assert clone.devices[0].read_only is True


# -- 2. diff bases confined to the store -------------------------------------------------------------


@pytest.fixture
def diff(vms: Any, tmp_path: Path) -> Path:
    """store/base (full) and store/diff (a diff against it)."""
    vm = vms.start(g.COUNTER, memory_mib=16)
    wait_until(lambda: counter(vm) > 100, what="the guest to count")
    store = tmp_path / "store"
    vm.snapshot(str(store / "base"))
    vm.resume()
    vm.snapshot(str(store / "diff"), str(store / "base"))
    vm.stop()
    return store / "diff"


@pytest.mark.parametrize(
    ("recorded", "rule"),
    [
        ("ABSOLUTE", "is absolute; a recorded base must be a sibling directory `../NAME`"),
        ("../../store/base", "is not a single name beside the diff; a recorded base must be a sibling"),
        ("base", "is not a single name beside the diff"),
        ("a/b", "is not a single name beside the diff"),
    ],
)
def test_a_recorded_base_outside_the_store_is_refused(diff: Path, recorded: str, rule: str) -> None:
    path = str(diff.parent / "base") if recorded == "ABSOLUTE" else recorded
    _edit(diff / "vmstate.bin", SECTION_MEMORY, _with_base_path(path.encode()))
    assert rule in _restore_error(diff)
    # The caller may still name the base (its own input).
    _core.Vm.restore(str(diff), {"base": str(diff.parent / "base")}).stop()


@pytest.mark.parametrize("recorded", ["ABSOLUTE", "../../store/base", "base", "a/b", "../", "../.."])
def test_the_ram_check_follows_only_a_sibling_base(
    diff: Path, recorded: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python checks the chain's memory against vmstate.bin before the VMM maps it, by the same rule.
    monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(tmp_path / "cache"))
    path = str(diff.parent / "base") if recorded == "ABSOLUTE" else recorded
    _edit(diff / "vmstate.bin", SECTION_MEMORY, _with_base_path(path.encode()))
    with pytest.raises(SnapshotError) as e:
        verify.check_ram(diff)
    assert str(e.value) == (
        f"{diff}: the VM state names the base {path!r}, not '../NAME'; a diff's base must be a sibling "
        "snapshot in the same store, named by one directory name (pass base= to name another)"
    )
    verify.check_ram(diff, None, diff.parent / "base")  # the caller may still name the base


def test_the_ram_check_refuses_a_base_behind_a_symlink(
    diff: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(tmp_path / "cache"))
    (diff.parent / "base").rename(tmp_path / "elsewhere")
    (diff.parent / "base").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SnapshotError, match="the base 'base' is a symlink; a diff's base must be a sibling"):
        verify.check_ram(diff)


def test_a_base_reached_through_a_symlink_is_refused(diff: Path, tmp_path: Path) -> None:
    (diff.parent / "base").rename(tmp_path / "elsewhere")
    (diff.parent / "base").symlink_to(tmp_path / "elsewhere")
    assert "is a symbolic link; a recorded base must be a real directory" in _restore_error(diff)


@pytest.mark.parametrize("name", ["memory.bin", "vmstate.bin"])
def test_a_base_file_that_is_a_symlink_is_refused(diff: Path, tmp_path: Path, name: str) -> None:
    real = tmp_path / f"real-{name}"
    (diff.parent / "base" / name).rename(real)
    (diff.parent / "base" / name).symlink_to(real)
    assert "it is a symbolic link, and snapshot files must not be" in _restore_error(diff)


# -- 3. FIFOs, sizes, capacities ---------------------------------------------------------------------


def _restore_in_child(directory: Path) -> str:
    """Restores in a child process, bounded: what it printed (the error), or a failure if it hung."""
    code = (
        "import sys\nfrom supermachine import _core\n"
        "try:\n    _core.Vm.restore(sys.argv[1]).stop()\n    print('restored')\n"
        "except Exception as e:\n    print(e)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(directory)], capture_output=True, timeout=BOUND, text=True
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the restore of {directory} hung (still running after {BOUND:g} s)")
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done
    return lines[0]


@pytest.mark.parametrize("name", ["vmstate.bin", "memory.bin"])
def test_a_fifo_in_place_of_a_snapshot_file_fails_promptly(diff: Path, name: str) -> None:
    full = diff.parent / "base"
    (full / name).unlink()
    os.mkfifo(full / name)
    assert "it is a FIFO, not a regular file" in _restore_in_child(full)


def test_a_fifo_in_place_of_the_base_memory_fails_promptly(diff: Path) -> None:
    base_memory = diff.parent / "base" / "memory.bin"
    base_memory.unlink()
    os.mkfifo(base_memory)
    assert "it is a FIFO, not a regular file" in _restore_in_child(diff)


def test_an_oversize_state_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    with open(snap / "vmstate.bin", "wb") as f:
        f.truncate(1 << 40)  # sparse: reading it would take a terabyte of memory
    code = (
        "import sys\nfrom supermachine import _core\n"
        "try:\n    _core.snapshot_info(sys.argv[1])\nexcept Exception as e:\n    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(snap)], capture_output=True, timeout=BOUND, text=True
    )
    assert done.stdout.strip() == (
        f"snapshot {snap / 'vmstate.bin'} is {1 << 40} bytes, "
        f"more than the {16 << 20} bytes a VM state can have"
    )


def test_a_huge_console_capacity_is_capped(vms: Any, tmp_path: Path) -> None:
    vm = vms.start(g.COUNTER)
    vm.snapshot(str(tmp_path / "snap"))
    vm.stop()

    _edit(tmp_path / "snap" / "vmstate.bin", SECTION_MACHINE, _machine_with(console=1 << 62))
    clone = vms.restore(tmp_path / "snap")
    assert clone.console_capacity == 64 << 20


def test_a_vcpu_count_that_disagrees_with_the_state_is_refused(vms: Any, tmp_path: Path) -> None:
    vm = vms.start(g.COUNTER)
    vm.snapshot(str(tmp_path / "snap"))
    vm.stop()

    _edit(tmp_path / "snap" / "vmstate.bin", SECTION_MACHINE, _machine_with(vcpus=4))
    assert "it names 4 vCPUs but holds the state of 1" in _restore_error(tmp_path / "snap")


def test_shared_folders_the_state_invents_are_refused(vms: Any, tmp_path: Path) -> None:
    """A state claiming a shared folder its devices do not hold is corrupt; one claiming
    thousands is refused while it is decoded."""
    vm = vms.start(g.COUNTER)
    vm.snapshot(str(tmp_path / "snap"))
    vm.stop()
    state = tmp_path / "snap" / "vmstate.bin"
    assert _parse_machine(_split(state.read_bytes())[SECTION_MACHINE])["shares"] == []

    original = state.read_bytes()
    _edit(state, SECTION_MACHINE, _machine_with(shares=(True,)))
    assert "it names 1 virtio devices but holds the state of 0" in _restore_error(tmp_path / "snap")
    state.write_bytes(original)
    _edit(state, SECTION_MACHINE, _machine_with(shares=(False,) * 4000))
    assert "is corrupt: 4000 shared folders (at most 19)" in _restore_error(tmp_path / "snap")


# -- metadata.json: Vm.restore checks it against the state and opens none of its paths ---------------


def _describe(directory: Path, **changes: Any) -> None:
    missing = FileIdentity("/nonexistent/vmlinux", "sha256:" + "0" * 64)
    meta = metadata.SnapshotMetadata(
        image=ImageIdentity("rootfs:none", "none"),
        memory_mib=16,
        vcpus=1,
        kernel=missing,
        agent=missing,
    )
    metadata.save(directory, replace(meta, **changes))


@pytest.mark.parametrize("base", ["/abs/golden", "../../x", "other"])
def test_a_base_written_into_the_metadata_is_not_followed(
    kvm: None, diff: Path, base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # metadata.json records no base: one an attacker adds is never read. The restore takes the
    # sibling its vmstate.bin records, and checks that one's memory.
    monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(tmp_path / "cache"))
    _describe(diff)
    meta_file = diff / metadata.METADATA_FILE
    data = json.loads(meta_file.read_text())
    data.update(base=base, base_blake3="blake3:" + "0" * 64)
    meta_file.write_text(json.dumps(data))
    # Past the metadata and the RAM checks, the VMM refuses only the vsock this VM never had.
    with pytest.raises(VmError, match="the snapshot has no vsock device"):
        Vm.restore(diff, boot_timeout=1)
    ram = diff.parent / "base" / "memory.bin"
    at = next(i for i, b in enumerate(ram.read_bytes()) if b)  # a byte of a stored page
    with open(ram, "r+b") as f:
        f.seek(at)
        f.write(b"\0")
    with pytest.raises(SnapshotError, match="content does not match the memory identity"):
        Vm.restore(diff, boot_timeout=1)


def test_metadata_vcpus_must_match_the_state(kvm: None, diff: Path) -> None:
    full = diff.parent / "base"
    _describe(full, vcpus=2)
    with pytest.raises(SnapshotError, match="metadata says 2 vCPUs, the VM state 1"):
        Vm.restore(full, boot_timeout=1)


def test_extra_disks_must_be_given_by_the_caller(vms: Any, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    vm = vms.start(g.COUNTER, disks=[str(disk)])
    vm.snapshot(str(tmp_path / "snap"))
    vm.stop()
    _describe(tmp_path / "snap")
    missing = r"has 1 disks, but 0 were given \(disks= and volumes=\): pass the snapshot's extra disks"
    with pytest.raises(SnapshotError, match=missing):
        Vm.restore(tmp_path / "snap", boot_timeout=1)
