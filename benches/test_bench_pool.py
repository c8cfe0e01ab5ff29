"""Warm pools: ``pool.acquire()`` from a warm pool vs ``Image.from_snapshot(dir).start()`` (a
restore until the guest agent answers, clock and entropy refreshed), in the same run, on the same
snapshot: a 256 MiB guest running only the agent (``rootfs=None``), booted once, untimed.

Every acquire round takes an idle VM: the VM of the previous round is released (stopped) and the
pool refilled before it, untimed. Acquiring is host-side work and meaningful on any host; on hosts
whose KVM emulates guest kernel code (kvm_pvm) the restore figure, which waits for the guest agent,
is not representative of hardware KVM.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import skip_unless_kvm
from supermachine.image import Image
from supermachine.pool import Pool
from supermachine.vm import Vm, VmConfig

ROUNDS = 10
WARM = 300.0  # seconds a restore may take on a busy emulating host
EMULATING = os.path.exists("/sys/module/kvm_pvm")
GROUP = "ready VM: warm pool acquire vs restore"


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    skip_unless_kvm()
    directory = tmp_path_factory.mktemp("pool-bench") / "snapshot"
    with Vm.start(VmConfig(memory_mib=256)) as vm:
        vm.snapshot(directory, base=None)
    return directory


@pytest.fixture
def pool(snapshot: Path) -> Iterator[Pool]:
    with Image.from_snapshot(snapshot).pool(min=1, max=2) as warm:
        yield warm


def _note(benchmark: Any) -> None:
    benchmark.extra_info["note"] = (
        "restores wait for an emulated guest here: not representative of hardware KVM"
        if EMULATING
        else "hardware KVM"
    )


@pytest.mark.benchmark(group=GROUP)
def test_acquire_from_a_warm_pool(benchmark: Any, pool: Pool) -> None:
    held: list[Vm] = []

    def refill() -> None:
        while held:
            pool.release(held.pop())
        pool.wait_ready(timeout=WARM)

    def acquire() -> None:
        held.append(pool.acquire())

    benchmark.pedantic(acquire, setup=refill, rounds=ROUNDS)
    refill()
    stats = pool.stats()
    assert stats.hits == ROUNDS and stats.misses == 0, stats  # every round took an idle VM
    assert stats.mean_restore_seconds is not None
    benchmark.extra_info["refill_restore_ms_mean"] = round(stats.mean_restore_seconds * 1e3, 1)
    _note(benchmark)


@pytest.mark.benchmark(group=GROUP)
def test_restore_from_the_snapshot(benchmark: Any, snapshot: Path) -> None:
    held: list[Vm] = []

    def stop_previous() -> None:
        while held:
            held.pop().stop()

    def restore() -> None:
        held.append(Image.from_snapshot(snapshot).start())

    benchmark.pedantic(restore, setup=stop_previous, rounds=ROUNDS)
    stop_previous()
    _note(benchmark)
