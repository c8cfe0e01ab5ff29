"""VM snapshots: VMM-side restore latency for 128 MiB to 8 GiB of guest RAM (it should not grow
with the RAM size: memory.bin is mapped copy-on-write, never read up front), as the whole call
with phases that add up to it and the teardown after it, the sizes interleaved round by round;
the time to write a snapshot, the time to write a diff snapshot against the base the VM was
restored from as the number of dirty pages grows (side by side with a full snapshot of the same
VM), restore from a diff; and restore plus stop against QEMU's restore from a migration file, the
same guest and data on both sides, interleaved.

Every snapshot holds the same 32 MiB of non-zero data written by the host, so only the RAM size
varies. These are host-side figures and meaningful on any host; the guest does no work after the
restore that is timed here (on emulating hosts such as kvm_pvm guest kernel code would be slow)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    assemble,
    counter_snapshots,
    counter_value,
    counter_vm,
    skip_unless_binutils,
    skip_unless_kvm,
    wait_until_gone,
    worker_runtime,
    write_data,
)
from interleave import Interleaved, Spread, report, rotation
from supermachine import _core

MiB = 1 << 20
SIZES_MIB = (128, 512, 2048)
DATA_MIB = 32
EMULATING = os.path.exists("/sys/module/kvm_pvm")

# For QEMU: a PVH ELF whose 32-bit entry spins forever.
PVH_SPIN = """
.section .note.Xen, "a", @note
.balign 4
.long 4
.long 4
.long 18
.asciz "Xen"
.long _start
.text
.code32
.globl _start
_start:
1:  jmp 1b
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    skip_unless_kvm()
    skip_unless_binutils()
    return tmp_path_factory.mktemp("snapshot-bench")


@pytest.fixture(scope="module")
def snapshots(workdir: Path) -> dict[int, Path]:
    return counter_snapshots(workdir, SIZES_MIB)


@pytest.mark.parametrize("memory_mib", SIZES_MIB)
def test_snapshot_write(benchmark: Any, workdir: Path, memory_mib: int) -> None:
    """Vm.snapshot of a running VM: pause, capture, write memory.bin (32 MiB of data, the rest
    holes) and vmstate.bin with fsync, rename. A fresh VM per round (untimed)."""
    vms: list[Any] = []
    reports: list[dict[str, Any]] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        while vms:
            vms.pop().stop()
        vm = counter_vm(workdir, memory_mib)
        vms.append(vm)
        return (vm,), {}

    def snap(vm: Any) -> None:
        reports.append(vm.snapshot(str(workdir / f"bench-write-{memory_mib}")))

    benchmark.pedantic(snap, setup=setup, rounds=5)
    while vms:
        vms.pop().stop()
    benchmark.extra_info["memory_bytes"] = reports[-1]["memory_bytes"]
    for phase in reports[-1]["phases"]:
        values = [r["phases"][phase] for r in reports]
        benchmark.extra_info[f"{phase}_ms_median"] = round(statistics.median(values) * 1e3, 3)


FLAT_SIZES_MIB = (128, 512, 2048, 8192)
FLAT_ROUNDS = 16
QEMU_ROUNDS = 9


def test_restore_whole_call_and_phases_across_ram_sizes(benchmark: Any, workdir: Path) -> None:
    """The whole in-process ``_core.Vm.restore`` call, its phases and the teardown after it, for
    128 MiB to 8 GiB of RAM interleaved round by round in rotating order (the sizes share every
    phase of a noisy host alike). Reported per size: the whole call and its per-round ratio to
    128 MiB (flat in RAM size means 1.0), each phase's median, what the phases leave out of the
    call (the binding layer: converting arguments, releasing the GIL, wrapping the result), and
    the teardown (``stop`` and dropping the VM: joining the threads, closing the VM, unmapping
    RAM), timed as a span of its own."""
    snaps = counter_snapshots(workdir, FLAT_SIZES_MIB, "flat")
    names = [f"{size} MiB" for size in FLAT_SIZES_MIB]
    restores = Interleaved[None](names[0], {name: [] for name in names})
    teardowns = Interleaved[None](names[0], {name: [] for name in names})
    phases: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    rounds = 0

    def one_round(record: bool = True) -> None:
        nonlocal rounds
        for size in rotation(FLAT_SIZES_MIB, rounds):
            name = f"{size} MiB"
            gc.collect()
            started = time.perf_counter()
            vm = _core.Vm.restore(str(snaps[size]))
            restored = time.perf_counter()
            phase_times = dict(vm.timings.phases)
            stopping = time.perf_counter()
            vm.stop()
            del vm
            gc.collect()
            gone = time.perf_counter()
            if record:
                restores.times[name].append(restored - started)
                teardowns.times[name].append(gone - stopping)
                phases[name].append(phase_times | {"binding": restored - started - sum(phase_times.values())})
        rounds += 1

    one_round(record=False)
    benchmark.pedantic(one_round, rounds=FLAT_ROUNDS, iterations=1)
    # The restored guests really run on: the largest one's counter moves.
    vm = _core.Vm.restore(str(snaps[FLAT_SIZES_MIB[-1]]))
    before = counter_value(vm)
    deadline = time.monotonic() + 10
    while counter_value(vm) == before:
        assert time.monotonic() < deadline, "the restored guest does not run"
        time.sleep(0.001)
    vm.stop()
    report(benchmark, "whole in-process restore call", restores, key="restore")
    report(benchmark, "teardown after the restore (stop and drop)", teardowns, key="teardown")
    lines = [f"  {'phase (median ms [q1 q3])':<28}" + "".join(f"{n:>22}" for n in names)]
    for phase in phases[names[0]][0]:
        cells = []
        for name in names:
            spread = Spread.of([p[phase] * 1e3 for p in phases[name]])
            benchmark.extra_info[f"{name}_{phase}_ms_median"] = round(spread.median, 3)
            cells.append(f"{spread.median:.2f} [{spread.q1:.2f} {spread.q3:.2f}]")
        lines.append(f"  {phase:<28}" + "".join(f"{c:>22}" for c in cells))
    print("\nrestore phases per RAM size\n" + "\n".join(lines))


DIFF_BASE_MIB = 512
DIRTY_PAGES = (256, 4096, 32768)


@pytest.fixture(scope="module")
def diff_base(workdir: Path) -> Path:
    vm = counter_vm(workdir, DIFF_BASE_MIB)
    vm.snapshot(str(workdir / "diff-base"))
    vm.stop()
    return workdir / "diff-base"


def _restored_and_dirtied(base: Path, pages: int) -> Any:
    """A clone of ``base`` whose host wrote ``pages`` pages, every other page from 64 MiB on."""
    vm = _core.Vm.restore(str(base))
    page = os.urandom(4096)
    for i in range(pages):
        vm.write_memory(64 * MiB + 2 * i * 4096, page)
    return vm


def _snapshot_rounds(benchmark: Any, workdir: Path, base: Path, pages: int, as_diff: bool) -> None:
    vms: list[Any] = []
    reports: list[dict[str, Any]] = []
    target = workdir / f"bench-{'diff' if as_diff else 'full'}-{pages}"

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        while vms:
            vms.pop().stop()
        shutil.rmtree(target, ignore_errors=True)
        vms.append(_restored_and_dirtied(base, pages))
        return (vms[-1],), {}

    def snap(vm: Any) -> None:
        reports.append(vm.snapshot(str(target), str(base) if as_diff else None))

    benchmark.pedantic(snap, setup=setup, rounds=5)
    while vms:
        vms.pop().stop()
    last = reports[-1]
    benchmark.extra_info["dirty_pages"] = pages
    benchmark.extra_info["memory_bytes_written"] = last["memory_bytes"]
    benchmark.extra_info["allocated_bytes"] = (target / "memory.bin").stat().st_blocks * 512
    if as_diff:
        benchmark.extra_info["diff_pages"] = last["diff_pages"]
        benchmark.extra_info["compared_pages"] = last["compared_pages"]
    benchmark.extra_info["memory_ms_median"] = round(
        statistics.median(r["phases"]["memory"] for r in reports) * 1e3, 3
    )


@pytest.mark.parametrize("pages", DIRTY_PAGES)
def test_diff_snapshot_write(benchmark: Any, workdir: Path, diff_base: Path, pages: int) -> None:
    """Diff snapshot of a 512 MiB clone against the snapshot it was restored from: only the pages
    written since the restore (found in /proc/self/pagemap) are compared and stored."""
    _snapshot_rounds(benchmark, workdir, diff_base, pages, as_diff=True)


@pytest.mark.parametrize("pages", DIRTY_PAGES)
def test_full_snapshot_write_same_vm(benchmark: Any, workdir: Path, diff_base: Path, pages: int) -> None:
    """Peer of test_diff_snapshot_write: a full snapshot of the same dirtied clone."""
    _snapshot_rounds(benchmark, workdir, diff_base, pages, as_diff=False)


@pytest.mark.parametrize("kind", ("full", "diff-4096-scattered-pages"))
def test_restore_latency_diff_vs_full(benchmark: Any, workdir: Path, diff_base: Path, kind: str) -> None:
    """Restore of a 512 MiB snapshot: the full base, or a diff over it whose 4096 scattered pages
    are mapped copy-on-write run by run over the base."""
    directory = diff_base
    if kind != "full":
        directory = workdir / "restore-diff"
        if not directory.exists():
            vm = _restored_and_dirtied(diff_base, 4096)
            vm.snapshot(str(directory), str(diff_base))
            vm.stop()
    live: list[Any] = []

    def drop_previous() -> None:
        while live:
            live.pop().stop()

    benchmark.pedantic(lambda: live.append(_core.Vm.restore(str(directory))), setup=drop_previous, rounds=20)
    drop_previous()


class _Qmp:
    def __init__(self, path: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.001)
        self.buf = b""
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("QMP closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return dict(json.loads(line))

    def cmd(self, name: str, **args: Any) -> Any:
        self.sock.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        while True:
            msg = self._read()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(msg["error"])


def _qemu_cmd(qemu: str, elf: Path, memory_mib: int, qmp: Path) -> list[str]:
    return [
        qemu,
        "-M",
        "microvm,x-option-roms=off,rtc=off,acpi=off,pic=on,pit=on,isa-serial=off",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities" if EMULATING else "host",
        "-m",
        str(memory_mib),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
        "-kernel",
        str(elf),
    ]


class _QemuClone:
    """One QEMU microvm restoring the migration file: process start until QMP reports the VM
    running, and ``stop``: ``quit`` over QMP until the process is gone."""

    def __init__(self, cmd: list[str], qmp_path: Path) -> None:
        qmp_path.unlink(missing_ok=True)
        self.process = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        self.qmp = _Qmp(qmp_path)
        deadline = time.monotonic() + 120
        while self.qmp.cmd("query-status").get("status") != "running":
            assert self.process.poll() is None, "QEMU exited during the incoming migration"
            assert time.monotonic() < deadline, "QEMU did not finish the incoming migration"
            time.sleep(0.0005)

    def stop(self) -> None:
        with contextlib.suppress(EOFError):  # QEMU may close the socket before it answers
            self.qmp.cmd("quit")
        self.qmp.sock.close()
        assert self.process.wait(30) == 0


@pytest.mark.parametrize("memory_mib", (128, 2048))
def test_restore_and_stop_against_qemu(benchmark: Any, workdir: Path, memory_mib: int) -> None:
    """The same guest (one PVH ELF whose entry spins), the same RAM size and the same 32 MiB of
    data at the same guest addresses, restored and stopped by each peer, interleaved round by
    round in rotating order. The span is the whole life of a clone for every peer: from the call
    (or the process start) until the guest runs again, then the teardown until the VM (and its
    process) is gone. Peers: supermachine with its VMM in a jailed process of its own (process
    start included, as for QEMU), supermachine's in-process VMM, and QEMU microvm restoring its
    migration file (``-incoming "exec:cat FILE"``: QEMU 7 has no file migration)."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    elf = assemble(workdir, "spin", PVH_SPIN, flat=False)
    ours = workdir / f"spin-{memory_mib}"
    vm = _core.Vm.start({"kernel": str(elf), "memory_mib": memory_mib})
    addresses = write_data(vm, memory_mib, DATA_MIB)
    vm.snapshot(str(ours))
    vm.stop()

    # QEMU's guest gets the same data before it starts: the generic loader device puts a file's
    # bytes at a guest address. It keeps no migration state, so the restoring side needs none.
    chunk_file = workdir / "data-chunk.bin"
    chunk_file.write_bytes(bytes(range(256)) * (MiB // 256))
    loaders = [
        a
        for address in addresses
        for a in ("-device", f"loader,file={chunk_file},addr={address},force-raw=on")
    ]
    state = workdir / f"qemu-{memory_mib}.mig"
    qmp_path = workdir / f"qmp-{memory_mib}.sock"
    qmp_path.unlink(missing_ok=True)
    src = subprocess.Popen([*_qemu_cmd(qemu, elf, memory_mib, qmp_path), *loaders], stderr=subprocess.PIPE)
    try:
        qmp = _Qmp(qmp_path)
        time.sleep(0.2)
        # Migrated while running, so the destination resumes (a stopped source would stay paused).
        qmp.cmd("migrate", uri=f"exec:cat > {state}")
        deadline = time.monotonic() + 120
        while qmp.cmd("query-migrate").get("status") != "completed":
            assert time.monotonic() < deadline, "QEMU migration to a file did not complete"
            time.sleep(0.01)
        qmp.cmd("quit")
        src.wait(30)
    finally:
        src.kill()
        src.wait()
    incoming = [*_qemu_cmd(qemu, elf, memory_mib, qmp_path), "-incoming", f"exec:cat {state}"]

    def supermachine(worker: bool) -> Any:
        def run() -> None:
            # The worker's runtime directory is made and removed inside the span, as the product's
            # `Vm.restore` and `stop` do (QEMU needs none).
            started = time.perf_counter()
            with worker_runtime(worker) as options:
                clone = _core.Vm.restore(str(ours), None, options)
                pid = clone.pid
                clone.stop()
                del clone
                wait_until_gone(pid)
            spans.append(time.perf_counter() - started)

        return run

    def qemu_peer() -> None:
        started = time.perf_counter()
        _QemuClone(incoming, qmp_path).stop()
        spans.append(time.perf_counter() - started)

    spans: list[float] = []
    first = time.monotonic()
    qemu_peer()
    if time.monotonic() - first > 30:
        pytest.skip("QEMU takes over 30 s per restore here")
    peers = {
        "supermachine (jailed worker)": supermachine(worker=True),
        "supermachine (in-process)": supermachine(worker=False),
        "qemu microvm -incoming": qemu_peer,
    }
    run = Interleaved[None]("supermachine (jailed worker)", {name: [] for name in peers})
    rounds = 0

    def one_round(record: bool = True) -> None:
        nonlocal rounds
        for name in rotation(list(peers), rounds):
            gc.collect()
            spans.clear()
            peers[name]()
            if record:
                run.times[name].append(spans[0])
        rounds += 1

    one_round(record=False)
    benchmark.pedantic(one_round, rounds=QEMU_ROUNDS, iterations=1)
    report(benchmark, f"restore + stop of the same {memory_mib} MiB guest and data", run)
    benchmark.extra_info["migration_file_bytes"] = state.stat().st_size
    benchmark.extra_info["memory_bin_bytes"] = (ours / "memory.bin").stat().st_blocks * 512


def _rollup() -> dict[str, int]:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def test_clones_share_memory(benchmark: Any, snapshots: dict[int, Path]) -> None:
    """Eight clones of the 512 MiB snapshot, each with its 32 MiB of data read: the data pages
    come from one page cache copy (proportional set size grows by about 32 MiB, not 8 x 32 MiB);
    only pages a clone writes become its own. The timed part is the eight restores."""
    clones: list[Any] = []

    def drop() -> None:
        while clones:
            clones.pop().stop()
        gc.collect()

    def restore_eight() -> None:
        clones.extend(_core.Vm.restore(str(snapshots[512])) for _ in range(8))

    benchmark.pedantic(restore_eight, setup=drop, rounds=3)
    drop()
    before = _rollup()
    restore_eight()
    for vm in clones:
        for i in range(DATA_MIB):
            vm.read_memory((4 + i * (512 - 8) // DATA_MIB) * MiB, MiB)
    after = _rollup()
    drop()
    grown_pss = after.get("Pss", 0) - before.get("Pss", 0)
    grown_rss = after.get("Rss", 0) - before.get("Rss", 0)
    benchmark.extra_info["clones"] = 8
    benchmark.extra_info["data_read_per_clone_mib"] = DATA_MIB
    benchmark.extra_info["rss_growth_mib"] = round(grown_rss / MiB, 1)
    benchmark.extra_info["pss_growth_mib"] = round(grown_pss / MiB, 1)
