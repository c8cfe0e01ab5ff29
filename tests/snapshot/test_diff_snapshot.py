"""Diff snapshots on real KVM with tiny guests: only changed pages are stored, restores layer them
over their base copy-on-write, and a base whose content differs is refused."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import snap_guests as g
from supermachine import _core
from test_snapshot import counter, wait_until

PAGE = 4096


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


@pytest.fixture
def base(vms: Any, tmp_path: Path) -> Path:
    """A full snapshot of the CLONE guest counting and waiting for a clone id."""
    vm = vms.start(g.CLONE, memory_mib=64)
    wait_until(lambda: counter(vm) > 1000, what="the guest to start")
    vm.snapshot(str(tmp_path / "store" / "base"))
    vm.stop()
    return tmp_path / "store" / "base"


def test_a_diff_stores_only_what_changed_since_the_base(vms: Any, base: Path) -> None:
    vm = vms.restore(base)
    wait_until(lambda: counter(vm) > 0, what="the restored guest to run")
    payload = os.urandom(3 * PAGE)
    vm.write_memory(0x800000, payload)  # a VMM-side write: KVM's dirty log would not see it
    diff = base.parent / "diff"
    report = vm.snapshot(str(diff), str(base))
    saved = counter(vm)
    vm.stop()

    # The guest wrote its counter (and its stack); the host three pages.
    assert 3 <= report["diff_pages"] <= 8, report
    assert report["compared_pages"] <= 16, "only pages written since the restore are compared"
    assert _allocated(diff / "memory.bin") <= 8 * PAGE + 64 * 1024
    info = _core.snapshot_info(str(diff))
    assert info["base"] == {"path": "../base", "memory_id": _core.snapshot_info(str(base))["memory_id"]}
    assert info["diff_pages"] == report["diff_pages"]
    assert info["memory_id"] == report["memory_id"] != info["base"]["memory_id"]

    clone = vms.restore(diff)
    assert clone.read_memory(0x800000, len(payload)) == payload
    assert counter(clone) >= saved
    clone.write_memory(g.PARAMS, struct.pack("<Q", 4))
    assert clone.wait(10).code == 4
    assert clone.console() == b"clone 4\n"


def test_a_booted_vm_is_compared_page_by_page(vms: Any, base: Path) -> None:
    vm = vms.start(g.CLONE, memory_mib=64)
    wait_until(lambda: counter(vm) > 1000, what="the guest to start")
    vm.write_memory(0x900000, b"cold boot data")
    report = vm.snapshot(str(base.parent / "cold"), str(base))
    vm.stop()
    assert report["compared_pages"] == (64 << 20) // PAGE
    assert 1 <= report["diff_pages"] <= 8
    clone = vms.restore(base.parent / "cold")
    assert clone.read_memory(0x900000, 14) == b"cold boot data"
    clone.write_memory(g.PARAMS, struct.pack("<Q", 2))
    assert clone.wait(10).code == 2


def test_diffs_of_diffs_layer_in_order(vms: Any, base: Path) -> None:
    store = base.parent
    one = vms.restore(base)
    one.write_memory(0x800000, b"A" * PAGE + b"B" * PAGE)
    one.snapshot(str(store / "one"), str(base))
    one.stop()
    two = vms.restore(store / "one")
    two.write_memory(0x801000, b"C" * PAGE)  # over one of the first diff's pages
    two.write_memory(0xA00000, b"D" * 10)
    report = two.snapshot(str(store / "two"), str(store / "one"))
    two.stop()
    assert report["compared_pages"] <= 16
    last = vms.restore(store / "two")
    assert last.read_memory(0x800000, 2 * PAGE) == b"A" * PAGE + b"C" * PAGE
    assert last.read_memory(0xA00000, 10) == b"D" * 10
    last.write_memory(g.PARAMS, struct.pack("<Q", 6))
    assert last.wait(10).code == 6
    # A clone of the second diff stored against the base itself: only the pages the two diffs
    # hold and the pages written since are compared, and the result holds all of them.
    third = vms.restore(store / "two")
    third.write_memory(0xB00000, b"E" * 10)
    report = third.snapshot(str(store / "flat-diff"), str(base))
    third.stop()
    assert report["compared_pages"] <= 32, report
    assert _core.snapshot_info(str(store / "flat-diff"))["base"]["path"] == "../base"
    check = vms.restore(store / "flat-diff")
    assert check.read_memory(0x800000, 2 * PAGE) == b"A" * PAGE + b"C" * PAGE
    assert check.read_memory(0xA00000, 10) == b"D" * 10
    assert check.read_memory(0xB00000, 10) == b"E" * 10
    # A full snapshot of a VM restored from a diff holds every layer's pages.
    again = vms.restore(store / "two")
    again.snapshot(str(store / "full"))
    again.stop()
    assert _core.snapshot_info(str(store / "full"))["base"] is None
    shutil.rmtree(store / "one")
    flat = vms.restore(store / "full")
    assert flat.read_memory(0x800000, 2 * PAGE) == b"A" * PAGE + b"C" * PAGE
    assert flat.read_memory(0xA00000, 10) == b"D" * 10


def test_a_store_moved_as_a_whole_still_restores(vms: Any, base: Path, tmp_path: Path) -> None:
    vm = vms.restore(base)
    vm.write_memory(0x800000, b"moved")
    vm.snapshot(str(base.parent / "diff"), str(base))
    vm.stop()
    moved = tmp_path / "elsewhere"
    (base.parent).rename(moved)
    clone = vms.restore(moved / "diff")
    assert clone.read_memory(0x800000, 5) == b"moved"
    # A base somewhere else can be named explicitly.
    (moved / "base").rename(tmp_path / "golden")
    with pytest.raises(FileNotFoundError, match=r"base snapshot .*/elsewhere/base does not exist"):
        _core.Vm.restore(str(moved / "diff"))
    clone = vms.restore(moved / "diff", base=str(tmp_path / "golden"))
    assert clone.read_memory(0x800000, 5) == b"moved"


def _restore_error(directory: Path, overrides: dict[str, Any] | None = None) -> str:
    with pytest.raises((ValueError, OSError)) as e:
        _core.Vm.restore(str(directory), overrides)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_a_base_with_other_content_is_refused(vms: Any, base: Path) -> None:
    store = base.parent
    vm = vms.restore(base)
    vm.write_memory(0x800000, b"diff data")
    vm.snapshot(str(store / "diff"), str(base))
    vm.stop()
    other = vms.start(g.COUNTER, memory_mib=64)
    wait_until(lambda: counter(other) > 1000, what="the other guest to count")
    other.snapshot(str(store / "other"))
    other.stop()

    # Another snapshot put where the base was: its recorded identity differs.
    shutil.move(str(base), str(store / "real-base"))
    shutil.copytree(store / "other", base)
    assert "content hash" in _restore_error(store / "diff")
    assert "content hash" in _restore_error(store / "diff", {"base": str(store / "other")})
    shutil.rmtree(base)
    shutil.move(str(store / "real-base"), str(base))

    # The base's RAM file edited in place (its state file untouched): hashed again, and refused.
    memory = base / "memory.bin"
    original = memory.read_bytes()
    at = g.RESULTS + 64
    with open(memory, "r+b") as f:
        f.seek(at)
        f.write(b"\xee")
    assert "memory.bin changed" in _restore_error(store / "diff")
    # Only touched, same bytes: hashed again, and accepted.
    memory.write_bytes(original)
    clone = vms.restore(store / "diff")
    assert clone.read_memory(0x800000, 9) == b"diff data"


def test_bad_bases_are_refused_when_taking_a_diff(vms: Any, base: Path, tmp_path: Path) -> None:
    vm = vms.restore(base)
    with pytest.raises(ValueError, match="cannot be its own base"):
        vm.snapshot(str(base), str(base))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vm.snapshot(str(tmp_path / "d"), str(tmp_path / "nowhere"))
    small = vms.start(g.COUNTER, memory_mib=16)
    small.snapshot(str(tmp_path / "small"))
    small.stop()
    with pytest.raises(ValueError, match="has 16 MiB of RAM, this VM 64 MiB"):
        vm.snapshot(str(tmp_path / "d"), str(tmp_path / "small"))
    assert not (tmp_path / "d" / "vmstate.bin").exists()
    # The VM was paused for the failed attempts and still snapshots fine.
    vm.snapshot(str(tmp_path / "d"), str(base))
    assert _core.snapshot_info(str(tmp_path / "d"))["base"]["path"] == str(base)


def test_many_scattered_pages_are_mapped_or_copied(vms: Any, base: Path) -> None:
    vm = vms.restore(base)
    start = 0x1000000
    # Every other page: each is its own run, more runs than one VM maps separately.
    pages = list(range(0, 2 * 5000, 2))
    for p in pages:
        vm.write_memory(start + p * PAGE, struct.pack("<Q", p) * 8)
    report = vm.snapshot(str(base.parent / "scattered"), str(base))
    vm.stop()
    assert report["diff_pages"] >= len(pages)
    clone = vms.restore(base.parent / "scattered")
    for p in [*pages[::97], pages[-1]]:
        assert clone.read_memory(start + p * PAGE, 64) == struct.pack("<Q", p) * 8
        assert clone.read_memory(start + (p + 1) * PAGE, 8) == bytes(8)
    clone.write_memory(g.PARAMS, struct.pack("<Q", 1))
    assert clone.wait(10).code == 1
