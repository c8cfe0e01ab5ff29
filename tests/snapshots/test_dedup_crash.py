"""Crash safety: a ``supermachine dedup`` killed with SIGKILL at any point leaves every RAM file
byte-identical, and the next run removes the temp file it left and finishes the job."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from snapstore_support import file_blake3, make_ram, run_dedup_cli, write_snapshot
from supermachine.snapshots import dedup

T0 = 1_700_000_000.0
STAGES = ["cloned", "writing", "written", "synced", "verified", "renamed"]


@pytest.fixture(scope="module")
def ram() -> object:
    return make_ram(size=32 << 20, seed=7)


def _spawn(store: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "supermachine.cli.snapshots", "dedup", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float = 120.0) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return
    proc.kill()
    raise AssertionError(f"dedup never reached {needle!r}: {''.join(seen)}")


def _temps(store: Path) -> list[Path]:
    return sorted(store.rglob(f"*{dedup.TEMP_SUFFIX}"))


def _make_pair(store: Path, ram) -> dict[Path, str]:  # type: ignore[no-untyped-def]
    g = write_snapshot(store, "golden", ram.golden, created=T0)
    s = write_snapshot(store, "sibling", ram.sibling, created=T0 + 1)
    return {p / "memory.bin": file_blake3(p / "memory.bin") for p in (g, s)}


def _check_identical(hashes: dict[Path, str]) -> None:
    for path, digest in hashes.items():
        assert file_blake3(path) == digest, f"{path} changed"


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_at_each_stage(xfs_store: Path, ram, stage: str) -> None:  # type: ignore[no-untyped-def]
    hashes = _make_pair(xfs_store, ram)
    proc = _spawn(xfs_store, {dedup.PAUSE_ENV: stage})
    _wait_for_line(proc, f"paused at {stage}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    _check_identical(hashes)
    assert len(_temps(xfs_store)) == (0 if stage == "renamed" else 1)

    rerun = run_dedup_cli(str(xfs_store))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    if stage != "renamed":
        assert "removed 1 temp file" in rerun.stdout
    assert _temps(xfs_store) == []
    _check_identical(hashes)


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])
def test_sigkill_after_a_delay(xfs_store: Path, ram, delay: float) -> None:  # type: ignore[no-untyped-def]
    hashes = _make_pair(xfs_store, ram)
    proc = _spawn(xfs_store)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    _check_identical(hashes)
    rerun = run_dedup_cli(str(xfs_store))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert _temps(xfs_store) == []
    _check_identical(hashes)


def test_concurrent_runs_serialise_on_the_store_lock(xfs_store: Path, ram) -> None:  # type: ignore[no-untyped-def]
    hashes = _make_pair(xfs_store, ram)
    first = _spawn(xfs_store, {dedup.PAUSE_ENV: "written"})
    _wait_for_line(first, "paused at written")
    second = _spawn(xfs_store)
    time.sleep(0.5)
    assert second.poll() is None  # waiting for the lock, not removing the first run's temp file
    assert len(_temps(xfs_store)) == 1
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert second.wait(timeout=120) == 0
    assert _temps(xfs_store) == []
    _check_identical(hashes)
