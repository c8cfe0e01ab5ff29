"""Golden-base selection: which sibling a fresh snapshot is stored against."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from snapstore_support import base_meta, write_snapshot
from supermachine.snapshots import golden
from supermachine.snapshots.golden import select_golden

RAM = os.urandom(64 * 1024)
T0 = 1_700_000_000.0


def _fresh(store: Path) -> Path:
    return write_snapshot(store, "fresh", RAM, created=T0 + 100)


@pytest.mark.parametrize(
    ("candidate", "chosen"),
    [
        ({}, True),
        ({"image_digest": "sha256:" + "cd" * 32}, False),
        ({"memory_mib": 128}, False),
        ({"baked_by_version": "0.0.9"}, False),
        ({"vcpus": 4}, True),  # vCPU count does not matter for RAM sharing
        ({"image_ref": "other-name:latest"}, True),  # same content under another name
        ({"base": "base"}, False),  # diffs are never goldens
    ],
    ids=["match", "image", "memory", "version", "vcpus", "ref-only", "diff"],
)
def test_compatibility_table(tmp_path: Path, candidate: dict[str, object], chosen: bool) -> None:
    ram = RAM
    if "base" in candidate:
        # A diff (its VM state records the base) of a base that is no candidate itself.
        write_snapshot(tmp_path, "base", RAM, created=T0, baked_by_version="0.0.1")
        ram = RAM[:4096] + bytes(4096) + RAM[8192:]
    image = base_meta().image
    if "image_digest" in candidate:
        image = replace(image, config_digest=candidate.pop("image_digest"))  # type: ignore[arg-type]
    if "image_ref" in candidate:
        image = replace(image, ref=candidate.pop("image_ref"))  # type: ignore[arg-type]
    write_snapshot(tmp_path, "candidate", ram, created=T0, image=image, **candidate)
    choice = select_golden(tmp_path, _fresh(tmp_path))
    assert (choice.golden is not None) == chosen
    if chosen:
        assert choice.golden is not None and choice.golden.name == "candidate"
    assert choice.skipped == []


def test_never_itself(tmp_path: Path) -> None:
    assert select_golden(tmp_path, _fresh(tmp_path)).golden is None


def test_empty_store_and_non_snapshot_entries(tmp_path: Path) -> None:
    (tmp_path / "not-a-snapshot").mkdir()
    (tmp_path / "file.txt").write_text("x")
    store = tmp_path / "store"
    store.mkdir()
    fresh = write_snapshot(tmp_path, "fresh", RAM)
    assert select_golden(store, fresh).golden is None
    assert select_golden(tmp_path, fresh).golden is None


def test_newest_at_sub_second_resolution(tmp_path: Path) -> None:
    # Written in an order that differs from their created times; created differ by < 1 ms.
    write_snapshot(tmp_path, "b-newest", RAM, created=T0 + 0.0009)
    write_snapshot(tmp_path, "c-oldest", RAM, created=T0 + 0.0001)
    write_snapshot(tmp_path, "a-middle", RAM, created=T0 + 0.0005)
    choice = select_golden(tmp_path, _fresh(tmp_path))
    assert choice.golden is not None and choice.golden.name == "b-newest"


def test_newer_than_fresh_sibling_is_still_a_candidate(tmp_path: Path) -> None:
    write_snapshot(tmp_path, "later", RAM, created=T0 + 500)
    write_snapshot(tmp_path, "earlier", RAM, created=T0)
    choice = select_golden(tmp_path, _fresh(tmp_path))
    assert choice.golden is not None and choice.golden.name == "later"


def test_equal_created_falls_back_to_mtime_ns(tmp_path: Path) -> None:
    a = write_snapshot(tmp_path, "a", RAM, created=T0)
    b = write_snapshot(tmp_path, "b", RAM, created=T0)
    os.utime(a / "memory.bin", ns=(0, 2_000_000_000_000_000_500))
    os.utime(b / "memory.bin", ns=(0, 2_000_000_000_000_000_100))
    choice = select_golden(tmp_path, _fresh(tmp_path))
    assert choice.golden is not None and choice.golden.name == "a"


def test_corrupt_candidate_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_snapshot(tmp_path, "older-good", RAM, created=T0)
    newest = write_snapshot(tmp_path, "newest-corrupt", RAM, created=T0 + 1)
    with open(newest / "memory.bin", "r+b") as f:
        f.seek(12345)
        f.write(b"\xff\x00\xff")
    choice = select_golden(tmp_path, _fresh(tmp_path))
    assert choice.golden is not None and choice.golden.name == "older-good"
    assert len(choice.skipped) == 1 and "newest-corrupt" in choice.skipped[0]
    assert choice.skipped[0] == (
        f"skipping golden candidate newest-corrupt: {newest / 'memory.bin'}: content does not match"
        " the memory identity in its vmstate.bin (corrupt?)"
    )
    assert any("newest-corrupt" in r.getMessage() for r in caplog.records)


def test_truncated_candidate_is_skipped(tmp_path: Path) -> None:
    bad = write_snapshot(tmp_path, "truncated", RAM, created=T0 + 1)
    os.truncate(bad / "memory.bin", 4096)
    choice = select_golden(tmp_path, _fresh(tmp_path))
    assert choice.golden is None
    assert f"{bad / 'memory.bin'} has 4096 bytes, expected" in choice.skipped[0]


def test_broken_sibling_metadata_does_not_stop_selection(tmp_path: Path) -> None:
    write_snapshot(tmp_path, "good", RAM, created=T0)
    broken = write_snapshot(tmp_path, "broken", RAM, created=T0 + 1)
    (broken / "metadata.json").write_text("{garbage")
    snaps, problems = golden.list_snapshots(tmp_path)
    assert [s.name for s in snaps] == ["good"]
    assert len(problems) == 1 and "not valid JSON" in problems[0]
    choice = select_golden(tmp_path, _fresh(tmp_path))
    assert choice.golden is not None and choice.golden.name == "good"


@pytest.mark.parametrize(
    ("value", "enabled"), [(None, True), ("1", True), ("0", False), ("false", False), ("off", False)]
)
def test_auto_dedup_switch(monkeypatch: pytest.MonkeyPatch, value: str | None, enabled: bool) -> None:
    if value is None:
        monkeypatch.delenv(golden.AUTO_DEDUP_ENV, raising=False)
    else:
        monkeypatch.setenv(golden.AUTO_DEDUP_ENV, value)
    assert golden.auto_dedup_enabled() is enabled
