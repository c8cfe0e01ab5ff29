"""The product snapshot API on a real Linux guest: ``vm.snapshot(dir) -> Image``,
``Image.from_snapshot(dir).start()``, bake-time diffs against a golden, clock and entropy refresh.

One booted VM (the session's) is snapshotted; everything else restores, which is fast.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from supermachine import _core
from supermachine.errors import InputError, SnapshotError, SnapshotMetadataError
from supermachine.image import Image
from supermachine.snapshots import metadata
from supermachine.vm import Vm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def golden(vm: Vm, store: Path) -> Image:
    vm.exec(["sh", "-c", "echo baked > /tmp/state"], check=True)
    image = vm.snapshot(store / "golden", base=None)
    # The source VM goes on running after its snapshot.
    assert vm.exec(["cat", "/tmp/state"]).stdout == b"baked\n"
    return image


def test_a_snapshot_image_restores_with_its_state(golden: Image, store: Path) -> None:
    assert golden.snapshot == store / "golden"
    assert golden.snapshot_meta is not None and golden.snapshot_base is None
    again = Image.from_snapshot(store / "golden")
    assert again.snapshot_meta == golden.snapshot_meta
    called = time.perf_counter()
    with golden.start() as clone:
        whole = time.perf_counter() - called
        assert clone.exec(["cat", "/tmp/state"]).stdout == b"baked\n"
        assert clone.snapshot_dir == store / "golden"
        # The restore's phases add up to the whole call, which the caller's clock contains.
        assert clone.restore_phases is not None and clone.restore_seconds is not None
        assert list(clone.restore_phases) == ["checks", "vmm", "agent", "mounts"]
        assert sum(clone.restore_phases.values()) == pytest.approx(clone.restore_seconds)
        assert 0 < clone.restore_seconds <= whole
        assert all(seconds >= 0 for seconds in clone.restore_phases.values())
        # The VMM's own phases fall within its phase.
        assert 0 < sum(clone._handle.timings.phases.values()) <= clone.restore_phases["vmm"]
        vmm_phases = {k: round(v * 1e3, 2) for k, v in clone._handle.timings.phases.items()}
        print(
            f"restore to agent answering: {clone.restore_seconds:.3f} s {clone.restore_phases},"
            f" VMM (ms) {vmm_phases}"
        )
        # The image's defaults survive: HOME from the default environment, cwd /.
        assert clone.exec(["sh", "-c", "pwd"]).stdout == b"/\n"


def test_restored_clocks_are_current_and_clones_get_fresh_entropy(golden: Image) -> None:
    time.sleep(3)  # the snapshot's clock stood still meanwhile
    with golden.start() as a, golden.start() as b:
        host = time.time()
        guest = float(a.exec(["date", "+%s"]).stdout)
        assert abs(guest - host) < 2.5, f"guest clock {guest} vs host {host}"
        # Each clone's agent credited fresh host entropy and reseeded the guest RNG.
        for clone in (a, b):
            assert clone.refreshed is not None
            assert clone.refreshed.clock_set and clone.refreshed.entropy_added == 64
        read = ["sh", "-c", "head -c 32 /dev/urandom | od -An -tx1"]
        assert a.exec(read).stdout != b.exec(read).stdout


def test_a_snapshot_of_a_clone_is_stored_as_a_diff_against_the_golden(golden: Image, store: Path) -> None:
    with golden.start() as clone:
        clone.exec(["sh", "-c", "echo more > /tmp/more"], check=True)
        child = clone.snapshot(store / "child")
        assert clone.exec(["cat", "/tmp/more"]).stdout == b"more\n"  # still running
    assert child.snapshot_meta is not None
    assert child.snapshot_base == "golden"
    info = _core.snapshot_info(str(store / "child"))
    assert info["base"] is not None and info["base"]["path"] == "../golden"
    total = info["memory_size"] // 4096
    assert 0 < info["diff_pages"] < total // 4, info
    allocated = (store / "child" / "memory.bin").stat().st_blocks * 512
    full = (store / "golden" / "memory.bin").stat().st_blocks * 512
    assert allocated < full / 2
    with child.start() as grandchild:
        out = grandchild.exec(["cat", "/tmp/state", "/tmp/more"]).stdout
        assert out == b"baked\nmore\n"


def test_auto_dedup_off_and_bad_requests(golden: Image, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPERMACHINE_AUTO_DEDUP", "0")
    with golden.start() as clone:
        full = clone.snapshot(store / "full")
        assert full.snapshot_meta is not None and full.snapshot_base is None
        with pytest.raises(SnapshotError, match="already holds a snapshot"):
            clone.snapshot(store / "full")
        # The failed attempt left the VM running.
        assert clone.exec(["true"]).returncode == 0
    assert _core.snapshot_info(str(store / "full"))["base"] is None
    with pytest.raises(SnapshotMetadataError, match=r"metadata\.json: missing"):
        Image.from_snapshot(store / "nowhere")
    with pytest.raises(InputError, match="cannot set memory_mib"):
        golden.start(memory_mib=1024)


def test_the_kernel_and_agent_paths_a_snapshot_records_are_never_opened(
    golden: Image, store: Path, tmp_path: Path
) -> None:
    """A later snapshot of a restored VM carries the recorded kernel and agent identities forward:
    a FIFO (or any host file) named in metadata.json is not read."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("vmstate.bin", "memory.bin"):
        os.link(store / "golden" / name, copy / name)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    meta = metadata.load(store / "golden")
    hostile = replace(
        meta, kernel=replace(meta.kernel, path=str(fifo)), agent=replace(meta.agent, path=str(fifo))
    )
    metadata.save(copy, hostile)
    done: dict[str, metadata.SnapshotMetadata | None] = {}

    def restore_and_snapshot() -> None:
        with Vm.restore(copy, rootfs=golden.rootfs) as clone:
            done["meta"] = clone.snapshot(tmp_path / "again", base=None).snapshot_meta

    worker = threading.Thread(target=restore_and_snapshot, daemon=True)
    worker.start()
    worker.join(300)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the reader go
        pytest.fail("restoring and snapshotting hung on the kernel path recorded in metadata.json")
    again = done["meta"]
    assert again is not None
    assert again.kernel.sha256 == meta.kernel.sha256 and again.agent.sha256 == meta.agent.sha256
