"""Reflink dedup of snapshot RAM files on real filesystems (loop-mounted XFS and btrfs; tmpfs and
ext4 for filesystems without reflinks)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from snapstore_support import RAM_SIZE, file_blake3, make_ram, run_dedup_cli, write_snapshot
from supermachine import _core, pages
from supermachine.snapshots import dedup, golden

T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def ram() -> object:
    return make_ram()


def _temps(store: Path) -> list[Path]:
    return sorted(store.rglob(f"*{dedup.TEMP_SUFFIX}"))


def test_differing_pages_and_runs() -> None:
    a = bytes(4 * pages.PAGE_SIZE) + b"x" * 100
    b = bytearray(a)
    b[pages.PAGE_SIZE + 5] = 1
    b[3 * pages.PAGE_SIZE] = 1
    b[-1] = 0
    diff = dedup.differing_pages(pages.digest_pages(bytes(b)), pages.digest_pages(a))
    assert diff == [1, 3, 4]
    assert list(dedup.page_runs([1, 2, 3, 7, 9, 10])) == [(1, 3), (7, 1), (9, 2)]
    assert list(dedup.page_runs([0, 1, 2, 3, 4], max_pages=2)) == [(0, 2), (2, 2), (4, 1)]
    assert list(dedup.page_runs([])) == []


def test_dedup_is_byte_identical_and_saves_space(reflink_store: Path, ram) -> None:  # type: ignore[no-untyped-def]
    g = write_snapshot(reflink_store, "golden", ram.golden, created=T0)
    s = write_snapshot(reflink_store, "sibling", ram.sibling, created=T0 + 1)
    before_hash = file_blake3(s / "memory.bin")
    st_before = os.stat(s / "memory.bin")
    result = dedup.dedup_file(s / "memory.bin", g / "memory.bin")
    assert result.status == "deduped", result.message
    assert file_blake3(s / "memory.bin") == before_hash
    assert (s / "memory.bin").read_bytes() == ram.sibling
    assert _core.hash_snapshot_memory(g) == golden.open_snapshot(g).info["memory_id"]
    assert result.differ_pages == len(ram.changed)
    assert result.bytes_written == len(ram.changed) * pages.PAGE_SIZE
    # statvfs, not du: >= 80% of the RAM file came back for 5% differing pages.
    assert result.bytes_saved >= 0.8 * RAM_SIZE, result
    st_after = os.stat(s / "memory.bin")
    assert st_after.st_mode == st_before.st_mode and st_after.st_mtime_ns == st_before.st_mtime_ns
    assert _temps(reflink_store) == []


def test_dry_run_changes_nothing(xfs_store: Path, ram) -> None:  # type: ignore[no-untyped-def]
    g = write_snapshot(xfs_store, "golden", ram.golden, created=T0)
    s = write_snapshot(xfs_store, "sibling", ram.sibling, created=T0 + 1)
    ino = os.stat(s / "memory.bin").st_ino
    result = dedup.dedup_file(s / "memory.bin", g / "memory.bin", dry_run=True)
    assert result.status == "would-dedup", result.message
    assert result.bytes_saved == RAM_SIZE - len(ram.changed) * pages.PAGE_SIZE
    assert os.stat(s / "memory.bin").st_ino == ino
    assert _temps(xfs_store) == []


def test_size_mismatch_and_corrupt_input_leave_original(xfs_store: Path, ram) -> None:  # type: ignore[no-untyped-def]
    g = write_snapshot(xfs_store, "golden", ram.golden[: RAM_SIZE // 2], created=T0)
    s = write_snapshot(xfs_store, "sibling", ram.sibling, created=T0 + 1)
    ino = os.stat(s / "memory.bin").st_ino
    result = dedup.dedup_file(s / "memory.bin", g / "memory.bin")
    assert result.status == "failed" and "size mismatch" in result.message
    # A RAM file that does not hold the memory its VM state records is not rewritten.
    g2 = write_snapshot(xfs_store, "golden2", ram.golden, created=T0)
    memory_id = _core.snapshot_info(s)["memory_id"]
    with open(s / "memory.bin", "r+b") as f:
        f.seek(RAM_SIZE // 3)
        f.write(b"\xff\x00")
    damaged = (s / "memory.bin").read_bytes()
    ino = os.stat(s / "memory.bin").st_ino
    result = dedup.dedup_file(s / "memory.bin", g2 / "memory.bin", memory_id=memory_id)
    assert result.status == "failed"
    assert result.message == "RAM file does not match the memory identity in its vmstate.bin (corrupt?)"
    assert os.stat(s / "memory.bin").st_ino == ino
    assert (s / "memory.bin").read_bytes() == damaged
    assert _temps(xfs_store) == []


def test_no_reflink_filesystem_is_a_clear_result(plain_store: Path) -> None:
    small = make_ram(size=4 << 20, seed=2)
    g = write_snapshot(plain_store, "golden", small.golden, created=T0)
    s = write_snapshot(plain_store, "sibling", small.sibling, created=T0 + 1)
    ino = os.stat(s / "memory.bin").st_ino
    result = dedup.dedup_file(s / "memory.bin", g / "memory.bin")
    assert result.status == "no-reflink"
    assert "filesystem does not support reflinks" in result.message
    assert os.stat(s / "memory.bin").st_ino == ino and (s / "memory.bin").read_bytes() == small.sibling
    assert _temps(plain_store) == []
    cli = run_dedup_cli(str(plain_store))
    assert cli.returncode == 1
    assert "filesystem does not support reflinks" in cli.stdout
    assert "Traceback" not in cli.stderr
    assert (s / "memory.bin").read_bytes() == small.sibling and _temps(plain_store) == []


def test_store_dedup_each_against_its_golden(xfs_store: Path, ram) -> None:  # type: ignore[no-untyped-def]
    write_snapshot(xfs_store, "a-golden", ram.golden, created=T0)
    write_snapshot(xfs_store, "b-sibling", ram.sibling, created=T0 + 0.5)
    other = make_ram(size=RAM_SIZE // 4, seed=3)
    write_snapshot(xfs_store, "c-other-size", other.golden, created=T0 + 2)
    hashes = {p.name: file_blake3(p / "memory.bin") for p in xfs_store.iterdir() if p.is_dir()}

    dry = run_dedup_cli(str(xfs_store), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    dry_report = json.loads(dry.stdout)
    assert dry_report["dry_run"] is True

    report = dedup.dedup_store(xfs_store)
    by_name = {r.snapshot: r for r in report.results}
    # a's golden is b (newest sibling) and b's golden is a: the pair is stored once.
    assert by_name["a-golden"].status == "deduped" and by_name["a-golden"].golden == "b-sibling"
    assert by_name["b-sibling"].status == "skipped" and by_name["b-sibling"].golden == "a-golden"
    assert by_name["c-other-size"].status == "no-golden"
    assert report.ok
    assert report.bytes_saved >= 0.8 * RAM_SIZE
    assert dry_report["bytes_saved"] == RAM_SIZE - len(ram.changed) * pages.PAGE_SIZE
    for name, digest in hashes.items():
        assert file_blake3(xfs_store / name / "memory.bin") == digest
    assert _temps(xfs_store) == []

    table = run_dedup_cli(str(xfs_store))
    assert table.returncode == 0, table.stderr
    assert "a-golden" in table.stdout and "total saved" in table.stdout


def test_store_problems_are_reported_not_fatal(xfs_store: Path, ram) -> None:  # type: ignore[no-untyped-def]
    write_snapshot(xfs_store, "golden", ram.golden, created=T0)
    write_snapshot(xfs_store, "sibling", ram.sibling, created=T0 + 1)
    broken = write_snapshot(xfs_store, "broken", ram.golden, created=T0 + 2)
    (broken / "metadata.json").write_text("{")
    cli = run_dedup_cli(str(xfs_store), "--json")
    assert cli.returncode == 0, cli.stderr
    assert "not valid JSON" in cli.stderr
    report = json.loads(cli.stdout)
    assert {r["snapshot"]: r["status"] for r in report["results"]} == {
        "golden": "deduped",
        "sibling": "skipped",
    }


def test_missing_store_is_one_line(tmp_path: Path) -> None:
    cli = run_dedup_cli(str(tmp_path / "nope"))
    assert cli.returncode != 0
    assert cli.stderr.strip().count("\n") == 0 and "no such snapshot store" in cli.stderr


def test_auto_dedup_respects_switch(xfs_store: Path, ram, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    write_snapshot(xfs_store, "golden", ram.golden, created=T0)
    fresh = write_snapshot(xfs_store, "fresh", ram.sibling, created=T0 + 1)
    monkeypatch.setenv(golden.AUTO_DEDUP_ENV, "0")
    assert dedup.auto_dedup(fresh) is None
    monkeypatch.setenv(golden.AUTO_DEDUP_ENV, "1")
    result = dedup.auto_dedup(fresh)
    assert result is not None and result.status == "deduped" and result.golden == "golden"
    assert (fresh / "memory.bin").read_bytes() == ram.sibling


def test_zero_pages_of_a_sparse_snapshot_stay_holes(reflink_store: Path) -> None:
    size = 8 << 20
    golden_ram = os.urandom(size)
    g = write_snapshot(reflink_store, "golden", golden_ram, created=T0)
    # The sibling: the golden with its second half zero, written sparse (a hole), as snapshots are.
    s = reflink_store / "sibling"
    s.mkdir()
    with open(s / "memory.bin", "wb") as f:
        f.write(golden_ram[: size // 2])
        f.truncate(size)
    expected = golden_ram[: size // 2] + bytes(size // 2)
    result = dedup.dedup_file(s / "memory.bin", g / "memory.bin")
    assert result.status == "deduped", result.message
    assert result.holes_punched == size // 2 // pages.PAGE_SIZE and result.bytes_written == 0
    assert (s / "memory.bin").read_bytes() == expected
    assert os.stat(s / "memory.bin").st_blocks * 512 <= size // 2 + (1 << 20)
