"""memory.bin is checked against the content hash in metadata.json before a restore maps it, and a
check is recorded (in supermachine's cache, keyed by the file's exact stamp) so that restores of an
unchanged file do not hash it again."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import rawvm_support as raw
from snapstore_support import write_snapshot
from supermachine.errors import SnapshotError, VmError
from supermachine.snapshots import metadata, verify
from supermachine.vm import Vm

RAM = os.urandom(1 << 20)


def _flip(path: Path, offset: int = 123_457) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _check_error(directory: Path) -> str:
    with pytest.raises(SnapshotError) as err:
        verify.check_ram(directory, metadata.load(directory))
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


def test_a_flipped_byte_is_one_line_naming_the_file(tmp_path: Path) -> None:
    snap = write_snapshot(tmp_path, "full", RAM)
    verify.check_ram(snap, metadata.load(snap))
    _flip(snap / "memory.bin")
    message = _check_error(snap)
    assert message == f"{snap / 'memory.bin'}: content hash does not match its metadata (corrupt?)"


def test_a_truncated_or_missing_ram_file_is_one_line(tmp_path: Path) -> None:
    snap = write_snapshot(tmp_path, "full", RAM)
    os.truncate(snap / "memory.bin", 4096)
    assert "size 4096 does not match metadata" in _check_error(snap)
    (snap / "memory.bin").unlink()
    os.mkfifo(snap / "memory.bin")
    assert "not a regular file" in _check_error(snap)


def test_a_successful_check_is_recorded_outside_the_snapshot(tmp_path: Path, private_cache: Path) -> None:
    snap = write_snapshot(tmp_path, "full", RAM)
    _settle()
    verify.check_ram(snap, metadata.load(snap))
    [record] = _records(private_cache)
    data = json.loads(record.read_text())
    assert data["stamp"] == asdict(_stamp(snap / "memory.bin"))
    assert data["blake3"] == metadata.load(snap).ram_blake3
    assert sorted(p.name for p in snap.iterdir()) == ["memory.bin", "metadata.json", "vmstate.bin"]


def _plant_record(snap: Path) -> None:
    """A record that vouches for the file as it is now, for the hash its metadata claims, while the
    content is something else: only a check that trusts the record passes."""
    ram = snap / "memory.bin"
    verify.record(_stamp(ram), metadata.load(snap).ram_blake3, ram)


def test_a_recorded_file_is_not_hashed_again(tmp_path: Path) -> None:
    snap = write_snapshot(tmp_path, "full", RAM)
    _flip(snap / "memory.bin")
    _plant_record(snap)
    verify.check_ram(snap, metadata.load(snap))  # passes on the record's word alone


def test_a_touched_file_is_hashed_again(tmp_path: Path) -> None:
    snap = write_snapshot(tmp_path, "full", RAM)
    ram = snap / "memory.bin"
    _flip(ram)
    _plant_record(snap)
    _settle()
    st = os.stat(ram)
    os.utime(ram, ns=(st.st_atime_ns, st.st_mtime_ns))  # same times back: only the ctime moves
    assert "content hash does not match" in _check_error(snap)


def test_a_replaced_file_is_hashed_again(tmp_path: Path) -> None:
    snap = write_snapshot(tmp_path, "full", RAM)
    ram = snap / "memory.bin"
    _settle()
    verify.check_ram(snap, metadata.load(snap))
    before = _stamp(ram)
    # Same size and mtime, other content, renamed over the verified file.
    other = snap / "other"
    shutil.copy2(ram, other)
    _flip(other)
    os.utime(other, ns=(before.mtime_ns, before.mtime_ns))
    os.replace(other, ram)
    assert "content hash does not match" in _check_error(snap)


def test_a_record_in_the_snapshot_directory_is_not_trusted(tmp_path: Path, private_cache: Path) -> None:
    snap = write_snapshot(tmp_path, "full", RAM)
    _flip(snap / "memory.bin")
    _plant_record(snap)
    # Whoever can write the snapshot directory can write records there; they are never read.
    shutil.move(private_cache / verify.RECORDS_DIR, snap / verify.RECORDS_DIR)
    assert "content hash does not match" in _check_error(snap)


def test_a_record_for_another_hash_does_not_count(tmp_path: Path) -> None:
    snap = write_snapshot(tmp_path, "full", RAM)
    ram = snap / "memory.bin"
    _flip(ram)
    verify.record(_stamp(ram), "blake3:" + "00" * 32, ram)
    assert "content hash does not match" in _check_error(snap)


def test_a_diff_and_its_base_are_both_checked(tmp_path: Path) -> None:
    base = write_snapshot(tmp_path, "golden", RAM)
    base_hash = metadata.load(base).ram_blake3
    diff = write_snapshot(
        tmp_path, "diff", RAM[: 1 << 19] + bytes(1 << 19), base="golden", base_blake3=base_hash
    )
    verify.check_ram(diff, metadata.load(diff))
    _flip(diff / "memory.bin", 17)
    assert _check_error(diff).startswith(f"{diff / 'memory.bin'}: content hash does not match")
    _flip(diff / "memory.bin", 17)
    verify.check_ram(diff, metadata.load(diff))
    _flip(base / "memory.bin")
    assert _check_error(diff).startswith(f"{base / 'memory.bin'}: content hash does not match")


def test_a_diff_over_another_base_is_refused(tmp_path: Path) -> None:
    write_snapshot(tmp_path, "golden", RAM)
    diff = write_snapshot(tmp_path, "diff", RAM, base="golden", base_blake3="blake3:" + "ab" * 32)
    assert "is not the one" in _check_error(diff)


def test_a_cycle_of_bases_is_bounded(tmp_path: Path) -> None:
    a = write_snapshot(tmp_path, "a", RAM, base="b", base_blake3="blake3:" + "00" * 32)
    b = write_snapshot(tmp_path, "b", RAM, base="a", base_blake3="blake3:" + "00" * 32)
    for snap, other in ((a, b), (b, a)):
        meta = metadata.load(snap)
        metadata.save(snap, replace(meta, base_blake3=metadata.load(other).ram_blake3))
    assert "deeper than" in _check_error(a)


def test_prune_forgets_records_of_changed_files(tmp_path: Path, private_cache: Path) -> None:
    kept = write_snapshot(tmp_path, "kept", RAM)
    gone = write_snapshot(tmp_path, "gone", os.urandom(1 << 20))
    _settle()
    for snap in (kept, gone):
        verify.check_ram(snap, metadata.load(snap))
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
    # The bake recorded the hash it had just taken: the first restore need not hash again.
    assert verify.recorded_digest(_stamp(snap / "memory.bin")) == baked.meta.ram_blake3
    # Intact: the restore gets past the check and runs the guest (which has no agent to answer).
    with pytest.raises(VmError, match="agent did not answer"):
        Vm.restore(snap, boot_timeout=1)
    _flip(snap / "memory.bin", 3 << 20)
    with pytest.raises(SnapshotError) as err:
        Vm.restore(snap, boot_timeout=5)
    assert str(err.value) == f"{snap / 'memory.bin'}: content hash does not match its metadata (corrupt?)"
    # A record for the file as it is now is taken at its word: the restore does not hash.
    _plant_record(snap)
    with pytest.raises(VmError, match="agent did not answer"):
        Vm.restore(snap, boot_timeout=1)
