"""Snapshots appear in a store whole or not at all: a writer killed at any moment leaves nothing
visible, and the next writer of the name (or `supermachine prune`) removes what it left. One
writer per name: a second one fails at once, before it boots anything."""

from __future__ import annotations

import random
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import rawvm_support as raw
from snapstore_support import run_cli, write_snapshot
from supermachine import _core
from supermachine.errors import SnapshotBusyError, SnapshotError
from supermachine.snapshots import golden, metadata, publish

RAM_MIB = 256
HERE = Path(__file__).resolve().parent


def _visible(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if not p.name.startswith("."))


def _hidden(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def seed(raw_guests: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of a counting guest whose unused RAM is random: restored and snapshotted again,
    it writes ~240 MiB, which takes long enough to be killed in the middle of."""
    directory = tmp_path_factory.mktemp("seed") / "seed"
    vm = raw.start_counter(raw_guests, RAM_MIB)
    try:
        vm.snapshot(str(directory))
    finally:
        vm.stop()
    raw.fill_random(directory / metadata.MEMORY_FILE, 16 * raw.MIB, RAM_MIB * raw.MIB)
    return directory


@pytest.fixture
def identity(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"stands in for the kernel and the agent")
    return path


def _spawn(seed: Path, target: Path, identity: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", raw.CHILD, str(seed), str(target), str(identity), str(HERE), str(RAM_MIB)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(proc: subprocess.Popen[str], word: str, timeout: float = 120.0) -> float:
    """Seconds until the child printed ``word``."""
    assert proc.stdout is not None
    started = time.monotonic()
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != word:
        proc.kill()
        _out, err = proc.communicate(timeout=30)
        raise AssertionError(f"the child never said {word!r} (got {line!r}): {err}")
    return time.monotonic() - started


@pytest.fixture
def write_seconds(seed: Path, identity: Path, tmp_path: Path) -> float:
    """How long one uninterrupted write takes here (so kills land inside it)."""
    store = tmp_path / "measure"
    store.mkdir()
    took = []
    for _ in range(2):  # the faster of two: the first can be slowed by the seed's write-back
        proc = _spawn(seed, store / "snap", identity)
        _wait_for(proc, "ready")
        took.append(_wait_for(proc, "done"))
        assert proc.wait(timeout=60) == 0
        assert _visible(store) == ["snap"] and _hidden(store) == []
        shutil.rmtree(store / "snap")
    return min(took)


def _kill_during_write(seed: Path, target: Path, identity: Path, after: float) -> bool:
    """Start a write and SIGKILL it ``after`` seconds in; ``True`` if it said it had finished.
    (A writer can also be killed after its rename but before it says so: whether the snapshot
    was published is read from the store, not from this.)"""
    proc = _spawn(seed, target, identity)
    _wait_for(proc, "ready")
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    out, _err = proc.communicate(timeout=60)
    return "done" in out


def _kills(write_seconds: float, count: int, seed_value: int) -> Iterator[float]:
    rng = random.Random(seed_value)
    for _ in range(count):
        yield rng.uniform(0.0, 0.7 * write_seconds)


def test_a_killed_writer_leaves_nothing_visible_and_the_next_write_cleans_up(
    seed: Path, identity: Path, tmp_path: Path, write_seconds: float
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    interrupted = 0
    stale_lock = publish.lock_path(store / "snap").name
    for after in _kills(write_seconds, 6, 1):
        said_done = _kill_during_write(seed, store / "snap", identity, after)
        snaps, problems = golden.list_snapshots(store)
        assert problems == []
        if _visible(store):  # the rename won the race: a whole snapshot, which the next round replaces
            assert [s.name for s in snaps] == ["snap"]
            assert set(_hidden(store)) <= {stale_lock}  # killed between its rename and its unlock
            shutil.rmtree(store / "snap")
            continue
        assert not said_done
        interrupted += 1
        assert _visible(store) == [], f"killed after {after:.2f} s of {write_seconds:.2f} s"
        assert snaps == []
    assert interrupted >= 3, "the kills did not land inside the write"
    proc = _spawn(seed, store / "snap", identity)
    _wait_for(proc, "ready")
    _wait_for(proc, "done")
    assert proc.wait(timeout=60) == 0
    assert _visible(store) == ["snap"] and _hidden(store) == []
    snaps, problems = golden.list_snapshots(store)
    assert [s.name for s in snaps] == ["snap"] and problems == []


def test_prune_removes_what_killed_writers_left(
    seed: Path, identity: Path, tmp_path: Path, write_seconds: float
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    write_snapshot(store, "kept", b"\0" * 8192)
    for i, after in enumerate(_kills(write_seconds, 3, 2)):
        _kill_during_write(seed, store / f"snap{i}", identity, after)
    finished = set(_visible(store)) - {"kept"}  # writes whose rename won the race
    snaps, problems = golden.list_snapshots(store)
    assert problems == [] and {s.name for s in snaps} == {"kept"} | finished
    assert len(finished) < 3, "the kills did not land inside the write"
    result = publish.prune_store(store)
    assert result.partial + result.locks >= 1
    assert _visible(store) == sorted({"kept"} | finished) and _hidden(store) == []
    metadata.load(store / "kept")  # still a whole snapshot
    assert _core.snapshot_info(store / "kept")["memory_size"] == 2 << 20


def test_prune_command_cleans_the_store(tmp_path: Path) -> None:
    store = tmp_path / "snapshots"
    store.mkdir()
    write_snapshot(store, "kept", b"\0" * 8192)
    (store / ".dead.snapshot-partial").mkdir()
    (store / ".dead.snapshot-partial" / ".memory.bin.tmp-4242").write_bytes(b"x" * 4096)
    (store / ".dead.snapshot-lock").write_bytes(b"")
    proc = run_cli("prune", env={"SUPERMACHINE_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "Deleted 1 incomplete snapshots and 1 stale lock files" in proc.stdout
    assert _visible(store) == ["kept"] and _hidden(store) == []


def test_a_partial_snapshot_of_an_older_version_is_reported_and_replaced(
    raw_guests: Path, identity: Path, tmp_path: Path
) -> None:
    """What a killed writer left under the name itself before snapshots were published by rename:
    the listing says what it is, and the next write of that name replaces it."""
    store = tmp_path / "store"
    store.mkdir()
    old = store / "snap"
    old.mkdir()
    (old / "memory.bin").write_bytes(b"\0" * 4096)
    (old / "vmstate.bin").write_bytes(b"state")
    (old / ".memory.bin.tmp-4242").write_bytes(b"\0" * 4096)
    snaps, problems = golden.list_snapshots(store)
    assert snaps == [] and len(problems) == 1
    assert "incomplete snapshot left by an interrupted write" in problems[0] and "prune" in problems[0]
    vm = raw.start_counter(raw_guests, 16)
    try:
        raw.bake_raw(vm, old, identity, 16)
    finally:
        vm.stop()
    assert sorted(p.name for p in old.iterdir()) == ["memory.bin", "metadata.json", "vmstate.bin"]
    assert golden.list_snapshots(store)[1] == []


def test_a_non_snapshot_directory_is_not_replaced(raw_guests: Path, identity: Path, tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    vm = raw.start_counter(raw_guests, 16)
    try:
        with pytest.raises(SnapshotError, match="is not empty and holds no snapshot"):
            raw.bake_raw(vm, target, identity, 16)
        done = raw.bake_raw(vm, tmp_path / "snap", identity, 16)
        with pytest.raises(SnapshotError, match="already holds a snapshot"):
            raw.bake_raw(vm, tmp_path / "snap", identity, 16)
    finally:
        vm.stop()
    assert (target / "notes.txt").read_text() == "keep me"
    assert _hidden(tmp_path) == []
    assert done.directory == tmp_path / "snap"


HOLD = """
import sys, time
from supermachine.snapshots import publish
with publish.name_lock(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def held_name(tmp_path: Path) -> Iterator[Path]:
    """``<cache>/snapshots/same``, whose name lock another process holds."""
    target = tmp_path / "cache" / "snapshots" / "same"
    target.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for(holder, "holding", timeout=60)
        yield target
    finally:
        holder.kill()
        holder.communicate(timeout=30)


def test_a_second_writer_of_a_name_fails_at_once(held_name: Path, raw_guests: Path, identity: Path) -> None:
    vm = raw.start_counter(raw_guests, 16)
    try:
        started = time.monotonic()
        with pytest.raises(SnapshotBusyError) as err:
            raw.bake_raw(vm, held_name, identity, 16)
        assert time.monotonic() - started < 10
    finally:
        vm.stop()
    assert "another process is writing a snapshot of this name" in str(err.value)
    assert _visible(held_name.parent) == []


def test_the_snapshot_command_fails_before_it_pulls_or_boots(held_name: Path) -> None:
    # No such image: a command that pulled (or booted) before taking the lock would fail on that.
    cache = held_name.parent.parent
    try:
        proc = run_cli(
            "snapshot",
            "--name",
            "same",
            f"oci:{cache}/no-such-image",
            env={"SUPERMACHINE_CACHE_DIR": str(cache)},
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the second writer waited instead of failing")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "another process is writing a snapshot of this name" in proc.stderr


def test_names_that_leave_the_store_are_refused(tmp_path: Path) -> None:
    for name in ("../escape", ".hidden", "a/b", "x" * 300):
        proc = run_cli(
            "snapshot", "--name", name, "oci:/nonexistent", env={"SUPERMACHINE_CACHE_DIR": str(tmp_path)}
        )
        assert proc.returncode == 1, proc.stderr
        assert "cannot name a snapshot" in proc.stderr or "longer than" in proc.stderr
    assert not (tmp_path / "escape").exists()


def test_the_lock_is_released_and_removed(tmp_path: Path) -> None:
    target = tmp_path / "snap"
    with publish.name_lock(target):
        assert publish.lock_path(target).exists()
        with publish.name_lock(target):  # re-entrant in the same thread
            pass
        assert publish.lock_path(target).exists()
    assert not publish.lock_path(target).exists()
    with publish.name_lock(target):
        pass
