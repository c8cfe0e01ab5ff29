"""Host memory per VM: clones restored from one snapshot versus cold boots.

Every VM gets the same file of random bytes (the *blob*) as a read-only extra disk and reads it
whole, so the blob ends up in its guest page cache.

* **A, restored clones.** One VM is booted, reads the blob and is snapshotted (full) and stopped;
  then N clones are restored from that snapshot and each reads the blob again. The blob is already
  in the snapshot's guest page cache, and a restore maps the snapshot's RAM file copy-on-write, so
  every clone reads the very same host page-cache pages.
* **B, cold boots.** N VMs are booted from the same read-only root filesystem and each reads the
  blob into RAM of its own.

What each VM costs the host is the growth of the RSS and PSS (``smaps_rollup``) of this process
plus every VM's worker process (each VM's VMM runs in its own process; an in-process VMM adds to
this one), from just before the VM starts until it has read the blob. PSS divides each shared
page among the mappings that share it, so N clones sharing a page add one page in all; RSS counts
it N times.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Literal

from supermachine.errors import InputError, VmError
from supermachine.vm import Disk, Vm, VmConfig, check_kvm

SMAPS_ROLLUP = "/proc/self/smaps_rollup"
READ_TIMEOUT = 600.0
_BLOB_BLOCK = 1 << 20

Mode = Literal["restore", "boot"]
StepCallback = Callable[[str], object]
"""Called as each step of the measurement starts, with what it does."""


@dataclass(frozen=True)
class ProcessMemory:
    rss: int
    pss: int


def vms_memory(vms: list[Vm]) -> ProcessMemory:
    """This process's memory plus that of every VM's worker process that is still running."""
    total = process_memory()
    rss, pss = total.rss, total.pss
    for vm in vms:
        if vm.pid is not None:
            try:
                worker = process_memory(f"/proc/{vm.pid}/smaps_rollup")
            except InputError:
                continue  # gone meanwhile: it holds no memory any more
            rss, pss = rss + worker.rss, pss + worker.pss
    return ProcessMemory(rss, pss)


def process_memory(path: str = SMAPS_ROLLUP) -> ProcessMemory:
    """This process's resident and proportional set sizes, in bytes."""
    values: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if len(fields) == 2 and fields[1] == "kB":
                    values[key] = int(fields[0]) * 1024
    except OSError as exc:
        raise InputError(f"cannot read {path} (Linux 4.14 or later is needed): {exc.strerror}") from None
    return ProcessMemory(values.get("Rss", 0), values.get("Pss", 0))


@dataclass(frozen=True)
class VmSample:
    """What one VM cost: its start time, its blob read time, and the process memory it added."""

    start_seconds: float
    read_seconds: float
    rss_added: int
    pss_added: int

    def to_json(self) -> dict[str, object]:
        return {
            "start_seconds": self.start_seconds,
            "read_seconds": self.read_seconds,
            "rss_added": self.rss_added,
            "pss_added": self.pss_added,
        }


@dataclass(frozen=True)
class ModeResult:
    mode: Mode
    samples: tuple[VmSample, ...]

    @property
    def mean_rss_added(self) -> float:
        return statistics.fmean(s.rss_added for s in self.samples)

    @property
    def mean_pss_added(self) -> float:
        return statistics.fmean(s.pss_added for s in self.samples)

    @property
    def marginal_pss_added(self) -> float | None:
        """Mean PSS added by each VM after the first: what one more VM costs once the shared pages
        are mapped (``None`` with a single VM)."""
        later = [s.pss_added for s in self.samples[1:]]
        return statistics.fmean(later) if later else None

    @property
    def mean_start_seconds(self) -> float:
        return statistics.fmean(s.start_seconds for s in self.samples)

    def cumulative(self, what: Literal["rss", "pss"]) -> list[int]:
        """Memory added by the first 0, 1, ..., N VMs (N + 1 points, starting at 0)."""
        out = [0]
        for s in self.samples:
            out.append(out[-1] + (s.rss_added if what == "rss" else s.pss_added))
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "vms": [s.to_json() for s in self.samples],
            "mean_start_seconds": self.mean_start_seconds,
            "mean_rss_added": self.mean_rss_added,
            "mean_pss_added": self.mean_pss_added,
            "marginal_pss_added": self.marginal_pss_added,
            "total_rss_added": sum(s.rss_added for s in self.samples),
            "total_pss_added": sum(s.pss_added for s in self.samples),
        }


@dataclass(frozen=True)
class DensityReport:
    vms: int
    memory_mib: int
    blob_bytes: int
    rootfs: str | None
    golden_boot_seconds: float
    """Cold boot of the VM that mode A's snapshot was taken from (not counted in A)."""
    golden_snapshot_seconds: float
    restore: ModeResult
    """A: clones restored from one snapshot."""
    boot: ModeResult
    """B: cold boots."""

    @property
    def pss_ratio(self) -> float | None:
        """Mean PSS per cold-booted VM over mean PSS per restored clone (``None`` if the latter
        is not positive)."""
        return _ratio(self.boot.mean_pss_added, self.restore.mean_pss_added)

    @property
    def rss_ratio(self) -> float | None:
        return _ratio(self.boot.mean_rss_added, self.restore.mean_rss_added)

    def to_json(self) -> dict[str, object]:
        return {
            "vms": self.vms,
            "memory_mib": self.memory_mib,
            "blob_bytes": self.blob_bytes,
            "rootfs": self.rootfs,
            "golden": {
                "boot_seconds": self.golden_boot_seconds,
                "snapshot_seconds": self.golden_snapshot_seconds,
            },
            "restore": self.restore.to_json(),
            "boot": self.boot.to_json(),
            "pss_ratio": self.pss_ratio,
            "rss_ratio": self.rss_ratio,
        }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def write_blob(path: Path, size: int) -> None:
    """``size`` random bytes: incompressible and unlike anything else in guest RAM, so no page of
    it is shared by accident (zero pages, kernel same-page merging)."""
    with open(path, "wb") as f:
        for offset in range(0, size, _BLOB_BLOCK):
            f.write(os.urandom(min(_BLOB_BLOCK, size - offset)))


def guest_device(config: VmConfig, disk_index: int) -> str:
    """The guest's name for ``config.disks[disk_index]``: the root filesystem, if any, is
    ``/dev/vda`` and the extra disks follow in order."""
    index = disk_index + (0 if config.rootfs is None else 1)
    if index >= 26:
        raise InputError("too many disks: the blob would not be one of /dev/vda../dev/vdz")
    return f"/dev/vd{chr(ord('a') + index)}"


def read_blob(vm: Vm, device: str, *, hold: bool) -> None:
    """Reads the whole blob device in the guest, so it is in the guest page cache.

    ``dd`` copies every byte into user space with read(2); ``cat`` may use sendfile, which hands
    cached pages to ``/dev/null`` without touching them, so a clone would never map them.

    Linux drops a block device's page cache when its last opener closes it, so with ``hold`` a
    background process keeps the device open for the VM's lifetime (it inherits the shell's
    descriptor, opened before the read, so there is no race). A snapshot taken afterwards keeps the
    holder, and with it the cached blob, for every clone.
    """
    read = f"dd if={device} of=/dev/null bs=1M"
    if hold:
        read = f"exec 3< {device}; sleep 2147483647 > /dev/null 2>&1 & {read}"
    # The holder must outlive the command: the agent ends what an exec leaves behind unless asked.
    result = vm.exec(["sh", "-c", read], timeout=READ_TIMEOUT, keep_background=hold)
    if result.timed_out or result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()[:1] or ["no output"]
        raise VmError(f"reading {device} in the guest failed (does the image have sh and dd?): {detail[0]}")


@dataclass
class _Pending:
    vm: Vm
    before: ProcessMemory
    start_seconds: float


@dataclass
class Fleet:
    """The VMs of one mode, started one at a time. :meth:`start` starts one (timed);
    :meth:`settle` makes it read the blob and records the memory it added since just before its
    start. Every VM is stopped when the fleet is closed (``with`` block)."""

    mode: Mode
    blob_device: str
    vms: list[Vm] = field(default_factory=list)
    samples: list[VmSample] = field(default_factory=list)
    _pending: _Pending | None = None

    @property
    def pending(self) -> bool:
        """Whether the VM started last has not been settled yet."""
        return self._pending is not None

    def start(self, start: Callable[[], Vm]) -> Vm:
        if self._pending is not None:
            raise RuntimeError("settle the VM started last before starting another")
        before = vms_memory(self.vms)
        started = time.monotonic()
        vm = start()
        self.vms.append(vm)
        self._pending = _Pending(vm, before, time.monotonic() - started)
        return vm

    def settle(self) -> VmSample:
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("no VM was started since the last settle")
        started = time.monotonic()
        # Clones inherit the snapshot's holder of the device (see read_blob); booted VMs need one.
        read_blob(pending.vm, self.blob_device, hold=self.mode == "boot")
        read_seconds = time.monotonic() - started
        after = vms_memory(self.vms)
        sample = VmSample(
            start_seconds=pending.start_seconds,
            read_seconds=read_seconds,
            rss_added=after.rss - pending.before.rss,
            pss_added=after.pss - pending.before.pss,
        )
        self.samples.append(sample)
        return sample

    def add(self, start: Callable[[], Vm]) -> VmSample:
        self.start(start)
        return self.settle()

    def result(self) -> ModeResult:
        return ModeResult(self.mode, tuple(self.samples))

    def close(self) -> None:
        while self.vms:
            self.vms.pop().stop()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def with_blob(config: VmConfig, blob: Path) -> tuple[VmConfig, str]:
    """``config`` with ``blob`` as its last disk (read-only), and the blob's guest device."""
    config = replace(config, disks=(*config.disks, Disk(blob, read_only=True)))
    return config, guest_device(config, len(config.disks) - 1)


def bake_golden(config: VmConfig, device: str, target: Path) -> tuple[float, float]:
    """Boots a VM, reads the blob, writes a full snapshot to ``target`` and stops the VM.
    Returns the boot and snapshot seconds."""
    started = time.monotonic()
    with Vm.start(config) as vm:
        boot_seconds = time.monotonic() - started
        read_blob(vm, device, hold=True)
        started = time.monotonic()
        vm.snapshot(target, base=None, stop=True)
    return boot_seconds, time.monotonic() - started


def steps(vms: int) -> int:
    """How many times :func:`measure` reports a step: the golden, then one per VM in A and B."""
    return 1 + 2 * vms


def measure(
    config: VmConfig,
    *,
    vms: int,
    blob_mib: int,
    workdir: Path | None = None,
    step: StepCallback | None = None,
) -> DensityReport:
    """Runs mode A then mode B with ``vms`` VMs each, shaped by ``config`` (root filesystem,
    memory size, environment) plus the blob disk. The blob and the snapshot live in a temporary
    directory (under ``workdir``, default ``$TMPDIR``) that is removed in every case."""
    _check(config, vms, blob_mib)
    check_kvm()
    notify: StepCallback = step or (lambda _description: None)
    with tempfile.TemporaryDirectory(prefix="supermachine-density-", dir=workdir) as tmp:
        blob = Path(tmp) / "blob.bin"
        write_blob(blob, blob_mib << 20)
        config, device = with_blob(config, blob)
        golden = Path(tmp) / "golden"
        notify("booting the VM to snapshot")
        golden_boot, golden_snapshot = bake_golden(config, device, golden)
        with Fleet("restore", device) as clones:
            for i in range(vms):
                notify(f"A: restoring clone {i + 1} of {vms}")
                # A restore attaches only the disks it is given: the same root filesystem and blob.
                clones.add(lambda: Vm.restore(golden, rootfs=config.rootfs, disks=config.disks))
            restore = clones.result()
        with Fleet("boot", device) as boots:
            for i in range(vms):
                notify(f"B: cold-booting VM {i + 1} of {vms}")
                boots.add(lambda: Vm.start(config))
            boot = boots.result()
    return DensityReport(
        vms=vms,
        memory_mib=config.memory_mib,
        blob_bytes=blob_mib << 20,
        rootfs=None if config.rootfs is None else str(config.rootfs),
        golden_boot_seconds=golden_boot,
        golden_snapshot_seconds=golden_snapshot,
        restore=restore,
        boot=boot,
    )


def _check(config: VmConfig, vms: int, blob_mib: int) -> None:
    if vms < 1:
        raise InputError(f"the number of VMs must be at least 1, got {vms}")
    if blob_mib < 1:
        raise InputError(f"the blob size must be at least 1 MiB, got {blob_mib}")
    # The blob must stay in the guest page cache next to the guest's own memory.
    if blob_mib * 2 > config.memory_mib:
        raise InputError(
            f"a {blob_mib} MiB blob does not stay in the page cache of a {config.memory_mib} MiB guest; "
            "keep it under half the guest memory"
        )
    if config.rootfs is None:
        raise InputError("a root filesystem with sh and dd is needed to read the blob in the guest")
    config.validated()
