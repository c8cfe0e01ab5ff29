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

With a Dockerfile (:func:`measure_build`, the measurement supermachine's build was made for) the
Dockerfile is built first (:mod:`supermachine.build`) and what each VM reads is the files the build
made (or the paths the caller names):

* **A** restores its clones from the snapshot the build took of its VM after the last step that
  changed files. The build VM's root is the base image under a RAM-backed overlay, so the files
  its RUN steps wrote are in the snapshot's RAM, and clones share them.
* **B** cold-boots the committed image, whose root file system holds the same files on squashfs;
  each VM reads them into its own page cache.
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
from typing import TYPE_CHECKING, Literal

from supermachine.errors import InputError, VmError
from supermachine.vm import DEFAULT_ENV, Disk, Vm, VmConfig, check_kvm, guest_disk_name

if TYPE_CHECKING:
    from collections.abc import Sequence

    from supermachine.build.builder import BuildOptions, Reporter
    from supermachine.build.cache import LayerRef
    from supermachine.oci.store import BlobStore

SMAPS_ROLLUP = "/proc/self/smaps_rollup"
READ_TIMEOUT = 600.0
_BLOB_BLOCK = 1 << 20
MAX_READ_FILES = 4096
"""Most files each VM reads after a Dockerfile build (one ``dd`` each, in the guest)."""
_MAX_READ_LIST_BYTES = 1 << 20

Mode = Literal["restore", "boot"]
StepCallback = Callable[[str], object]
"""Called as each step of the measurement starts, with what it does."""
Reader = Callable[[Vm], int | None]
"""What each VM does once started so that it holds what is measured: returns the bytes it read,
when it knows them."""


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
class Golden:
    """Where mode A's snapshot came from (not counted in A)."""

    source: Literal["boot", "build"]
    """``boot``: a VM booted, read the blob and was snapshotted; ``build``: the snapshot the
    Dockerfile build took after its last file-changing step."""
    seconds: float
    """The cold boot (``boot``) or the whole build (``build``)."""
    snapshot_seconds: float | None = None
    """Writing the snapshot (``boot`` only: a build snapshots as it goes)."""

    def to_json(self) -> dict[str, object]:
        return {"source": self.source, "seconds": self.seconds, "snapshot_seconds": self.snapshot_seconds}


@dataclass(frozen=True)
class DensityReport:
    vms: int
    memory_mib: int
    read_bytes: int
    """What each VM read: the blob, or the files a build made."""
    reads: str
    """The same, in words (``a 32 MiB blob``, ``3 files the build made``)."""
    rootfs: str | None
    golden: Golden
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
            "read_bytes": self.read_bytes,
            "reads": self.reads,
            "rootfs": self.rootfs,
            "golden": self.golden.to_json(),
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
    return guest_disk_name(disk_index + (0 if config.rootfs is None else 1))


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
    :meth:`settle` makes it read what ``read`` reads and records the memory it added since just
    before its start. Every VM is stopped when the fleet is closed (``with`` block)."""

    mode: Mode
    read: Reader
    vms: list[Vm] = field(default_factory=list)
    samples: list[VmSample] = field(default_factory=list)
    read_bytes: int | None = None
    """What the last VM settled said it read, when it says."""
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
        self.read_bytes = self.read(pending.vm)
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


def blob_reader(device: str, mode: Mode) -> Reader:
    """Reads the blob device: clones inherit the snapshot's holder of the device (see
    :func:`read_blob`); booted VMs need one."""

    def read(vm: Vm) -> None:
        read_blob(vm, device, hold=mode == "boot")

    return read


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


def run_modes(
    vms: int,
    restore_one: tuple[Callable[[], Vm], str, Reader],
    boot_one: tuple[Callable[[], Vm], str, Reader],
    notify: StepCallback,
) -> tuple[ModeResult, ModeResult, int | None]:
    """Mode A then mode B, ``vms`` VMs each (each mode's VMs stopped before the next starts):
    each VM started by the mode's function (named by its text for the progress), then made to
    read by its reader. Returns both results and what A's last VM said it read."""
    modes: tuple[tuple[Mode, str, tuple[Callable[[], Vm], str, Reader]], ...] = (
        ("restore", "A", restore_one),
        ("boot", "B", boot_one),
    )
    results: list[ModeResult] = []
    read_bytes = None
    for mode, label, (start, what, reader) in modes:
        with Fleet(mode, reader) as fleet:
            for i in range(vms):
                notify(f"{label}: {what} {i + 1} of {vms}")
                fleet.add(start)
            results.append(fleet.result())
            read_bytes = fleet.read_bytes if mode == "restore" else read_bytes
    return results[0], results[1], read_bytes


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
        restore, boot, _read = run_modes(
            vms,
            # A restore attaches only the disks it is given: the same root filesystem and blob.
            (
                lambda: Vm.restore(golden, rootfs=config.rootfs, disks=config.disks),
                "restoring clone",
                blob_reader(device, "restore"),
            ),
            (lambda: Vm.start(config), "cold-booting VM", blob_reader(device, "boot")),
            notify,
        )
    return DensityReport(
        vms=vms,
        memory_mib=config.memory_mib,
        read_bytes=blob_mib << 20,
        reads=f"a {blob_mib} MiB blob",
        rootfs=None if config.rootfs is None else str(config.rootfs),
        golden=Golden("boot", golden_boot, golden_snapshot),
        restore=restore,
        boot=boot,
    )


def _check_vms(vms: int) -> None:
    if vms < 1:
        raise InputError(f"the number of VMs must be at least 1, got {vms}")


def _check(config: VmConfig, vms: int, blob_mib: int) -> None:
    _check_vms(vms)
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


# -- after a Dockerfile build -------------------------------------------------------------------

_READ_FILES = (
    "n=0; while IFS= read -r f; do"
    ' if [ ! -f "$f" ] || [ ! -r "$f" ]; then echo "$f: not a readable regular file" >&2; exit 1; fi;'
    ' b=$(dd if="$f" bs=1M 2>/dev/null | wc -c) || exit 1; n=$((n + b));'
    ' done; echo "$n"'
)
"""Reads each path named on stdin with ``dd`` (read(2) into user space, so every page is touched;
see :func:`read_blob`) and prints the bytes read in all."""


def read_files(vm: Vm, paths: Sequence[str]) -> int:
    """Reads every file of ``paths`` whole in the guest, as root; returns the bytes read."""
    listing = "".join(f"{p}\n" for p in paths).encode()
    result = vm.exec(
        ["/bin/sh", "-c", _READ_FILES],
        input=listing,
        user="0",
        env={"PATH": DEFAULT_ENV["PATH"]},
        timeout=READ_TIMEOUT,
    )
    if result.timed_out or result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()[:1] or ["no output"]
        raise VmError(f"reading the files in the guest failed (does the image have sh and dd?): {detail[0]}")
    try:
        return int(result.stdout.decode().strip())
    except ValueError:
        raise VmError("reading the files in the guest gave no byte count (does the image have wc?)") from None


def files_reader(paths: Sequence[str]) -> Reader:
    def read(vm: Vm) -> int:
        return read_files(vm, paths)

    return read


def check_read_path(path: str) -> str:
    """A guest path for ``--read``: absolute, one line, and naming no ``..``."""
    if not path.startswith("/") or "\n" in path or "\0" in path or ".." in path.split("/"):
        raise InputError(f"--read {path!r}: expected an absolute guest path without '..' or newlines")
    return path


def built_files(layers: Sequence[LayerRef], blobs: BlobStore) -> list[str]:
    """The regular files, not empty, that ``layers`` (a build's own, bottom first) leave in the
    root file system, sorted; a hard link's first path only. Read top layer first, as overlayfs
    looks paths up: a path shows unless a layer above has an entry at it, a deletion or a
    non-directory at it or above it, or an opaque directory above it."""
    import posixpath
    import tarfile

    from supermachine.oci.rootfs import open_layer

    shown: set[str] = set()
    taken: set[str] = set()  # paths a layer above has an entry at
    cut: set[str] = set()  # paths a layer above deleted, or holds a non-directory at
    opaque: set[str] = set()  # directories whose lower contents a layer above hides

    def hidden(path: str) -> bool:
        if path in taken or path in cut:
            return True
        parent = posixpath.dirname(path)
        while parent != "/":
            if parent in cut or parent in opaque:
                return True
            parent = posixpath.dirname(parent)
        return "/" in opaque

    for layer in reversed(layers):
        layer_taken: set[str] = set()
        layer_cut: set[str] = set()
        layer_opaque: set[str] = set()
        with (
            blobs.open(layer.digest) as raw,
            open_layer(raw) as stream,
            tarfile.open(fileobj=stream, mode="r|") as tar,
        ):
            for member in tar:
                path = posixpath.normpath("/" + member.name)
                parent, name = posixpath.split(path)
                if name == ".wh..wh..opq":
                    layer_opaque.add(parent)
                elif name.startswith(".wh."):
                    layer_cut.add(posixpath.join(parent, name[4:]))
                else:
                    if member.isreg() and member.size > 0 and "\n" not in path and not hidden(path):
                        shown.add(path)
                    layer_taken.add(path)
                    if not member.isdir():
                        layer_cut.add(path)
        taken |= layer_taken
        cut |= layer_cut
        opaque |= layer_opaque
    return sorted(shown)


def measure_build(
    options: BuildOptions,
    *,
    vms: int,
    read: Sequence[str] = (),
    reporter: Reporter | None = None,
    step: StepCallback | None = None,
) -> DensityReport:
    """Builds the Dockerfile of ``options`` (cached steps are taken from the build cache), then
    runs mode A (clones restored from the build's last snapshot) and mode B (cold boots of the
    built image), ``vms`` VMs each, every VM reading the files the build made or ``read``."""
    from supermachine.build.builder import build
    from supermachine.image import Image
    from supermachine.oci import build_squashfs
    from supermachine.oci.store import ImageStore
    from supermachine.snapshots import metadata

    _check_vms(vms)
    paths = [check_read_path(p) for p in read]
    check_kvm()
    notify: StepCallback = step or (lambda _description: None)
    notify("building the Dockerfile")
    started = time.monotonic()
    result = build(replace(options, step_snapshots=True), reporter)
    build_seconds = time.monotonic() - started
    snapshot, snapshot_rootfs = result.snapshot, result.snapshot_rootfs
    if snapshot is None or snapshot_rootfs is None:
        raise InputError(
            "the build has no snapshot of its VM after the last step that changed files (the "
            "target stage changes none, or the cached step's snapshot is gone: add --no-cache)"
        )
    if not paths:
        paths = built_files(result.built_layers, ImageStore().blobs)
        if not paths:
            raise InputError("the build made no file for the VMs to read: name guest files with --read")
    if len(paths) > MAX_READ_FILES:
        raise InputError(
            f"the VMs would read {len(paths)} files, more than {MAX_READ_FILES}: "
            "name the ones to read with --read"
        )
    if sum(len(p) + 1 for p in paths) > _MAX_READ_LIST_BYTES:
        raise InputError("the list of files to read is larger than 1 MiB: name fewer with --read")
    meta = metadata.load(snapshot)
    stored = result.image
    image = Image(ref=stored.ref, config=stored.config, rootfs=build_squashfs(stored), oci_image=stored)
    shape = VmConfig(memory_mib=meta.memory_mib, vcpus=meta.vcpus, network=options.network)
    reader = files_reader(paths)
    restore, boot, read_bytes = run_modes(
        vms,
        (
            lambda: Vm.restore(snapshot, rootfs=snapshot_rootfs, network=options.network),
            "restoring a clone of the build's last snapshot,",
            reader,
        ),
        (lambda: image.start(shape), "cold-booting the built image, VM", reader),
        notify,
    )
    return DensityReport(
        vms=vms,
        memory_mib=meta.memory_mib,
        read_bytes=read_bytes or 0,
        reads=f"{len(paths)} file{'s' if len(paths) != 1 else ''} "
        + ("the build made" if not read else "named with --read"),
        rootfs=str(image.rootfs),
        golden=Golden("build", build_seconds),
        restore=restore,
        boot=boot,
    )
