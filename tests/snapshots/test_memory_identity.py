"""A snapshot's memory is verified against the identity its VMM recorded in vmstate.bin
(``_core.hash_snapshot_memory``), once per version of memory.bin and vmstate.bin."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import rawvm_support as raw
from supermachine import _core
from supermachine.errors import SnapshotError
from supermachine.snapshots import verify

MIB = 1 << 20


@pytest.fixture(scope="module")
def snaps(raw_guests: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A full snapshot of a counting raw guest and a diff of the same VM a moment later, siblings."""
    store = tmp_path_factory.mktemp("store")
    identity = store.parent / "identity"
    identity.write_bytes(b"stands in for the kernel and the agent")
    vm = raw.start_counter(raw_guests, 16, vsock_path=str(store.parent / "v.sock"))
    try:
        full = raw.bake_raw(vm, store / "golden", identity, 16).directory
        vm.resume()
        time.sleep(0.05)
        diff = raw.bake_raw(vm, store / "diff", identity, 16, base=store / "golden").directory
    finally:
        vm.stop()
    yield full, diff


def _copy(snap: Path, tmp_path: Path) -> Path:
    """A private copy (siblings kept: a diff's base is copied beside it)."""
    for sibling in snap.parent.iterdir():
        shutil.copytree(sibling, tmp_path / sibling.name)
    return tmp_path / snap.name


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _stored_page(snap: Path) -> int:
    """Offset of a page a diff stores (the counter's page is always rewritten)."""
    data = (snap / "memory.bin").read_bytes()
    for offset in range(0, len(data), 4096):
        if any(data[offset : offset + 4096]):
            return offset
    raise AssertionError("the diff stores no page")


def _settle() -> None:
    time.sleep(2 * verify.STAMP_SETTLE_NS / 1e9)


def test_the_hash_is_the_identity_the_vmm_recorded(snaps: tuple[Path, Path]) -> None:
    for snap in snaps:
        info = _core.snapshot_info(snap)
        assert _core.hash_snapshot_memory(snap) == info["memory_id"]
        fd = os.open(snap / "memory.bin", os.O_RDONLY)
        try:
            assert _core.hash_snapshot_memory(snap, fd) == info["memory_id"]
        finally:
            os.close(fd)
    full, diff = snaps
    assert _core.snapshot_info(diff)["base"] == {
        "path": "../golden",
        "memory_id": _core.snapshot_info(full)["memory_id"],
    }


def test_the_identity_is_256_bits_and_stable(snaps: tuple[Path, Path], tmp_path: Path) -> None:
    full, diff = snaps
    for snap in snaps:
        recorded = _core.snapshot_info(snap)["memory_id"]
        assert len(bytes.fromhex(recorded)) == 32
        # Hashing the same content twice, and a copy of it elsewhere, gives the same identity.
        assert _core.hash_snapshot_memory(snap) == _core.hash_snapshot_memory(snap) == recorded
    copy = _copy(full, tmp_path)
    assert _core.hash_snapshot_memory(copy) == _core.snapshot_info(full)["memory_id"]
    # A full snapshot's identity and a diff's are of different kinds: never equal.
    assert _core.snapshot_info(full)["memory_id"] != _core.snapshot_info(diff)["memory_id"]


V3_STATE = Path(__file__).resolve().parents[2] / "rust/fuzz/corpus/vmstate/v3-real-counter-2vcpus-full.bin"
"""A vmstate.bin of format version 3 (a 128-bit xxh3 memory identity), from a real guest."""


def test_a_state_file_of_the_older_format_is_one_line_saying_take_it_again(
    snaps: tuple[Path, Path], tmp_path: Path
) -> None:
    from supermachine.snapshots import golden
    from supermachine.vm import Vm

    old = _copy(snaps[0], tmp_path)
    shutil.copyfile(V3_STATE, old / "vmstate.bin")
    expected = (
        f"snapshot {old / 'vmstate.bin'} has format version 3, but this build reads only version 6"
        " (it was made by another version of supermachine): take the snapshot again"
    )
    for attempt in (
        lambda: verify.check_ram(old),
        lambda: golden.open_snapshot(old),
        lambda: Vm.restore(old, boot_timeout=1),
    ):
        with pytest.raises(SnapshotError) as err:
            attempt()
        assert str(err.value) == expected
    with pytest.raises(ValueError) as raw_err:
        _core.hash_snapshot_memory(old)
    assert str(raw_err.value) == expected
    assert golden.list_snapshots(old.parent)[1] == [expected]


def test_a_flipped_byte_in_a_stored_page_changes_the_identity(
    snaps: tuple[Path, Path], tmp_path: Path
) -> None:
    full, diff = (_copy(s, tmp_path / s.name) for s in snaps)
    for snap in (full, diff):
        recorded = _core.snapshot_info(snap)["memory_id"]
        _flip(snap / "memory.bin", _stored_page(snap) + 17)
        assert _core.hash_snapshot_memory(snap) != recorded
        with pytest.raises(SnapshotError) as err:
            verify.check_memory(snap, recorded)
        assert str(err.value) == (
            f"{snap / 'memory.bin'}: content does not match the memory identity in its vmstate.bin (corrupt?)"
        )


def test_bad_files_and_descriptors_are_one_line_errors(snaps: tuple[Path, Path], tmp_path: Path) -> None:
    full = _copy(snaps[0], tmp_path)
    with pytest.raises(OSError, match="memory_fd 987654: Bad file descriptor"):
        _core.hash_snapshot_memory(full, 987654)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(ValueError, match="is not a regular file"):
            _core.hash_snapshot_memory(full, fd)
    finally:
        os.close(fd)
    os.truncate(full / "memory.bin", 8 * MIB)
    with pytest.raises(ValueError, match=r"has 8388608 bytes, expected 16777216"):
        _core.hash_snapshot_memory(full)
    (full / "vmstate.bin").write_bytes(b"not a state")
    with pytest.raises(ValueError, match=r"vmstate\.bin"):
        _core.hash_snapshot_memory(full)


def test_a_check_is_recorded_and_taken_at_its_word(snaps: tuple[Path, Path], tmp_path: Path) -> None:
    full = _copy(snaps[0], tmp_path)
    recorded = _core.snapshot_info(full)["memory_id"]
    _settle()
    verify.check_memory(full, recorded)
    ram = full / "memory.bin"
    stamp = verify.FileStamp.of(os.stat(ram))
    state = verify.FileStamp.of(os.stat(full / "vmstate.bin"))
    assert verify.recorded_digest(stamp, state) == recorded
    # Beside another version of vmstate.bin, the record vouches for nothing.
    assert verify.recorded_digest(stamp, replace(state, ctime_ns=state.ctime_ns + 1)) is None
    # A record for the files as they are now is believed: no hash, so a planted one passes.
    _flip(ram, _stored_page(full))
    verify.record(verify.FileStamp.of(os.stat(ram)), recorded, ram, state)
    verify.check_memory(full, recorded)


def test_a_replaced_state_file_voids_the_record(snaps: tuple[Path, Path], tmp_path: Path) -> None:
    full = _copy(snaps[0], tmp_path)
    recorded = _core.snapshot_info(full)["memory_id"]
    ram = full / "memory.bin"
    _flip(ram, _stored_page(full))
    state = verify.FileStamp.of(os.stat(full / "vmstate.bin"))
    verify.record(verify.FileStamp.of(os.stat(ram)), recorded, ram, state)
    # vmstate.bin rewritten by rename (a diff's identity depends on the bitmap in it): hash again.
    shutil.copy2(full / "vmstate.bin", full / "state.new")
    os.replace(full / "state.new", full / "vmstate.bin")
    with pytest.raises(SnapshotError, match="does not match the memory identity"):
        verify.check_memory(full, recorded)
