"""memory.bin is checked against the memory identity its VMM recorded in vmstate.bin before a restore
maps it, and a check is recorded (in supermachine's cache, keyed by the exact stamps of memory.bin
and vmstate.bin) so that restores of an unchanged snapshot do not hash it again."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import rawvm_support as raw
from supermachine import _core
from supermachine.errors import SnapshotError, VmError
from supermachine.snapshots import verify
from supermachine.vm import Vm


@pytest.fixture(scope="module")
def store(raw_guests: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Real snapshots of a counting raw guest: ``golden`` (full) and ``diff`` (against it)."""
    store = tmp_path_factory.mktemp("store")
    identity = store.parent / "identity"
    identity.write_bytes(b"stands in for the kernel and the agent")
    vm = raw.start_counter(raw_guests, 16, vsock_path=str(store.parent / "v.sock"))
    try:
        raw.bake_raw(vm, store / "golden", identity, 16)
        vm.resume()
        time.sleep(0.05)
        raw.bake_raw(vm, store / "diff", identity, 16, base=store / "golden")
    finally:
        vm.stop()
    yield store


def _copy(store: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the store, with no verification records for it: ``(golden, diff)``."""
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    return copy / "golden", copy / "diff"


def _flip(path: Path, offset: int | None = None) -> None:
    """Flip one bit in a page the snapshot stores (the first non-zero page, by default)."""
    if offset is None:
        offset = _stored_page(path) + 123
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _stored_page(path: Path) -> int:
    with open(path, "rb") as f:
        offset = 0
        while page := f.read(4096):
            if any(page):
                return offset
            offset += 4096
    raise AssertionError(f"{path} has no non-zero page")


def _check_error(directory: Path) -> str:
    with pytest.raises(SnapshotError) as err:
        verify.check_ram(directory)
    message = str(err.value)
    assert "\n" not in message
    return message


def _records(cache: Path) -> list[Path]:
    return sorted((cache / verify.RECORDS_DIR).glob("*.json"))


def _stamp(path: Path) -> verify.FileStamp:
    return verify.FileStamp.of(os.stat(path))


def _settle() -> None:
    """Let a just-written file's stamp become trustworthy (see verify.STAMP_SETTLE_NS)."""
    time.sleep(2 * verify.STAMP_SETTLE_NS / 1e9)


def _recorded_id(snap: Path) -> str:
    return _core.snapshot_info(snap)["memory_id"]


def _plant_record(snap: Path) -> None:
    """A record that vouches for the files as they are now, for the identity the VM state
    records, while the content is something else: only a check that trusts the record passes."""
    ram = snap / "memory.bin"
    verify.record(_stamp(ram), _recorded_id(snap), ram, _stamp(snap / "vmstate.bin"))


MISMATCH = "content does not match the memory identity in its vmstate.bin (corrupt?)"


def test_a_flipped_byte_is_one_line_naming_the_file(store: Path, tmp_path: Path) -> None:
    snap, _ = _copy(store, tmp_path)
    verify.check_ram(snap)
    _flip(snap / "memory.bin")
    assert _check_error(snap) == f"{snap / 'memory.bin'}: {MISMATCH}"


def test_a_truncated_or_missing_ram_file_is_one_line(store: Path, tmp_path: Path) -> None:
    snap, _ = _copy(store, tmp_path)
    os.truncate(snap / "memory.bin", 4096)
    assert f"{snap / 'memory.bin'} has 4096 bytes, expected {16 << 20}" in _check_error(snap)
    (snap / "memory.bin").unlink()
    os.mkfifo(snap / "memory.bin")
    assert "not a regular file" in _check_error(snap)


def test_a_broken_state_file_is_one_line(store: Path, tmp_path: Path) -> None:
    snap, _ = _copy(store, tmp_path)
    (snap / "vmstate.bin").write_bytes(b"not a VM state")
    assert "vmstate.bin" in _check_error(snap)


def test_a_successful_check_is_recorded_outside_the_snapshot(
    store: Path, tmp_path: Path, private_cache: Path
) -> None:
    snap, _ = _copy(store, tmp_path)
    _settle()
    verify.check_ram(snap)
    [record] = _records(private_cache)
    data = json.loads(record.read_text())
    assert data["stamp"] == asdict(_stamp(snap / "memory.bin"))
    assert data["state_stamp"] == asdict(_stamp(snap / "vmstate.bin"))
    assert data["memory_id"] == _recorded_id(snap) and data["version"] == verify.RECORD_VERSION
    assert sorted(p.name for p in snap.iterdir()) == ["memory.bin", "metadata.json", "vmstate.bin"]


def test_a_recorded_file_is_not_hashed_again(store: Path, tmp_path: Path) -> None:
    snap, _ = _copy(store, tmp_path)
    _flip(snap / "memory.bin")
    _plant_record(snap)
    verify.check_ram(snap)  # passes on the record's word alone


def test_a_touched_file_is_hashed_again(store: Path, tmp_path: Path) -> None:
    snap, _ = _copy(store, tmp_path)
    ram = snap / "memory.bin"
    _flip(ram)
    _plant_record(snap)
    _settle()
    st = os.stat(ram)
    os.utime(ram, ns=(st.st_atime_ns, st.st_mtime_ns))  # same times back: only the ctime moves
    assert MISMATCH in _check_error(snap)


def test_a_replaced_file_is_hashed_again(store: Path, tmp_path: Path) -> None:
    snap, _ = _copy(store, tmp_path)
    ram = snap / "memory.bin"
    _settle()
    verify.check_ram(snap)
    before = _stamp(ram)
    # Same size and mtime, other content, renamed over the verified file.
    other = snap / "other"
    shutil.copy2(ram, other)
    _flip(other)
    os.utime(other, ns=(before.mtime_ns, before.mtime_ns))
    os.replace(other, ram)
    assert MISMATCH in _check_error(snap)


def test_a_record_in_the_snapshot_directory_is_not_trusted(
    store: Path, tmp_path: Path, private_cache: Path
) -> None:
    snap, _ = _copy(store, tmp_path)
    _flip(snap / "memory.bin")
    _plant_record(snap)
    # Whoever can write the snapshot directory can write records there; they are never read.
    shutil.move(private_cache / verify.RECORDS_DIR, snap / verify.RECORDS_DIR)
    assert MISMATCH in _check_error(snap)


def test_a_record_for_another_identity_does_not_count(store: Path, tmp_path: Path) -> None:
    snap, _ = _copy(store, tmp_path)
    ram = snap / "memory.bin"
    _flip(ram)
    verify.record(_stamp(ram), "00" * 32, ram, _stamp(snap / "vmstate.bin"))
    assert MISMATCH in _check_error(snap)


def test_a_diff_and_its_base_are_both_checked(store: Path, tmp_path: Path) -> None:
    base, diff = _copy(store, tmp_path)
    verify.check_ram(diff)
    _flip(diff / "memory.bin")
    assert _check_error(diff) == f"{diff / 'memory.bin'}: {MISMATCH}"
    _flip(diff / "memory.bin")
    verify.check_ram(diff)
    _flip(base / "memory.bin")
    assert _check_error(diff) == f"{base / 'memory.bin'}: {MISMATCH}"


def test_a_diff_over_another_base_is_refused(store: Path, tmp_path: Path) -> None:
    base, diff = _copy(store, tmp_path)
    # Another snapshot in the base's place: intact in itself, but not what the diff was taken on.
    shutil.rmtree(base)
    shutil.copytree(diff, base)
    assert _check_error(diff) == (
        f"{base}: this base's RAM is not the one {diff} was taken against (the base changed since)"
    )
    # The caller's base= is checked the same way.
    with pytest.raises(SnapshotError, match="is not the one"):
        verify.check_ram(diff, None, base)


def test_the_chain_of_bases_is_bounded(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, diff = _copy(store, tmp_path)
    monkeypatch.setattr(verify, "MAX_BASE_CHAIN", 0)
    assert _check_error(diff) == f"{diff}: the chain of bases is deeper than 0 snapshots"


def test_prune_forgets_records_of_changed_files(store: Path, tmp_path: Path, private_cache: Path) -> None:
    kept, gone = _copy(store, tmp_path)
    _settle()
    verify.check_ram(gone)  # checks (and records) both: the diff and its base
    assert len(_records(private_cache)) == 2
    shutil.rmtree(gone)
    assert verify.prune_records() == 1
    [left] = _records(private_cache)
    assert json.loads(left.read_text())["path"] == str(kept / "memory.bin")


def test_vm_restore_checks_the_ram_file(raw_guests: Path, tmp_path: Path) -> None:
    identity = tmp_path / "vmlinux"
    identity.write_bytes(b"stands in for the kernel and the agent")
    vm = raw.start_counter(raw_guests, 16, vsock_path=str(tmp_path / "v.sock"))
    try:
        baked = raw.bake_raw(vm, tmp_path / "snap", identity, 16)
    finally:
        vm.stop()
    snap = baked.directory
    # The bake recorded the identity the VMM reported: the first restore need not hash again.
    state = _stamp(snap / "vmstate.bin")
    recorded = verify.recorded_digest(_stamp(snap / "memory.bin"), state)
    assert recorded == baked.report["memory_id"] == _recorded_id(snap)
    # Intact: the restore gets past the check and runs the guest (which has no agent to answer).
    with pytest.raises(VmError, match="agent did not answer"):
        Vm.restore(snap, boot_timeout=1)
    _flip(snap / "memory.bin", 3 << 20)
    with pytest.raises(SnapshotError) as err:
        Vm.restore(snap, boot_timeout=5)
    assert str(err.value) == f"{snap / 'memory.bin'}: {MISMATCH}"
    # A record for the file as it is now is taken at its word: the restore does not hash.
    _plant_record(snap)
    with pytest.raises(VmError, match="agent did not answer"):
        Vm.restore(snap, boot_timeout=1)
