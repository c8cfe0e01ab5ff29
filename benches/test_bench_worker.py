"""What running each VM's VMM in its own jailed process (``supermachine-vmm``) costs, measured
against the in-process VMM on the very same snapshots, in the same run:

1. VMM-side restore of raw counter guests (128 MiB and 2 GiB, no kernel): until
   ``_core.Vm.restore`` returns (the VM built, its vCPUs released) with the first ``KVM_RUN``
   after it, and restore plus stop as one whole call; with the worker's own start-up phases
   (spawn, limits, hello, then the build's), so the added cost is explained.
2. ``Vm.restore`` of a small Linux guest until its agent answers (clock and entropy refreshed).
3. Host memory per clone, all-in: PSS of this process plus every worker process, for N clones of
   one warmed 256 MiB snapshot, idle and after one command each.
4. ``pool.acquire()`` from warm pools of worker-backed and in-process VMs.
5. Load: 256 worker-backed clones of one warmed snapshot alive at once, each answering a command.

Latency peers run interleaved, once each per round in rotating order, so a shared machine's slow
and fast phases fall on both alike; the timed unit of the benchmark is one whole round, and each
peer's own times (median, min, max) and the per-round ratio worker / in-process (median and
spread) go to ``extra_info`` and are printed (run with ``-s``). Host-side figures are meaningful
on any host; on hosts whose KVM emulates guest kernel code (kvm_pvm) everything that waits for the
Linux guest (the agent's answer, commands) is not representative of hardware KVM.
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import busybox_squashfs, counter_snapshots, counter_value, skip_unless_binutils, skip_unless_kvm
from supermachine import _core
from supermachine.errors import AgentTimeoutError
from supermachine.image import Image
from supermachine.pool import Pool
from supermachine.probes.density import ProcessMemory, vms_memory
from supermachine.vm import Vm, VmConfig
from supermachine.worker import VmmMode, worker_options

MiB = 1 << 20
MODES: tuple[VmmMode, VmmMode] = ("worker", "in-process")
RAW_SIZES_MIB = (128, 2048)
RAW_ROUNDS = 15
GUEST_ROUNDS = 5
POOL_ROUNDS = 8
GUEST_MEMORY_MIB = 256
CLONES = (16, 64)
EXEC_THREADS = 2
WARM = 300.0  # seconds a restore or command may take on a busy emulating host
EMULATING = os.path.exists("/sys/module/kvm_pvm")
NOTE = (
    "guest-side work is emulated on this host (kvm_pvm): waits for the guest are not representative"
    " of hardware KVM; host-side figures are"
    if EMULATING
    else "hardware KVM"
)


def _order(round_no: int) -> list[VmmMode]:
    """Both modes, the first one rotating with the round."""
    k = round_no % len(MODES)
    return [*MODES[k:], *MODES[:k]]


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _report(benchmark: Any, title: str, samples: dict[VmmMode, list[float]], key: str) -> None:
    """Each mode's median, min and max of ``samples`` (seconds) and the per-round ratio
    worker / in-process with its spread, into ``extra_info`` under ``key`` and printed."""
    info = benchmark.extra_info
    lines = [f"{title}:"]
    for mode in MODES:
        values = samples[mode]
        median, low, high = statistics.median(values), min(values), max(values)
        info[f"{key}_{mode}_median_ms"] = _ms(median)
        info[f"{key}_{mode}_min_ms"] = _ms(low)
        info[f"{key}_{mode}_max_ms"] = _ms(high)
        lines.append(
            f"  {mode:>10}: median {median * 1e3:9.3f} ms  min {low * 1e3:9.3f}  max {high * 1e3:9.3f}"
            f"  ({len(values)} rounds)"
        )
    pairs = list(zip(samples["worker"], samples["in-process"], strict=True))
    ratios = sorted(w / i for w, i in pairs)
    added = sorted(w - i for w, i in pairs)
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    info[f"{key}_ratio_median"] = round(statistics.median(ratios), 3)
    info[f"{key}_ratio_min"] = round(ratios[0], 3)
    info[f"{key}_ratio_max"] = round(ratios[-1], 3)
    info[f"{key}_ratio_q1_q3"] = [round(q1, 3), round(q3, 3)]
    info[f"{key}_added_median_ms"] = _ms(statistics.median(added))
    lines.append(
        f"  worker / in-process per round: median {statistics.median(ratios):.3f}"
        f"  (q1 {q1:.3f}, q3 {q3:.3f}, min {ratios[0]:.3f}, max {ratios[-1]:.3f});"
        f" added median {statistics.median(added) * 1e3:.3f} ms"
    )
    print("\n" + "\n".join(lines))


def _report_phases(benchmark: Any, phases: dict[VmmMode, list[dict[str, float]]], key: str) -> None:
    """The median of every start-up phase of each mode, in the order the VMM ran them."""
    info = benchmark.extra_info
    lines = [f"{key} start-up phases, median ms:"]
    for mode in MODES:
        names = list(phases[mode][0])
        medians = {n: statistics.median(p[n] for p in phases[mode]) for n in names}
        info[f"{key}_{mode}_phases_median_ms"] = {n: _ms(v) for n, v in medians.items()}
        shown = ", ".join(f"{n} {v * 1e3:.3f}" for n, v in medians.items())
        lines.append(f"  {mode:>10}: {shown} (sum {sum(medians.values()) * 1e3:.3f})")
    print("\n".join(lines))


# -- 1. VMM-side restore of raw guests ----------------------------------------------------------


@pytest.fixture(scope="module")
def raw_snapshots(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """A snapshot of a running counter guest per RAM size (in-process, untimed)."""
    skip_unless_kvm()
    skip_unless_binutils()
    return counter_snapshots(tmp_path_factory.mktemp("worker-bench-raw"), RAW_SIZES_MIB)


class _RawClones:
    """Restores raw snapshots with either VMM; each worker gets a runtime directory of its own,
    made before and removed after the timed span (as ``Vm.restore`` does for both modes)."""

    def __init__(self) -> None:
        self.runtime_dirs: dict[int, Path] = {}

    def restore(self, directory: Path, mode: VmmMode) -> Any:
        worker = None
        runtime_dir = None
        if mode == "worker":
            runtime_dir = Path(tempfile.mkdtemp(prefix="sm-bench-vm-"))
            worker = worker_options(runtime_dir, None)
        started = time.perf_counter()
        vm = _core.Vm.restore(str(directory), None, worker)
        self.last_seconds = time.perf_counter() - started
        if runtime_dir is not None:
            self.runtime_dirs[id(vm)] = runtime_dir
        return vm

    def stop(self, vm: Any) -> float:
        started = time.perf_counter()
        vm.stop()
        seconds = time.perf_counter() - started
        runtime_dir = self.runtime_dirs.pop(id(vm), None)
        if runtime_dir is not None:
            shutil.rmtree(runtime_dir, ignore_errors=True)
        return seconds


def _check_runs(vm: Any) -> None:
    before = counter_value(vm)
    deadline = time.monotonic() + 10
    while counter_value(vm) == before:
        assert time.monotonic() < deadline, "the restored guest does not run"
        time.sleep(0.001)


@pytest.mark.benchmark(group="worker vs in-process: raw restore until the call returns")
@pytest.mark.parametrize("memory_mib", RAW_SIZES_MIB)
def test_raw_restore_returns(benchmark: Any, raw_snapshots: dict[int, Path], memory_mib: int) -> None:
    """``_core.Vm.restore`` until it returns (the span timed per peer), and the first ``KVM_RUN``
    as the VMM saw it (seconds from the call); each clone is stopped after its span, untimed."""
    clones = _RawClones()
    returned: dict[VmmMode, list[float]] = {m: [] for m in MODES}
    first_run: dict[VmmMode, list[float]] = {m: [] for m in MODES}
    phases: dict[VmmMode, list[dict[str, float]]] = {m: [] for m in MODES}
    rounds = 0

    def one_round(record: bool = True) -> None:
        nonlocal rounds
        for mode in _order(rounds):
            gc.collect()
            vm = clones.restore(raw_snapshots[memory_mib], mode)
            seconds = clones.last_seconds
            _check_runs(vm)  # untimed; also makes sure the first KVM_RUN happened
            timings = vm.timings
            clones.stop(vm)
            if record:
                returned[mode].append(seconds)
                first_run[mode].append(timings.first_kvm_run)
                phases[mode].append(dict(timings.phases))
        rounds += 1

    for _ in range(2):  # warm-up: page cache, the worker binary, first-use paths
        one_round(record=False)
    benchmark.pedantic(one_round, rounds=RAW_ROUNDS, iterations=1)
    assert all(len(v) == RAW_ROUNDS for v in returned.values())
    title = f"raw {memory_mib} MiB snapshot"
    _report(benchmark, f"{title}: _core.Vm.restore until it returns", returned, "returned")
    _report(benchmark, f"{title}: first KVM_RUN, from the call", first_run, "first_kvm_run")
    _report_phases(benchmark, phases, "restore")
    benchmark.extra_info["memory_mib"] = memory_mib


@pytest.mark.benchmark(group="worker vs in-process: raw restore + stop, whole calls")
@pytest.mark.parametrize("memory_mib", RAW_SIZES_MIB)
def test_raw_restore_and_stop(benchmark: Any, raw_snapshots: dict[int, Path], memory_mib: int) -> None:
    """``_core.Vm.restore`` then ``stop`` at once: the whole life of a clone, teardown included
    (the worker process is reaped by ``stop``). The runtime directory is made and removed outside
    the span."""
    clones = _RawClones()
    whole: dict[VmmMode, list[float]] = {m: [] for m in MODES}
    stops: dict[VmmMode, list[float]] = {m: [] for m in MODES}
    rounds = 0

    def one_round(record: bool = True) -> None:
        nonlocal rounds
        for mode in _order(rounds):
            gc.collect()
            vm = clones.restore(raw_snapshots[memory_mib], mode)
            stopped = clones.stop(vm)
            if record:
                whole[mode].append(clones.last_seconds + stopped)
                stops[mode].append(stopped)
        rounds += 1

    for _ in range(2):
        one_round(record=False)
    benchmark.pedantic(one_round, rounds=RAW_ROUNDS, iterations=1)
    # Both kinds of clone really ran: one more of each, checked.
    for mode in MODES:
        vm = clones.restore(raw_snapshots[memory_mib], mode)
        _check_runs(vm)
        clones.stop(vm)
    _report(benchmark, f"raw {memory_mib} MiB snapshot: restore + stop", whole, "restore_stop")
    _report(benchmark, f"raw {memory_mib} MiB snapshot: stop alone", stops, "stop")
    benchmark.extra_info["memory_mib"] = memory_mib


# -- 2.-4. A Linux guest --------------------------------------------------------------------------


@dataclass(frozen=True)
class Guest:
    snapshot: Path
    rootfs: Path


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    """One warmed snapshot of a 256 MiB guest on a busybox root filesystem: booted once, one
    command run (busybox then sits in the guest's page cache), then snapshotted (untimed; a cold
    boot takes minutes on emulating hosts)."""
    skip_unless_kvm()
    workdir = tmp_path_factory.mktemp("worker-bench-guest")
    rootfs = busybox_squashfs(workdir)
    with Vm.start(VmConfig(rootfs=rootfs, memory_mib=GUEST_MEMORY_MIB)) as vm:
        assert vm.exec(["true"], timeout=WARM).returncode == 0
        vm.snapshot(workdir / "snapshot", base=None)
    return Guest(workdir / "snapshot", rootfs)


def _restore(guest: Guest, mode: VmmMode) -> Vm:
    return Vm.restore(guest.snapshot, rootfs=guest.rootfs, vmm=mode, boot_timeout=WARM)


@pytest.mark.benchmark(group="worker vs in-process: Vm.restore until the agent answers")
def test_guest_restore(benchmark: Any, guest: Guest) -> None:
    """``Vm.restore`` until the guest agent answered (clock and entropy refreshed), and the whole
    restore + stop; ``vm.restore_seconds`` as the library measured it."""
    answered: dict[VmmMode, list[float]] = {m: [] for m in MODES}
    library: dict[VmmMode, list[float]] = {m: [] for m in MODES}
    whole: dict[VmmMode, list[float]] = {m: [] for m in MODES}
    rounds = 0

    def one_round(record: bool = True) -> None:
        nonlocal rounds
        for mode in _order(rounds):
            gc.collect()
            started = time.perf_counter()
            vm = _restore(guest, mode)
            restored = time.perf_counter()
            vm.stop()
            ended = time.perf_counter()
            assert (vm.pid is None) == (mode == "in-process")
            assert vm.restore_seconds is not None
            if record:
                answered[mode].append(restored - started)
                library[mode].append(vm.restore_seconds)
                whole[mode].append(ended - started)
        rounds += 1

    one_round(record=False)
    benchmark.pedantic(one_round, rounds=GUEST_ROUNDS, iterations=1)
    _report(benchmark, "Linux guest: Vm.restore until the agent answers", answered, "restore")
    _report(benchmark, "Linux guest: vm.restore_seconds", library, "restore_seconds")
    _report(benchmark, "Linux guest: restore + stop", whole, "restore_stop")
    benchmark.extra_info["note"] = NOTE


LOAD_CLONES = 256
CONNECT_ATTEMPTS = 3


def _exec_all(vms: list[Vm]) -> int:
    """``true`` in every VM, two at a time; a connection the agent did not greet in time (a
    saturated emulating host: the first command after a restore faults its pages in) is tried
    again, up to ``CONNECT_ATTEMPTS`` times. Returns how many were retried."""
    retried = 0

    def run(vm: Vm) -> None:
        nonlocal retried
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                assert vm.exec(["true"], timeout=WARM).returncode == 0
                return
            except AgentTimeoutError:
                if attempt == CONNECT_ATTEMPTS - 1:
                    raise
                retried += 1

    with ThreadPoolExecutor(EXEC_THREADS) as pool:
        list(pool.map(run, vms))
    return retried


@dataclass
class Clones:
    """Clones of the warmed snapshot alive at once, and what they cost."""

    restore_seconds: list[float]
    """Each restore until its agent answered, in order (the earlier clones still running)."""
    idle_pss_mib: float
    """PSS per clone, all-in (this process and every worker), idle and after one command."""
    exec_pss_mib: float
    idle_rss_mib: float
    exec_rss_mib: float
    exec_seconds: float
    retried: int


def _run_clones(benchmark: Any, guest: Guest, mode: VmmMode, count: int) -> Clones:
    """Restores ``count`` clones one after another (the timed unit), measures memory idle, runs
    ``true`` in each, measures again; none may be lost; all are stopped at the end."""
    vms: list[Vm] = []
    restore_seconds: list[float] = []
    gc.collect()
    time.sleep(0.5)
    before = vms_memory([])

    def restore_all() -> None:
        for _ in range(count):
            started = time.perf_counter()
            vms.append(_restore(guest, mode))
            restore_seconds.append(time.perf_counter() - started)

    try:
        benchmark.pedantic(restore_all, rounds=1, iterations=1)
        assert len(vms) == count
        assert all((vm.pid is None) == (mode == "in-process") for vm in vms)
        time.sleep(0.5)
        idle = vms_memory(vms)
        started = time.perf_counter()
        retried = _exec_all(vms)
        exec_seconds = time.perf_counter() - started
        after_exec = vms_memory(vms)
        lost = [vm.outcome for vm in vms if vm.outcome is not None]
        assert not lost, f"{len(lost)} clones ended: {lost[:3]}"
    finally:
        for vm in vms:
            vm.stop()

    def per_clone(m: ProcessMemory) -> tuple[float, float]:
        return (m.pss - before.pss) / count / MiB, (m.rss - before.rss) / count / MiB

    (idle_pss, idle_rss), (exec_pss, exec_rss) = per_clone(idle), per_clone(after_exec)
    return Clones(restore_seconds, idle_pss, exec_pss, idle_rss, exec_rss, exec_seconds, retried)


@pytest.mark.benchmark(group="worker vs in-process: host memory per clone (PSS, all processes)")
@pytest.mark.parametrize("clones", CLONES)
@pytest.mark.parametrize("mode", MODES)
def test_memory_per_clone(benchmark: Any, guest: Guest, mode: VmmMode, clones: int) -> None:
    """PSS of this process plus every clone's worker process, before the clones and after, idle
    and after one ``true`` each (two at a time). The timed unit is restoring all the clones, one
    after another, each until its agent answers."""
    run = _run_clones(benchmark, guest, mode, clones)
    benchmark.extra_info.update(
        mode=mode,
        clones=clones,
        snapshot_memory_mib=GUEST_MEMORY_MIB,
        idle_pss_per_clone_mib=round(run.idle_pss_mib, 3),
        idle_rss_per_clone_mib=round(run.idle_rss_mib, 3),
        after_exec_pss_per_clone_mib=round(run.exec_pss_mib, 3),
        after_exec_rss_per_clone_mib=round(run.exec_rss_mib, 3),
        exec_all_seconds=round(run.exec_seconds, 1),
        note=NOTE,
    )
    print(
        f"\n{mode} x {clones} clones of a {GUEST_MEMORY_MIB} MiB snapshot: PSS per clone idle "
        f"{run.idle_pss_mib:.3f} MiB, after one exec {run.exec_pss_mib:.3f} MiB (RSS"
        f" {run.idle_rss_mib:.2f} / {run.exec_rss_mib:.2f}); {clones} execs took {run.exec_seconds:.1f} s"
    )


@pytest.mark.benchmark(group="worker: load, many clones of one snapshot alive at once")
def test_load_many_clones(benchmark: Any, guest: Guest) -> None:
    """``LOAD_CLONES`` worker-backed clones of the warmed snapshot alive at once: each restored
    (until its agent answers) while all the earlier ones still run, then every one answers an
    exec; none may be lost. Reports each restore's time (median, spread, and how it grows with
    the number alive) and PSS per clone, all-in. The timed unit is restoring them all."""
    run = _run_clones(benchmark, guest, "worker", LOAD_CLONES)
    seconds = run.restore_seconds
    tenth = LOAD_CLONES // 10
    q1, median, q3 = statistics.quantiles(seconds, n=4)
    first, last = statistics.median(seconds[:tenth]), statistics.median(seconds[-tenth:])
    benchmark.extra_info.update(
        clones=LOAD_CLONES,
        snapshot_memory_mib=GUEST_MEMORY_MIB,
        restore_median_ms=_ms(median),
        restore_q1_q3_ms=[_ms(q1), _ms(q3)],
        restore_min_max_ms=[_ms(min(seconds)), _ms(max(seconds))],
        restore_first_tenth_median_ms=_ms(first),
        restore_last_tenth_median_ms=_ms(last),
        idle_pss_per_clone_mib=round(run.idle_pss_mib, 3),
        after_exec_pss_per_clone_mib=round(run.exec_pss_mib, 3),
        exec_all_seconds=round(run.exec_seconds, 1),
        exec_connect_retries=run.retried,
        note=NOTE,
    )
    print(
        f"\n{LOAD_CLONES} worker clones of a {GUEST_MEMORY_MIB} MiB snapshot alive at once:"
        f" restore median {median * 1e3:.1f} ms (q1 {q1 * 1e3:.1f}, q3 {q3 * 1e3:.1f},"
        f" first tenth {first * 1e3:.1f}, last tenth {last * 1e3:.1f}); PSS per clone idle"
        f" {run.idle_pss_mib:.3f} MiB, after one exec {run.exec_pss_mib:.3f} MiB;"
        f" {LOAD_CLONES} execs took {run.exec_seconds:.1f} s ({run.retried} connects retried), none lost"
    )


@pytest.fixture
def pools(guest: Guest) -> Iterator[dict[VmmMode, Pool]]:
    image = Image.from_snapshot(guest.snapshot, rootfs=guest.rootfs)
    with (
        image.pool(min=1, max=2, vmm="worker") as worker,
        image.pool(min=1, max=2, vmm="in-process") as inproc,
    ):
        yield {"worker": worker, "in-process": inproc}


@pytest.mark.benchmark(group="worker vs in-process: warm pool acquire")
def test_pool_acquire(benchmark: Any, pools: dict[VmmMode, Pool]) -> None:
    """``pool.acquire()`` from a warm pool of each kind. Before each acquire (untimed) the VMs
    held are released and both pools are refilled, so no restore runs while one is timed."""
    held: list[tuple[Pool, Vm]] = []
    acquired: dict[VmmMode, list[float]] = {m: [] for m in MODES}
    rounds = 0

    def settle() -> None:
        while held:
            pool, vm = held.pop()
            pool.release(vm)
        for pool in pools.values():
            pool.wait_ready(timeout=WARM)
        gc.collect()

    def one_round(record: bool = True) -> None:
        nonlocal rounds
        for mode in _order(rounds):
            settle()
            started = time.perf_counter()
            vm = pools[mode].acquire()
            seconds = time.perf_counter() - started
            held.append((pools[mode], vm))
            assert (vm.pid is None) == (mode == "in-process")
            if record:
                acquired[mode].append(seconds)
        rounds += 1

    one_round(record=False)
    benchmark.pedantic(one_round, rounds=POOL_ROUNDS, iterations=1)
    settle()
    for mode, pool in pools.items():
        stats = pool.stats()
        assert stats.hits == POOL_ROUNDS + 1 and stats.misses == 0, (mode, stats)
        assert stats.mean_restore_seconds is not None
        benchmark.extra_info[f"{mode}_refill_restore_ms_mean"] = _ms(stats.mean_restore_seconds)
    _report(benchmark, "warm pool: acquire()", acquired, "acquire")
    benchmark.extra_info["note"] = NOTE
