"""The first command in a restored clone against the same command run again in that clone.

One Linux VM boots on the busybox root filesystem and is snapshotted twice: ``cold``, as soon as
its agent answers (nothing has run), and ``warmed``, after the command below ran once, as
``supermachine snapshot IMAGE -- CMD`` does. Every round restores three clones in rotating order
and times the command twice in each, the whole ``vm.exec`` call: the first run after the restore
and the one after it (warm). The clones:

- ``warmed``: from the warmed snapshot, its files in the host's page cache;
- ``warmed, host cache dropped``: the same snapshot after its ``memory.bin`` and ``vmstate.bin``
  were dropped from the host's page cache, so every guest page the command touches is read from
  disk: the cost a working-set prefetch at restore would save;
- ``cold``: from the cold snapshot.

Reported per clone: the first and the warm run, and their ratio per round (first / warm). The
booted VM's own first and second run of the command are printed for comparison: a cold clone's
first run repeats the work the booted VM's first run did (reading the command's files from the
root filesystem into the guest's page cache), which no snapshot taken before it could hold.

Guest kernel work is emulated on some hosts (kvm_pvm), where the times are far longer than on
hardware KVM; the ratios between runs in the same guest are what this measures.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from conftest import busybox_squashfs, skip_unless_kvm, timed_exec
from interleave import Interleaved, report, rotation
from supermachine.vm import Vm, VmConfig

ROUNDS = 3
COMMAND = ["sh", "-c", "ls -l /bin > /dev/null && cat /etc/motd"]
CLONES = ("warmed", "warmed, host cache dropped", "cold")


class Baked(NamedTuple):
    rootfs: Path
    cold: Path
    warmed: Path
    booted_first: float
    booted_again: float


def _timed_exec(vm: Vm) -> float:
    return timed_exec(vm, COMMAND, b"hello from the rootfs\n")


def _drop_from_host_cache(snapshot: Path) -> None:
    for name in ("memory.bin", "vmstate.bin"):
        fd = os.open(snapshot / name, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages would stay cached
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.fixture(scope="module")
def baked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baked]:
    skip_unless_kvm()
    work = tmp_path_factory.mktemp("first-exec")
    rootfs = busybox_squashfs(work)
    with Vm.start(VmConfig(rootfs=rootfs, memory_mib=256, network="none")) as vm:
        vm.snapshot(work / "cold", base=None)
        first = _timed_exec(vm)
        again = _timed_exec(vm)
        vm.snapshot(work / "warmed", base=None)
    yield Baked(rootfs, work / "cold", work / "warmed", first, again)


@pytest.mark.timeout(3600)  # a cold guest's first command is emulated kernel work on some hosts
def test_first_command_after_a_restore_against_the_same_command_warm(benchmark: Any, baked: Baked) -> None:
    first: dict[str, list[float]] = {name: [] for name in CLONES}
    warm: dict[str, list[float]] = {name: [] for name in CLONES}
    snapshots = {"warmed": baked.warmed, "warmed, host cache dropped": baked.warmed, "cold": baked.cold}
    rounds = 0

    def one_round() -> None:
        nonlocal rounds
        for name in rotation(CLONES, rounds):
            if name == "warmed, host cache dropped":
                _drop_from_host_cache(baked.warmed)
            with Vm.restore(snapshots[name], rootfs=baked.rootfs) as clone:
                first[name].append(_timed_exec(clone))
                warm[name].append(_timed_exec(clone))
        rounds += 1

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    print(f"\nthe booted VM itself: first run {baked.booted_first:.2f} s, second {baked.booted_again:.2f} s")
    benchmark.extra_info["booted_first_s"] = round(baked.booted_first, 3)
    benchmark.extra_info["booted_again_s"] = round(baked.booted_again, 3)
    for name in CLONES:
        run = Interleaved[Any]("warm run", {"warm run": warm[name], "first run after restore": first[name]})
        key = name.replace(" ", "_").replace(",", "")
        report(benchmark, f"{name} clone: {' '.join(COMMAND)}", run, key=key)
