"""The process-per-VM model on a real Linux guest: a VM restored from a snapshot image runs in a
jailed, seccomp-filtered worker, and a worker that is killed or faults ends only its own VM while
another VM of the same process keeps executing commands; a pool replaces a dead idle worker.

The session's VM is snapshotted once; every VM here is a restore of that snapshot."""

from __future__ import annotations

import os
import signal
import time

import pytest
from supermachine.errors import VmmCrashedError
from supermachine.image import Image
from supermachine.vm import Vm

pytestmark = pytest.mark.slow

WARM = 120.0  # seconds a restore may take on a busy emulating host; normally milliseconds


@pytest.fixture(scope="module")
def image(vm: Vm, tmp_path_factory: pytest.TempPathFactory) -> Image:
    vm.exec(["echo", "warm"], check=True)
    snapshot = vm.snapshot(tmp_path_factory.mktemp("worker") / "snapshot", base=None)
    assert snapshot.snapshot is not None
    return Image.from_snapshot(snapshot.snapshot)


def _wait_until_dead(pid: int) -> None:
    """Until the killed worker (our child) can be collected: a kill takes effect later, and its
    main thread shows as a zombie while its other threads are still exiting, when the owner
    still counts it as running."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return  # collectable; WNOWAIT leaves the collecting to the owner
        except ChildProcessError:
            return  # the owner has collected it already
        assert time.monotonic() < deadline, f"process {pid} did not exit after SIGKILL"
        time.sleep(0.02)


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_a_snapshot_image_runs_in_a_jailed_filtered_worker(image: Image) -> None:
    with image.start() as vm:
        assert vm.exec(["echo", "hi"]).stdout == b"hi\n"
        assert vm.pid is not None and vm.pid != os.getpid()
        status = _status(vm.pid)
        assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
        if os.geteuid() == 0:
            assert status["Uid"].split()[0] != "0"
            assert os.readlink(f"/proc/{vm.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert "seccomp" in vm.protections


def test_a_killed_worker_ends_only_its_vm(image: Image) -> None:
    # (A SIGBUS from a real fault is tested on raw guests: tests/vmm/test_worker.py.)
    with image.start() as victim, image.start() as survivor:
        os.kill(victim.pid or 0, signal.SIGKILL)
        outcome = victim.wait(30)
        assert outcome is not None and outcome.kind == "vmm_crash"
        assert outcome.detail == "VMM crashed: SIGKILL"
        with pytest.raises(VmmCrashedError, match="SIGKILL"):
            victim.exec(["true"])
        assert survivor.exec(["echo", "still here"]).stdout == b"still here\n"
        assert survivor.outcome is None


def test_a_pool_replaces_a_worker_that_died_idle(image: Image) -> None:
    with image.pool(min=1, max=1) as pool:
        pool.wait_ready(timeout=WARM)
        with pool.vm(timeout=WARM, reuse=True) as vm:
            pass
        assert pool.stats().idle == 1
        os.kill(vm.pid or 0, signal.SIGKILL)  # the idle VM's worker dies behind the pool's back
        _wait_until_dead(vm.pid or 0)
        with pool.vm(timeout=WARM) as fresh:
            assert fresh is not vm and fresh.outcome is None
            assert fresh.exec(["echo", "alive"]).stdout == b"alive\n"
        assert pool.stats().discarded_dead == 1
