"""Warm pools on a real Linux guest: ``Image.from_snapshot(dir).pool(min, max)`` keeps restored VMs
idle, ``acquire`` hands them out, ``release`` discards them and the refill restores fresh ones.

The session's VM is snapshotted once; every VM of every pool here is a restore of that snapshot.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import supermachine
from supermachine import oci
from supermachine.errors import AgentRequestError, PoolError
from supermachine.image import Image
from supermachine.vm import Vm

pytestmark = pytest.mark.slow

WARM = 120.0  # seconds a restore may take on a busy emulating host; normally milliseconds


@pytest.fixture(scope="module")
def image(vm: Vm, tmp_path_factory: pytest.TempPathFactory) -> Image:
    # Run busybox once before the snapshot, so clones find it in their page cache instead of each
    # reading it from the squashfs again (slow where guest kernel code is emulated).
    vm.exec(["echo", "warm"], check=True)
    snapshot = vm.snapshot(tmp_path_factory.mktemp("pool") / "snapshot", base=None)
    assert snapshot.snapshot is not None
    return Image.from_snapshot(snapshot.snapshot)


def test_acquire_hands_out_an_idle_vm_and_release_replaces_it(image: Image) -> None:
    with image.pool(min=1, max=2) as pool:
        assert isinstance(pool, supermachine.Pool)
        pool.wait_ready(timeout=WARM)
        first = pool.acquire()
        stats = pool.stats()
        assert (stats.hits, stats.misses, stats.in_use) == (1, 0, 1), stats
        assert first.exec(["echo", "hi"]).stdout == b"hi\n"
        first.write_file("/tmp/user1", b"private")
        pool.release(first)
        assert first.outcome is not None and first.outcome.kind == "stopped"

        pool.wait_ready(timeout=WARM)
        with pool.vm() as second:
            assert second is not first
            assert pool.stats().hits == 2
            with pytest.raises(AgentRequestError):
                second.read_file("/tmp/user1")
        assert second.outcome is not None
        stats = pool.stats()
        print(f"pool stats: {stats}")
        assert stats.restored >= 2 and stats.failed == 0 and stats.last_error is None
        assert stats.mean_restore_seconds is not None and stats.mean_restore_seconds > 0
        with pytest.raises(PoolError, match="not in use from this pool"):
            pool.release(second)


def test_max_is_enforced_and_close_stops_every_vm(image: Image) -> None:
    pool = image.pool(min=1, max=2)
    try:
        a = pool.acquire(timeout=WARM)
        b = pool.acquire(timeout=WARM)
        with pytest.raises(PoolError, match=r"no VM became free within 0.5 s \(2 in use of max 2"):
            pool.acquire(timeout=0.5)
        # A waiter gets a VM as soon as a release frees a slot.
        with ThreadPoolExecutor(1) as executor:
            waiter = executor.submit(pool.acquire, WARM)
            pool.release(a)
            c = waiter.result()
        assert c is not a and c.outcome is None
        assert pool.stats().in_use == 2
    finally:
        pool.close()
    for machine in (a, b, c):
        assert machine.outcome is not None and machine.outcome.kind == "stopped"
    stats = pool.stats()
    assert (stats.idle, stats.in_use, stats.starting) == (0, 0, 0)
    with pytest.raises(PoolError, match="the pool is closed"):
        pool.acquire()
    pool.close()  # idempotent


def test_reuse_on_request_and_a_dead_idle_vm_is_never_handed_out(image: Image) -> None:
    with image.pool(min=1, max=1) as pool:
        with pool.vm(timeout=WARM, reuse=True) as vm:
            vm.write_file("/tmp/kept", b"1")
        with pool.vm(reuse=True) as again:
            assert again is vm and again.read_file("/tmp/kept") == b"1"
        assert pool.stats().idle == 1
        vm.stop()  # the idle VM ends behind the pool's back
        with pool.vm(timeout=WARM) as fresh:
            assert fresh is not vm and fresh.outcome is None
            assert fresh.exec(["echo", "alive"]).stdout == b"alive\n"
            with pytest.raises(AgentRequestError):
                fresh.read_file("/tmp/kept")
        assert pool.stats().discarded_dead == 1


def test_restore_failures_reach_acquire_and_the_refill_recovers(image: Image, tmp_path: Path) -> None:
    assert image.snapshot is not None
    linked = tmp_path / "linked"
    linked.mkdir()
    for file in image.snapshot.iterdir():
        os.link(file, linked / file.name)
    doomed = Image.from_snapshot(linked)
    linked.rename(tmp_path / "away")  # the snapshot disappears before the pool restores it
    with doomed.pool(min=1, max=2) as pool:
        with pytest.raises(PoolError, match=r"cannot restore a VM: .*metadata.json: missing") as raised:
            pool.acquire(timeout=WARM)
        assert "\n" not in str(raised.value)
        stats = pool.stats()
        assert stats.failed >= 1 and stats.last_error is not None and "missing" in stats.last_error
        (tmp_path / "away").rename(linked)  # back: the pool works again
        with pool.vm(timeout=WARM) as vm:
            assert vm.outcome is None
        assert pool.stats().last_error is None


def test_a_pool_needs_a_snapshot_image(rootfs: Path) -> None:
    booting = Image(ref="busybox", config=oci.ImageConfig(architecture="amd64", os="linux"), rootfs=rootfs)
    with pytest.raises(PoolError, match=r"busybox is not a snapshot image; .*vm\.snapshot\(dir\)"):
        booting.pool()


@pytest.mark.parametrize(
    ("low", "high", "message"),
    [
        (3, 2, r"min must be between 0 and max \(2\), got 3"),
        (-1, 2, r"min must be between 0 and max \(2\), got -1"),
        (0, 0, "max must be at least 1, got 0"),
    ],
)
def test_bad_sizes_are_refused(image: Image, low: int, high: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        image.pool(min=low, max=high)
