"""Booting a Linux microVM on KVM and running commands in it.

::

    from supermachine.vm import Vm, VmConfig

    with Vm.start(VmConfig(rootfs="image.squashfs")) as vm:
        print(vm.exec(["/bin/echo", "hi"]).stdout)  # b"hi\\n"

Each VM's VMM runs in its own jailed process (``supermachine-vmm``: Rust, one thread per vCPU;
see :mod:`supermachine.worker`), so a crash ends only that VM; the guest runs supermachine's
kernel and, as PID 1, its agent, which mounts ``rootfs`` (read-only, with a tmpfs overlay for
writes) and serves commands over vsock. Each call opens its own agent connection, so a ``Vm`` may be used from
several threads at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Literal, cast

from supermachine import _core, agent, initramfs, kernel, transfer, volumes, worker
from supermachine import changes as _changes
from supermachine import forward as _forward
from supermachine import network as _net
from supermachine.agent import ExecResult, Process
from supermachine.errors import (
    AgentRequestError,
    AgentUnreachable,
    CommandFailedError,
    ExecTimeoutError,
    ExportError,
    GuestPanickedError,
    ImageNotFoundError,
    InputError,
    KvmUnavailableError,
    NetworkError,
    ProtocolError,
    SnapshotError,
    SupermachineError,
    VmConfigError,
    VmError,
    VmmCrashedError,
    VmOutOfMemoryError,
    VolumeError,
)
from supermachine.network import Network, NetworkInfo, NetworkMode
from supermachine.worker import IoLimit, Limits, VmmMode

if TYPE_CHECKING:
    from typing import BinaryIO

    from supermachine.image import Image
    from supermachine.oci import image as oci_image
    from supermachine.oci.commit import ConfigChanges
    from supermachine.snapshots.bake import BaseChoice
    from supermachine.snapshots.metadata import FileIdentity, ImageIdentity, SnapshotMetadata

log = logging.getLogger(__name__)

__all__ = [
    "Disk",
    "ExecResult",
    "IoLimit",
    "Limits",
    "Network",
    "Outcome",
    "Process",
    "SharedFolder",
    "Vm",
    "VmConfig",
    "VolumeMount",
    "parse_mount",
]

CpuTemplate = Literal["auto", "normal", "compat"]
Argument = str | bytes | os.PathLike[str]

DEFAULT_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
}
VOLUME_UNMOUNT_TIMEOUT = 30.0
"""Most seconds :meth:`Vm.stop` waits for the guest to unmount its read-write volumes."""
LINUX_MIN_MEMORY_MIB = 64
"""Least guest RAM a Linux guest with the agent boots in (the VMM's own minimum, for freestanding
guests, is 1 MiB); the VMM owns the other defaults and limits (``_core.DEFAULT_MEMORY_MIB``...)."""
_PANIC_LINE = re.compile(rb"Kernel panic - not syncing:[^\r\n]*")


@dataclass(frozen=True)
class Disk:
    """A raw disk image given to the guest as a virtio-blk device (``/dev/vdb``, ``/dev/vdc``...)."""

    path: Path
    read_only: bool = True


@dataclass(frozen=True)
class VolumeMount:
    """A named volume (``supermachine volume create NAME``) mounted at ``target`` in the guest
    (``-v NAME:TARGET[:ro]``). It is attached as a virtio-blk disk after :attr:`VmConfig.disks`,
    and only one running VM may attach a volume read-write."""

    name: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class SharedFolder:
    """A host folder shared with the guest and mounted at ``target`` (virtio-fs; ``-v
    HOST_DIR:TARGET[:ro]``). The guest sees its files as they are on the host, and its changes
    are made there at once.

    The VMM's file server works in the folder for the guest, confined beneath it: it never
    follows a symbolic link on the host, opens only regular files and directories, makes no
    device nodes and drops set-id bits. It works with the rights of the VM's worker process: when
    supermachine runs as root, the owner of the read-write folders (which must not be root), or
    the unprivileged jail user when every folder is read-only; otherwise the calling user."""

    host_dir: Path | str
    target: str
    read_only: bool = False


def parse_mount(spec: str) -> VolumeMount | SharedFolder:
    """docker's ``-v``: ``HOST_DIR:/guest/dir[:ro]`` shares a host folder (``HOST_DIR`` starts
    with ``/``, ``.`` or ``~``); ``NAME:/guest/dir[:ro]`` mounts the named volume ``NAME``."""
    source, _, rest = spec.partition(":")
    target, _, mode = rest.partition(":")
    if not source or mode not in ("", "ro", "rw"):
        raise InputError(f"-v {spec!r}: expected NAME:/GUEST/DIR[:ro] or HOST_DIR:/GUEST/DIR[:ro]")
    _check_guest_dir(target, f"-v {spec!r}")
    if source.startswith(("/", ".", "~")):
        return SharedFolder(Path(source).expanduser().absolute(), target, read_only=mode == "ro")
    volumes.check_name(source)
    return VolumeMount(source, target, read_only=mode == "ro")


def _check_guest_dir(target: str, what: str) -> None:
    """Refuses a mount target the agent would refuse, before anything starts."""
    if not target.startswith("/") or target.rstrip("/") == "" or "\0" in target:
        raise InputError(f"{what}: the guest directory must be an absolute path below /")
    if ".." in target.split("/"):
        raise InputError(f"{what}: the guest directory may not contain '..'")


@dataclass(frozen=True)
class VmConfig:
    """What to boot. Every field has a default that works; only ``rootfs`` is usually given."""

    rootfs: Path | str | None = None
    """Root filesystem image (squashfs by default) mounted read-only as ``/`` with a tmpfs overlay.
    ``None`` runs commands in the agent's own initramfs (only the agent is there)."""
    rootfs_type: str = "squashfs"
    memory_mib: int = _core.DEFAULT_MEMORY_MIB
    """Guest RAM, from :data:`LINUX_MIN_MEMORY_MIB` to ``_core.MAX_MEMORY_MIB``."""
    vcpus: int = _core.DEFAULT_VCPUS
    """vCPUs, from 1 to ``_core.MAX_VCPUS``."""
    kernel: Path | str | None = None
    """``vmlinux`` to boot; default: supermachine's kernel for this host and number of vCPUs
    (:func:`supermachine.kernel.default_profile`), built on first use."""
    initramfs: Path | str | None = None
    """Initramfs whose ``/init`` is the agent; default: built from the bundled agent."""
    disks: tuple[Disk, ...] = ()
    kernel_args: str = ""
    """Extra kernel command-line parameters, appended."""
    cpu_template: CpuTemplate = "auto"
    """CPUID template: ``normal`` for hardware KVM, ``compat`` for hosts that emulate guest kernel
    code (nested ``kvm_pvm``); ``auto`` picks by host."""
    boot_timeout: float = 300.0
    """Seconds to wait for the agent to answer after the VMM starts."""
    console_log: Path | str | None = None
    """Also write the serial console to this file."""
    quiet: bool = True
    """Boot with ``quiet``: fewer console writes, which are slow on emulating hosts. Errors and
    panics are still printed."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Default environment of every command (``exec`` may replace it)."""
    workdir: str | None = None
    """Default working directory of every command (default ``/``)."""
    user: str | None = None
    """Default user of every command: ``name``, ``uid``, ``name:group`` or ``uid:gid``
    (default root)."""
    limits: Limits | None = None
    """Resource limits of the VM's worker process (memory, CPU, threads); default none."""
    io_limit: IoLimit | None = None
    """Block I/O rate limits of each disk (root filesystem included); default none."""
    vmm: VmmMode = "worker"
    """Where the VMM runs: its own jailed process (default), or ``"in-process"`` threads of this
    process, without isolation (for measuring the worker's cost)."""
    network: Network | NetworkMode = "egress"
    """The VM's network (see :mod:`supermachine.network`): ``"egress"`` (default, like ``docker
    run``: outbound connections to the internet, nothing published), ``"none"`` (no network
    card at all), or a :class:`~supermachine.network.Network` with allow/deny rules and ports."""
    volumes: tuple[VolumeMount, ...] = ()
    """Named volumes to mount (needs a root filesystem: they are mounted in it)."""
    mounts: tuple[SharedFolder, ...] = ()
    """Host folders to share (needs a root filesystem: they are mounted in it). A snapshot
    unmounts them in the guest and mounts them again; a clone shares the folders its restore
    names (:meth:`Vm.restore`)."""

    def validated(self) -> VmConfig:
        if not LINUX_MIN_MEMORY_MIB <= self.memory_mib <= _core.MAX_MEMORY_MIB:
            raise VmError(
                f"memory_mib must be between {LINUX_MIN_MEMORY_MIB} and {_core.MAX_MEMORY_MIB},"
                f" got {self.memory_mib}"
            )
        if not 1 <= self.vcpus <= _core.MAX_VCPUS:
            raise VmError(f"vcpus must be between 1 and {_core.MAX_VCPUS}, got {self.vcpus}")
        if self.boot_timeout <= 0:
            raise VmError(f"boot_timeout must be positive, got {self.boot_timeout}")
        for path, what in [(self.rootfs, "rootfs"), (self.kernel, "kernel"), (self.initramfs, "initramfs")]:
            if path is not None and not Path(path).is_file():
                raise VmError(f"{what} {path} does not exist or is not a file")
        for disk in self.disks:
            if not Path(disk.path).is_file():
                raise VmError(f"disk {disk.path} does not exist or is not a file")
        if self.vmm not in ("worker", "in-process"):
            raise VmError(f"vmm must be 'worker' or 'in-process', got {self.vmm!r}")
        Network.of(self.network)
        self._check_mounts()
        return self

    def _check_mounts(self) -> None:
        if (self.mounts or self.volumes) and self.rootfs is None:
            raise VmConfigError("shared folders and volumes need a root filesystem to be mounted in")
        for mount in self.mounts:
            _check_guest_dir(mount.target, f"shared folder {mount.host_dir}")
            if not Path(mount.host_dir).is_dir():
                raise VmConfigError(f"shared folder {mount.host_dir} does not exist or is not a directory")
        targets = [m.target.rstrip("/") for m in self.mounts] + [v.target.rstrip("/") for v in self.volumes]
        for target in targets:
            if targets.count(target) > 1:
                raise VmConfigError(f"two mounts share the guest directory {target}")


@dataclass(frozen=True)
class Outcome:
    """How a VM ended."""

    kind: Literal["poweroff", "reset", "panic", "crash", "stopped", "vmm_crash", "oom"]
    """``vmm_crash``: the VM's VMM process died (the detail says how, e.g. ``VMM crashed:
    SIGBUS``); ``oom``: it exceeded its memory limit and was killed."""
    detail: str = ""
    code: int | None = None


_OUTCOME_KINDS = ("poweroff", "reset", "panic", "crash", "stopped", "vmm_crash", "oom")


def _vmm_failure(exc: Exception, what: str, wrap: type[SupermachineError]) -> SupermachineError:
    """``exc`` from ``_core`` as one line prefixed with ``what``, keeping its own
    :mod:`supermachine.errors` class (``wrap`` for a plain builtin error)."""
    cls = type(exc) if isinstance(exc, SupermachineError) else wrap
    return cls(f"{what}: {exc}")


def check_kvm(path: str = "/dev/kvm") -> None:
    """Raises :class:`KvmUnavailableError` naming the reason if KVM cannot be used here."""
    if not os.path.exists(path):
        raise KvmUnavailableError(f"{path} does not exist: this host has no KVM (no virtualization support?)")
    if not os.access(path, os.R_OK | os.W_OK):
        raise KvmUnavailableError(f"{path} is not accessible: add this user to the 'kvm' group")


class Vm:
    """A running microVM. Use :meth:`start`; stop it with :meth:`stop` or a ``with`` block."""

    def __init__(
        self,
        handle: _core.Vm,
        config: VmConfig,
        runtime_dir: Path,
        *,
        kernel_path: Path | FileIdentity | None = None,
        initramfs_path: Path | FileIdentity | None = None,
        image: ImageIdentity | None = None,
        run_defaults: tuple[tuple[str, ...] | None, tuple[str, ...] | None] = (None, None),
        snapshot_dir: Path | None = None,
        net: _net.Backend | None = None,
    ) -> None:
        self._handle = handle
        self._net = net
        self._forwards: dict[_forward.HostAddress, _forward.PortForward] = {}
        self.config = config
        self._runtime_dir = runtime_dir
        self._vsock = runtime_dir / "vsock.sock"
        self._stopped = False
        self._volumes: list[volumes.Attachment] = []
        self._unmounted_for_snapshot = False
        self._lock = threading.Lock()
        self._kernel_path = kernel_path
        self._initramfs_path = initramfs_path
        self._image = image
        self._entrypoint_cmd = run_defaults
        self.snapshot_dir = snapshot_dir
        """The snapshot this VM was restored from (``None`` after a boot)."""
        self.restore_seconds: float | None = None
        """Seconds of the whole :meth:`restore` call (``None`` after a boot)."""
        self.restore_phases: dict[str, float] | None = None
        """Seconds per phase of the :meth:`restore` call, in order, adding up to
        :attr:`restore_seconds` (``None`` after a boot): ``checks`` (the metadata, the RAM file's
        identity, the disks and volumes), ``vmm`` (runtime directory, network backend and the
        VMM's restore, which ``timings.phases`` breaks down), ``agent`` (until the agent answered,
        the guest clock and entropy refreshed) and ``mounts`` (volumes and shared folders mounted
        in the guest)."""
        self.refreshed: agent.SyncResult | None = None
        """What the agent did about the guest clock and entropy after the restore (``None`` after
        a boot, or when the snapshot's agent is too old to be asked)."""

    # -- life cycle ---------------------------------------------------------------------------

    @classmethod
    def start(cls, config: VmConfig | None = None, **overrides: object) -> Vm:
        """Boots a VM and returns once its agent answers.

        ``Vm.start(rootfs="x.squashfs", memory_mib=256)`` is short for
        ``Vm.start(VmConfig(rootfs=..., memory_mib=...))``.
        """
        if config is None:
            config = VmConfig(**overrides)  # type: ignore[arg-type]
        elif overrides:
            raise TypeError("pass either a VmConfig or keyword arguments, not both")
        return cls._boot(config)

    @classmethod
    def _boot(
        cls,
        config: VmConfig,
        *,
        image: ImageIdentity | None = None,
        run_defaults: tuple[tuple[str, ...] | None, tuple[str, ...] | None] = (None, None),
    ) -> Vm:
        config = config.validated()
        check_kvm()
        if config.kernel is not None:
            vmlinux = Path(config.kernel)
        else:
            vmlinux = kernel.kernel_path(kernel.default_profile(vcpus=config.vcpus))
        initrd = Path(config.initramfs) if config.initramfs is not None else initramfs.initramfs_path()
        runtime_dir = _new_runtime_dir()
        disks: list[_core.VmDisk] = []
        if config.rootfs is not None:
            disks.append({"path": str(config.rootfs), "read_only": True})
        disks += [{"path": str(d.path), "read_only": d.read_only} for d in config.disks]
        attached = _attach_volumes(config)
        disks += [{"path": str(a.volume.path), "read_only": a.read_only} for a in attached]
        disks = _with_io_limit(disks, config.io_limit)
        core_config: _core.MachineConfig = {
            "kernel": str(vmlinux),
            "initramfs": str(initrd),
            "cmdline": _cmdline(config),
            "memory_mib": config.memory_mib,
            "vcpus": config.vcpus,
            "disks": disks,
            "vsock_path": str(runtime_dir / "vsock.sock"),
            "console_log": None if config.console_log is None else str(config.console_log),
            "cpu_template": config.cpu_template,
        }
        if config.mounts:
            core_config["mounts"] = _core_mounts(config.mounts)
        try:
            net = _start_network(Network.of(config.network), runtime_dir, core_config)
        except BaseException:
            shutil.rmtree(runtime_dir, ignore_errors=True)
            _release(attached)
            raise
        try:
            handle = _core.Vm.start(
                core_config, _worker(config.vmm, runtime_dir, config.limits, _shared_folder_owner(config))
            )
        except (OSError, RuntimeError, ValueError) as exc:
            if net is not None:
                net.stop()
            shutil.rmtree(runtime_dir, ignore_errors=True)
            _release(attached)
            raise _vmm_failure(exc, "cannot start the VM", VmError) from None
        except BaseException:
            _release(attached)
            raise
        finally:
            if net is not None:
                net.handed_over()
        vm = cls(
            handle,
            config,
            runtime_dir,
            kernel_path=vmlinux,
            initramfs_path=initrd,
            image=image,
            run_defaults=run_defaults,
            net=net,
        )
        vm._volumes = attached
        try:
            vm._wait_for_agent(config.boot_timeout)
            vm._mount_volumes(config)
            vm._mount_shared_folders(config)
        except BaseException:
            vm.stop()
            raise
        return vm

    def _mount_volumes(self, config: VmConfig, only: Sequence[int] | None = None) -> None:
        """Mounts each attached volume (or those at the positions ``only`` names) at its target
        (its disk follows the root filesystem and :attr:`VmConfig.disks`)."""
        first = len(config.disks) + (0 if config.rootfs is None else 1)
        for index, (mount, attachment) in enumerate(zip(config.volumes, self._volumes, strict=True)):
            if only is not None and index not in only:
                continue
            device = guest_disk_name(first + index)
            with self._client() as client:
                try:
                    client.mount(device, mount.target, read_only=attachment.read_only)
                except AgentRequestError as exc:
                    what = f"volume {mount.name} on {mount.target}"
                    if attachment.read_only and exc.errno == errno.EROFS:
                        raise VolumeError(
                            f"cannot mount {what} read-only: its last VM did not unmount it (a crash?);"
                            " attach it read-write once to replay its journal"
                        ) from None
                    raise VolumeError(f"cannot mount {what}: {exc}") from None

    def _mount_shared_folders(self, config: VmConfig, only: Sequence[int] | None = None) -> None:
        """Mounts each shared folder (or those at the positions ``only`` names) at its target,
        by its device's tag."""
        for index, mount in enumerate(config.mounts):
            if only is not None and index not in only:
                continue
            tag = _share_tag(index)
            with self._client() as client:
                try:
                    client.mount(tag, mount.target, fstype="virtiofs", read_only=mount.read_only)
                except AgentRequestError as exc:
                    what = f"the shared folder {mount.host_dir} on {mount.target}"
                    raise VmError(f"cannot mount {what}: {exc}") from None

    def _unmount_for_snapshot(self) -> None:
        """Unmounts every volume and shared folder in the guest, or none: one in use refuses the
        snapshot (what was already unmounted is mounted again). A snapshot must not carry their
        state: a volume's page cache and journal, a shared folder's open nodes."""
        targets = [(f"volume {m.name}", m.target) for m in self.config.volumes]
        targets += [("the shared folder", m.target) for m in self.config.mounts]
        self._unmounted_for_snapshot = True
        for done, (what, target) in enumerate(targets):
            try:
                with self._client() as client:
                    client.unmount(target)
            except AgentRequestError as exc:
                self._mount_after_snapshot(done)
                if exc.errno == errno.EBUSY:
                    raise SnapshotError(
                        f"the guest is using {what} on {target} (an open file or a working directory"
                        " there): end what uses it before a snapshot"
                    ) from None
                raise SnapshotError(f"cannot unmount {what} on {target} for the snapshot: {exc}") from None

    def _mount_after_snapshot(self, count: int | None = None) -> None:
        """Mounts again the first ``count`` (default: all) of what :meth:`_unmount_for_snapshot`
        unmounts, in its order: the volumes, then the shared folders."""
        volume_count = len(self.config.volumes)
        count = volume_count + len(self.config.mounts) if count is None else count
        self._unmounted_for_snapshot = False
        self._mount_volumes(self.config, only=range(min(count, volume_count)))
        self._mount_shared_folders(self.config, only=range(max(count - volume_count, 0)))

    def _unmount_volumes(self) -> None:
        """Unmounts the read-write volumes before the VM stops (best effort, at most
        :data:`VOLUME_UNMOUNT_TIMEOUT` seconds), so their journals are clean for the next VM."""
        writable = [m for m, a in zip(self.config.volumes, self._volumes, strict=False) if not a.read_only]
        if not writable or self.outcome is not None or self._unmounted_for_snapshot:
            return
        deadline = time.monotonic() + VOLUME_UNMOUNT_TIMEOUT
        for mount in writable:
            try:
                connect = min(agent.CONNECT_TIMEOUT, _seconds_left(deadline))
                with agent.connect_vsock_uds(self._vsock, timeout=connect) as client:
                    client.unmount(mount.target, timeout=_seconds_left(deadline))
            except SupermachineError as exc:
                log.warning("volume %s was not unmounted before the VM stopped: %s", mount.name, exc)

    @classmethod
    def restore(
        cls,
        snapshot_dir: str | os.PathLike[str],
        *,
        rootfs: str | os.PathLike[str] | None = None,
        disks: Sequence[Disk] = (),
        base: str | os.PathLike[str] | None = None,
        console_log: Path | str | None = None,
        boot_timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        limits: Limits | None = None,
        io_limit: IoLimit | None = None,
        vmm: VmmMode = "worker",
        network: Network | NetworkMode | None = None,
        mounts: Sequence[SharedFolder] = (),
        volumes: Sequence[VolumeMount] = (),
    ) -> Vm:
        """Restores a VM from a snapshot directory written by :meth:`snapshot` and returns once its
        agent answers. Guest RAM maps the snapshot (and, for a diff, its base) copy-on-write, so
        this costs the same for any RAM size. The guest's wall clock and entropy are refreshed
        first, so clones of one snapshot do not share random state.

        No host path recorded in the snapshot is opened: the root filesystem of an OCI image's
        snapshot is the image cache's for the image's config digest (or ``rootfs``); a snapshot of
        a VM booted on a bare root filesystem needs ``rootfs`` with the same content; the VM's extra
        disks must be passed as ``disks``, in order; a diff's base is its sibling snapshot in the
        same store (or ``base``).

        ``env``, ``workdir`` and ``user`` replace the defaults saved with the snapshot; ``limits``,
        ``io_limit`` and ``vmm`` are as in :class:`VmConfig`.

        A snapshot of a VM with a network card restores with one: ``network`` (default
        ``"egress"``) gives its policy and ports, and the clone gets its own address and MAC, its
        guest's old TCP connections are reset and its DNS settings kept; ``"none"`` keeps the card
        but refuses every destination. A snapshot without a card restores without one.

        A snapshot of a VM with shared folders needs as many ``mounts``, in order: the clone
        shares those host folders (a folder the snapshot had read-only stays read-only) and
        mounts them where each says. Likewise a snapshot of a VM with named volumes needs as many
        ``volumes`` (after ``disks``), attached and mounted as :meth:`start` attaches them.
        """
        from supermachine.snapshots import attach, metadata

        phases = _Phases()
        directory = Path(snapshot_dir)
        meta = metadata.load(directory)
        saved = meta.run or metadata.RunDefaults()
        info = _snapshot_info(directory)
        attach.check_state_matches(directory, meta, info)
        root = attach.snapshot_rootfs(directory, meta, rootfs)
        config = VmConfig(
            rootfs=root,
            memory_mib=meta.memory_mib,
            vcpus=meta.vcpus,
            disks=tuple(disks),
            console_log=console_log,
            boot_timeout=boot_timeout,
            env=dict(saved.env) if env is None else dict(env),
            workdir=saved.workdir if workdir is None else workdir,
            user=saved.user if user is None else user,
            limits=limits,
            io_limit=io_limit,
            vmm=vmm,
            network=_restored_network(directory, info, network),
            mounts=tuple(mounts),
            volumes=tuple(volumes),
        )
        config._check_mounts()
        _check_restored_shares(directory, info, config.mounts)
        run_as = _shared_folder_owner(config)
        held = _attach_volumes(config)
        try:
            vm = cls._restore_attached(directory, meta, info, config, held, disks, base, run_as, phases)
        except BaseException:
            _release(held)
            raise
        try:
            vm._wait_for_agent(boot_timeout, refresh=True)
            phases.mark("agent")
            vm._mount_volumes(config)
            vm._mount_shared_folders(config)
            phases.mark("mounts")
        except BaseException:
            vm.stop()
            raise
        vm.restore_phases = phases.durations
        vm.restore_seconds = sum(phases.durations.values())
        return vm

    @classmethod
    def _restore_attached(
        cls,
        directory: Path,
        meta: SnapshotMetadata,
        info: _core.SnapshotInfo,
        config: VmConfig,
        held: list[volumes.Attachment],
        disks: Sequence[Disk],
        base: str | os.PathLike[str] | None,
        run_as: tuple[int, int] | None,
        phases: _Phases,
    ) -> Vm:
        """:meth:`restore` once its volumes are held: the VMM restored, its agent not yet asked.
        Marks the ``checks`` and ``vmm`` phases."""
        from supermachine.snapshots import attach, metadata, verify

        saved = meta.run or metadata.RunDefaults()
        volume_disks: list[_core.VmDisk] = [
            {"path": str(a.volume.path), "read_only": a.read_only} for a in held
        ]
        attached = attach.restore_disks(directory, config.rootfs, disks, info, volume_disks)
        base_dir = attach.base_override(directory, meta, info, base)
        verify.check_ram(directory, meta, base_dir)
        check_kvm()
        phases.mark("checks")
        io_limit, console_log, vmm = config.io_limit, config.console_log, config.vmm
        runtime_dir = _new_runtime_dir()
        overrides: _core.VmRestoreOverrides = {
            "vsock_path": str(runtime_dir / "vsock.sock"),
            "disks": _with_io_limit(attached, io_limit),
        }
        if config.mounts:
            overrides["mounts"] = _core_mounts(config.mounts)
        if console_log is not None:
            overrides["console_log"] = str(console_log)
        if base_dir is not None:
            overrides["base"] = base_dir
        net: _net.Backend | None = None
        try:
            if info["net"]:
                net = _start_network(Network.of(config.network), runtime_dir, overrides, card_required=True)
            handle = _core.Vm.restore(
                str(directory), overrides, _worker(vmm, runtime_dir, config.limits, run_as)
            )
        except (OSError, RuntimeError, ValueError) as exc:
            if net is not None:
                net.stop()
            shutil.rmtree(runtime_dir, ignore_errors=True)
            raise _vmm_failure(exc, f"cannot restore {directory}", SnapshotError) from None
        except BaseException:
            if net is not None:
                net.stop()
            shutil.rmtree(runtime_dir, ignore_errors=True)
            raise
        finally:
            if net is not None:
                net.handed_over()
        vm = cls(
            handle,
            config,
            runtime_dir,
            # The kernel and agent as recorded: a later snapshot carries them forward without
            # opening the paths the metadata names.
            kernel_path=meta.kernel,
            initramfs_path=meta.agent,
            image=meta.image,
            run_defaults=(saved.entrypoint, saved.cmd),
            snapshot_dir=directory,
            net=net,
        )
        vm._volumes = held
        phases.mark("vmm")
        return vm

    def snapshot(
        self,
        directory: str | os.PathLike[str],
        *,
        base: BaseChoice = "auto",
        stop: bool = False,
    ) -> Image:
        """Writes a snapshot of this VM to ``directory`` and returns it as an :class:`Image` whose
        :meth:`~supermachine.image.Image.start` restores it in milliseconds.

        The VM is paused while its state is captured, then resumed (or stopped with ``stop``).
        ``base="auto"`` (default) stores the snapshot as a diff against its golden: the newest
        compatible full snapshot beside ``directory`` (same image, memory size and supermachine
        version), unless ``SUPERMACHINE_AUTO_DEDUP=0``; ``base=None`` writes a full snapshot;
        a path names the base snapshot directory.

        The guest unmounts its volumes and shared folders for the snapshot and mounts them again
        after it (a clone mounts those its restore names); one the guest is using (an open file,
        a working directory there) refuses the snapshot, and nothing is written.
        """
        from supermachine.image import Image
        from supermachine.snapshots import attach, bake, metadata

        if self._stopped:
            raise VmError("the VM was stopped")
        self._raise_if_ended("before the snapshot")
        if self._kernel_path is None or self._initramfs_path is None:
            raise SnapshotError("this VM was not started by Vm.start or Vm.restore; it cannot be snapshotted")
        identity = self._image or bake.rootfs_identity(self.config.rootfs)
        attach.vouch_for_rootfs(identity, self.config.rootfs)
        entrypoint, cmd = self._entrypoint_cmd
        run = metadata.RunDefaults(
            env=dict(self.config.env),
            workdir=self.config.workdir,
            user=self.config.user,
            entrypoint=entrypoint,
            cmd=cmd,
            rootfs=None if self.config.rootfs is None else os.path.abspath(self.config.rootfs),
        )
        self._unmount_for_snapshot()
        try:
            bake.bake(
                self._handle,
                directory,
                image=identity,
                memory_mib=self.config.memory_mib,
                vcpus=self.config.vcpus,
                kernel=self._kernel_path,
                initramfs=self._initramfs_path,
                run=run,
                base=base,
            )
        finally:
            if stop:
                self.stop()
            elif self._handle.outcome is None:
                self._handle.resume()
                self._mount_after_snapshot()
        return Image.from_snapshot(directory, rootfs=self.config.rootfs)

    def _wait_for_agent(self, timeout: float, *, refresh: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._raise_if_ended("while booting")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = self.console_log.strip().splitlines()[-1:] or ["(no console output)"]
                console = agent.printable_line(tail[0])
                raise VmError(f"the guest agent did not answer within {timeout:g} s; console: {console}")
            try:
                with agent.connect_vsock_uds(self._vsock, timeout=min(remaining, 2.0)) as client:
                    # A guest that accepts the connection must still answer within the boot timeout.
                    client.request_timeout = _seconds_left(deadline)
                    client.ping()
                    if refresh:
                        client.request_timeout = _seconds_left(deadline)
                        self.refreshed = self._refresh(client)
                    if self._net is not None:
                        client.request_timeout = _seconds_left(deadline)
                        self._configure_network(client, reset_connections=refresh)
                return
            except AgentUnreachable:  # including AgentTimeoutError: try again while time is left
                continue

    def _configure_network(self, client: agent.AgentClient, *, reset_connections: bool) -> None:
        """Gives the guest its address, MAC, route, resolver and hosts entries; after a restore
        also resets the TCP connections the snapshot's VM had (their peers are gone)."""
        assert self._net is not None
        self._net.check_alive()
        net, identity = self._net.network, self._net.identity
        client.configure_network(
            mac=identity.mac,
            address=identity.address,
            prefix=_net.SUBNET.prefixlen,
            gateway=_net.GATEWAY,
            dns=[resolver] if (resolver := net.resolver()) else [],
            hosts=net.guest_hosts(),
            mtu=_net.MTU,
            reset_connections=reset_connections,
        )

    @property
    def network(self) -> NetworkInfo | None:
        """The VM's addresses, published ports and what its card counted (``None`` without a
        network card)."""
        if self._net is None:
            return None
        raw = self._handle.net_counters_json()
        net, identity = self._net.network, self._net.identity
        counters = _net.counters_from_json(raw or "{}", net, _core.NET_BUILTIN_DENY)
        return NetworkInfo(
            mode=net.mode,
            mac=identity.mac,
            address=identity.address,
            prefix=_net.SUBNET.prefixlen,
            gateway=_net.GATEWAY,
            resolver=net.resolver(),
            ports=net.ports,
            counters=counters,
        )

    @staticmethod
    def _refresh(client: agent.AgentClient) -> agent.SyncResult | None:
        """After a restore: the guest clock stood still while the snapshot was on disk, and every
        clone starts with the same random state; the agent sets the time and reseeds the guest RNG.
        """
        try:
            result = client.sync()
        except ProtocolError:
            # Agents older than the sync request close the connection; the VM still works.
            log.warning("the snapshot's agent cannot refresh the guest clock and entropy (too old)")
            return None
        if not result.clock_set:
            log.warning("the guest agent did not set the guest clock after the restore")
        return result

    def _raise_if_ended(self, when: str) -> None:
        outcome = self.outcome
        if outcome is None:
            return
        detail = agent.printable_line(outcome.detail)  # a panic line is guest text
        when = f" {when}" if when else ""
        if outcome.kind == "panic":
            raise GuestPanickedError(f"the guest kernel panicked{when}: {detail}")
        if outcome.kind == "oom":
            raise VmOutOfMemoryError(f"the VM ended{when}: {detail}")
        if outcome.kind == "vmm_crash":
            raise VmmCrashedError(f"the VM ended{when}: {detail}")
        raise VmError(f"the VM ended{when} ({outcome.kind}{': ' + detail if detail else ''})")

    @property
    def outcome(self) -> Outcome | None:
        """``None`` while the VM runs; then how it ended."""
        raw = self._handle.outcome
        if raw is None:
            return None
        kind, detail, code = raw.kind, raw.reason, raw.code
        if kind in ("reset", "crash"):
            # Without a panic device the console is the witness: the kernel prints the panic line,
            # then (panic=-1, reboot=k) resets the machine.
            match = _PANIC_LINE.search(self._handle.console())
            if match:
                kind, detail = "panic", match.group().decode(errors="replace")
        if kind not in _OUTCOME_KINDS:
            kind = "crash"
        return Outcome(kind, detail, code)  # type: ignore[arg-type]

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """Waits until the VM ends by itself; ``None`` if ``timeout`` passed first."""
        self._handle.wait(timeout)
        return self.outcome

    def stop(self) -> None:
        """Stops the VM at once (no guest shutdown) and frees its resources. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            forwards = list(self._forwards.values())
            self._forwards.clear()
        for forward in forwards:
            forward.close()
        self._unmount_volumes()
        self._handle.stop()
        if self._net is not None:
            self._net.stop()
        # The VMM has let go of the disks: another VM may now attach the volumes.
        _release(self._volumes)
        shutil.rmtree(self._runtime_dir, ignore_errors=True)

    def __enter__(self) -> Vm:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The process id of this VM's VMM worker (``None`` for an in-process VMM)."""
        return self._handle.pid

    @property
    def protections(self) -> list[str]:
        """The protections the VM's VMM runs under, by name (namespaces, the empty root, the
        unprivileged uid, ``no_new_privs``, ``seccomp``, ...); empty for an in-process VMM."""
        return self._handle.protections

    def pause(self) -> None:
        """Freezes every vCPU."""
        self._handle.pause()

    def resume(self) -> None:
        self._handle.resume()

    @property
    def console_log(self) -> str:
        """Everything the guest wrote to its serial console so far (bounded ring)."""
        return self._handle.console().decode(errors="replace")

    # -- ports published while the VM runs ------------------------------------------------------

    def expose_tcp(
        self, guest_port: int, *, host: str = _forward.DEFAULT_HOST, host_port: int = 0
    ) -> _forward.HostAddress:
        """Publishes TCP ``guest_port`` of the running guest on the host and returns where it is
        reached: ``(host, port)``. ``host`` is the address to listen on (default 127.0.0.1, this
        machine only); ``host_port`` 0 picks a free port.

        Connections are relayed through the guest agent, so this works with any network mode,
        ``none`` included, and the guest sees them come from its own loopback. A connection to a
        port nothing listens on in the guest is reset. The port stays published until
        :meth:`unexpose_tcp` or the VM stops. Raises :class:`NetworkError` for a bad port or
        address, or one the host cannot listen on.
        """
        self._raise_if_ended("")
        if self._stopped:
            raise VmError("the VM was stopped")
        forward = _forward.PortForward(self._client, guest_port, host=host, host_port=host_port)
        with self._lock:
            stopped = self._stopped
            if not stopped:
                self._forwards[forward.address] = forward
        if stopped:
            forward.close()
            raise VmError("the VM was stopped")
        return forward.address

    def unexpose_tcp(self, address: tuple[str, int]) -> None:
        """Stops publishing what :meth:`expose_tcp` returned; its open connections are reset."""
        with self._lock:
            forward = self._forwards.pop(_forward.HostAddress(*address), None)
        if forward is None:
            raise NetworkError(f"{address[0]}:{address[1]} is not a port this VM exposed")
        forward.close()

    @property
    def exposed_tcp(self) -> dict[_forward.HostAddress, int]:
        """The ports :meth:`expose_tcp` published, each with the guest port it reaches."""
        with self._lock:
            return {address: f.guest_port for address, f in self._forwards.items()}

    # -- the guest agent --------------------------------------------------------------------------

    def _client(self, timeout: float = agent.CONNECT_TIMEOUT) -> agent.AgentClient:
        if self._stopped:
            raise VmError("the VM was stopped")
        self._raise_if_ended("")
        return agent.connect_vsock_uds(self._vsock, timeout=timeout)

    def exec(
        self,
        argv: Sequence[Argument],
        *,
        env: Mapping[str, str] | None = None,
        replace_env: bool = False,
        cwd: Argument | None = None,
        user: str | int | None = None,
        input: bytes | None = None,
        timeout: float | None = None,
        check: bool = False,
        max_output: int | None = agent.MAX_OUTPUT,
        keep_background: bool = False,
        pids_max: int | None = None,
    ) -> ExecResult:
        """Runs ``argv`` in the guest to completion.

        ``env`` adds to (and overrides) the command's environment: ``PATH``/``HOME``, then the
        config's ``env`` (an image's Env and ``-e``), then ``env``, as ``supermachine run -e`` does;
        with ``replace_env`` it is the whole environment instead. ``cwd`` and ``user`` default to
        the config's.

        A timeout kills the command's process group and is reported as ``timed_out``; with
        ``check`` it raises :class:`ExecTimeoutError`, and a non-zero exit raises
        :class:`CommandFailedError`. Whatever the guest does, the call returns or raises within
        ``timeout`` + :data:`~supermachine.agent.EXEC_GRACE` seconds (:class:`AgentTimeoutError`
        for a guest that stops answering). Each of stdout and stderr keeps at most ``max_output``
        bytes (``None``: no limit); past it the command is killed and :class:`OutputLimitError`
        raised.
        Processes the command leaves behind are killed when it exits unless ``keep_background``;
        ``pids_max`` bounds its process tree (see :meth:`AgentClient.spawn`).
        """
        deadline = None if timeout is None else time.monotonic() + timeout + agent.EXEC_GRACE
        with self._client(_connect_timeout(deadline)) as client:
            result = client.exec(
                argv,
                env=self._env(env, replace_env),
                cwd=cwd if cwd is not None else self.config.workdir,
                user=user if user is not None else self.config.user,
                input=input,
                timeout=timeout,
                max_output=max_output,
                deadline=deadline,
                keep_background=keep_background,
                pids_max=pids_max,
            )
        if check:
            shown = " ".join(os.fsdecode(a) for a in argv)
            if result.timed_out:
                raise ExecTimeoutError(f"{shown!r} timed out after {timeout:g} s and was killed")
            if result.returncode != 0:
                raise CommandFailedError(f"{shown!r} failed with exit status {result.returncode}")
        return result

    def spawn(
        self,
        argv: Sequence[Argument],
        *,
        env: Mapping[str, str] | None = None,
        replace_env: bool = False,
        cwd: Argument | None = None,
        user: str | int | None = None,
        stdin: bool = False,
        timeout: float | None = None,
        keep_background: bool = False,
        pids_max: int | None = None,
        tty: bool = False,
        tty_size: tuple[int, int] | None = None,
    ) -> Process:
        """Starts ``argv`` and returns a :class:`Process` that streams its output as it comes
        (without a size limit). ``env``, ``replace_env``, ``timeout``: as for :meth:`exec`. With
        ``tty`` it runs on a new terminal in the guest of ``tty_size`` (rows, columns), which
        :meth:`Process.resize <supermachine.agent.Process.resize>` changes; see
        :meth:`AgentClient.spawn <supermachine.agent.AgentClient.spawn>`."""
        deadline = None if timeout is None else time.monotonic() + timeout + agent.EXEC_GRACE
        client = self._client(_connect_timeout(deadline))
        try:
            return client.spawn(
                argv,
                env=self._env(env, replace_env),
                cwd=cwd if cwd is not None else self.config.workdir,
                user=user if user is not None else self.config.user,
                stdin=stdin,
                timeout=timeout,
                deadline=deadline,
                keep_background=keep_background,
                pids_max=pids_max,
                tty=tty,
                tty_size=tty_size,
            )
        except BaseException:
            client.close()
            raise

    def write_file(
        self, path: str, data: bytes, mode: int = 0o644, *, timeout: float = agent.REQUEST_TIMEOUT
    ) -> None:
        """Writes a file in the guest atomically, within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._client(min(agent.CONNECT_TIMEOUT, timeout)) as client:
            client.write_file(path, data, mode=mode, timeout=_seconds_left(deadline))

    def stat(
        self, path: str, *, follow: bool = False, timeout: float = agent.REQUEST_TIMEOUT
    ) -> agent.GuestStat:
        """What ``path`` is in the guest (``follow``: through a final symbolic link)."""
        with self._client(min(agent.CONNECT_TIMEOUT, timeout)) as client:
            return client.stat(path, follow=follow, timeout=timeout)

    def remove(self, path: str, *, recursive: bool = False, timeout: float = agent.REQUEST_TIMEOUT) -> None:
        """Removes a file, link or empty directory in the guest (``recursive``: a whole tree)."""
        with self._client(min(agent.CONNECT_TIMEOUT, timeout)) as client:
            client.remove(path, recursive=recursive, timeout=timeout)

    def put_archive(
        self, directory: str, archive: bytes | BinaryIO, *, timeout: float = agent.REQUEST_TIMEOUT
    ) -> int:
        """Unpacks a tar stream (bytes or a binary file) into the guest's ``directory``, keeping
        modes, owners, times and extended attributes; returns the number of entries."""
        deadline = time.monotonic() + timeout
        with self._client(min(agent.CONNECT_TIMEOUT, timeout)) as client:
            return client.put_archive(directory, archive, timeout=_seconds_left(deadline))

    def listdir(
        self, path: str, *, max_entries: int = agent.MAX_LIST_ENTRIES, timeout: float = agent.REQUEST_TIMEOUT
    ) -> list[agent.GuestDirEntry]:
        """The entries of the guest directory ``path``, sorted by name: each one's ``name``,
        ``type``, ``mode``, owner, ``size``, ``mtime_ns`` and a link's target (a link is described,
        not followed). More than ``max_entries`` raises :class:`OutputLimitError`."""
        deadline = time.monotonic() + timeout
        with self._client(min(agent.CONNECT_TIMEOUT, timeout)) as client:
            return client.list_dir(path, max_entries=max_entries, timeout=_seconds_left(deadline))

    def copy_in(
        self,
        source: str | os.PathLike[str],
        guest_dir: str,
        *,
        keep_owner: bool = False,
        timeout: float = transfer.COPY_TIMEOUT,
    ) -> int:
        """Copies the host file, link or directory tree ``source`` into the existing guest
        directory ``guest_dir``, as ``guest_dir/<last component of source>``, with modes and
        times; owners become root unless ``keep_owner``. Links are copied, not followed. Returns
        the number of entries."""
        deadline = time.monotonic() + timeout
        with transfer.host_archive(Path(source), keep_owner=keep_owner) as stream:
            return self.put_archive(guest_dir, stream, timeout=_seconds_left(deadline))

    def copy_out(
        self,
        guest_path: str,
        dest: str | os.PathLike[str],
        *,
        max_bytes: int | None = transfer.MAX_COPY_BYTES,
        max_entries: int = transfer.MAX_COPY_ENTRIES,
        timeout: float = transfer.COPY_TIMEOUT,
    ) -> transfer.CopyResult:
        """Copies the guest file or directory tree ``guest_path`` into the existing host
        directory ``dest``, as ``dest/<last component of guest_path>``. The guest is untrusted:
        nothing is written outside ``dest`` and no link is followed; device nodes and FIFOs are
        skipped; set-id bits and owners are dropped (see :mod:`supermachine.transfer`). More than
        ``max_bytes`` of archive or ``max_entries`` entries stop the copy with an error, leaving
        what was copied so far."""
        deadline = time.monotonic() + timeout
        with self._client(min(agent.CONNECT_TIMEOUT, timeout)) as client:
            stream = client.get_archive(guest_path, max_bytes=max_bytes, timeout=_seconds_left(deadline))
            with contextlib.closing(stream):
                result = transfer.unpack_guest_archive(
                    cast(IO[bytes], stream), Path(dest), max_entries=max_entries
                )
                while stream.read(agent.CHUNK):  # the end of the reply, bounded by max_bytes
                    pass
            return result

    def read_file(
        self, path: str, *, max_bytes: int | None = agent.MAX_READ, timeout: float = agent.REQUEST_TIMEOUT
    ) -> bytes:
        """The content of a file in the guest, read within ``timeout`` seconds. A file larger than
        ``max_bytes`` (``None``: no limit) raises :class:`OutputLimitError`."""
        deadline = time.monotonic() + timeout
        with self._client(min(agent.CONNECT_TIMEOUT, timeout)) as client:
            return client.read_file(path, max_bytes=max_bytes, timeout=_seconds_left(deadline))

    # -- what the VM changed ------------------------------------------------------------------------

    def changes(self, *, timeout: float = _changes.EXPORT_TIMEOUT) -> list[_changes.Change]:
        """What this VM changed in its root file system, in walk order (a directory before its
        contents): added, modified and deleted paths, as ``docker diff`` lists them
        (``str(change)`` is ``A /path``). For a restored VM this includes what the snapshotted VM
        had changed. Raises :class:`ExportError` for a VM booted on its initramfs alone."""
        deadline = time.monotonic() + timeout
        with self._client(min(agent.CONNECT_TIMEOUT, timeout)) as client:
            stream = client.changes(with_data=False, timeout=_seconds_left(deadline))
            return _changes.list_changes(_no_overlay_is_export_error(stream))

    def mark(self, *, timeout: float = _changes.EXPORT_TIMEOUT) -> int:
        """Remembers this VM's file system as it is now and returns the mark: a later
        ``export_layer(..., since=mark)`` holds only what changed after this call (the guest keeps
        its last few marks)."""
        deadline = time.monotonic() + timeout
        with self._client(min(agent.CONNECT_TIMEOUT, timeout)) as client:
            stream = client.changes(with_data=False, timeout=_seconds_left(deadline), keep_mark=True)
            _changes.list_changes(_no_overlay_is_export_error(stream))
        if stream.mark is None:
            raise ProtocolError("the guest agent kept no mark of the VM's changes")
        return stream.mark

    def export_layer(
        self,
        dest: str | os.PathLike[str] | BinaryIO,
        *,
        compress: bool = True,
        max_bytes: int | None = None,
        since: int | None = None,
        keep_mark: bool = False,
        pause: bool = False,
        timeout: float = _changes.EXPORT_TIMEOUT,
    ) -> _changes.Layer:
        """Writes what this VM changed as an OCI layer tar (gzip unless ``compress`` is false) to
        ``dest``, a path (complete or absent: written beside it, then renamed) or a binary file.

        Deleted paths become ``.wh.NAME`` whiteouts, directories that replaced an image directory
        are opaque (``.wh..wh..opq``); modes, owners, times, extended attributes, hard and symbolic
        links are kept. ``max_bytes`` bounds the file data (default: the VM's memory size, which
        bounds the in-memory upper layer too). Processes still running in the VM may change files
        while they are read: ``pause`` freezes every process the VM's commands started (background
        ones included) while the layer is read, and thaws them after, as ``docker commit`` pauses a
        container; a command started meanwhile waits for the thaw. An agent older than this field
        refuses ``pause`` with a one-line error.

        Layers can be chained: with ``keep_mark`` the result's :attr:`~supermachine.changes.Layer.mark`
        names this export, and a later ``export_layer(..., since=mark)`` holds only what changed
        after it (the guest keeps its last few marks)."""
        limit = self.config.memory_mib << 20 if max_bytes is None else max_bytes
        deadline = time.monotonic() + timeout
        with self._client(min(agent.CONNECT_TIMEOUT, timeout)) as client:
            stream = client.changes(
                with_data=True,
                timeout=_seconds_left(deadline),
                since=since,
                keep_mark=keep_mark,
                pause=pause,
            )
            layer = _changes.write_layer(
                _no_overlay_is_export_error(stream), dest, compress=compress, max_bytes=limit
            )
        return dataclasses.replace(layer, mark=stream.mark)

    def commit(
        self,
        ref: str,
        *,
        changes: ConfigChanges | Mapping[str, object] | None = None,
        message: str | None = None,
        pause: bool = True,
        timeout: float = _changes.EXPORT_TIMEOUT,
    ) -> Image:
        """Stores this VM's root file system as the new image ``ref`` (``docker commit``): the
        image it started from, plus one layer of what it changed (:meth:`export_layer`), with the
        run config ``changes`` (``cmd``, ``entrypoint``, ``env``, ``workdir``, ``user``,
        ``labels``, ``exposed_ports``, ``volumes``, ``stop_signal``) and ``message`` in the
        image's history. The VM's processes are frozen while the layer is read unless ``pause``
        is false (``docker commit --pause``). Returns the new image, ready to
        :meth:`~supermachine.image.Image.start` (``supermachine run REF``)."""
        from supermachine import oci
        from supermachine.image import Image
        from supermachine.oci.commit import ConfigChanges, commit_layer

        wanted = ConfigChanges.of(changes)
        parent = self._parent_image()
        store = parent.store
        store.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        layer_file = store.tmp_dir / f"commit-{os.getpid()}-{threading.get_ident()}.tar.gz"
        try:
            layer = self.export_layer(layer_file, pause=pause, timeout=timeout)
            stored = commit_layer(
                parent,
                layer_file,
                digest=layer.digest,
                diff_id=layer.diff_id,
                media_type=layer.media_type,
                ref=ref,
                changes=wanted,
                created_by="supermachine commit",
                comment=message,
                store=store,
            )
        finally:
            layer_file.unlink(missing_ok=True)
        rootfs = oci.build_squashfs(stored)
        return Image(ref=stored.ref, config=stored.config, rootfs=rootfs, oci_image=stored)

    def _parent_image(self) -> oci_image.Image:
        """The stored image this VM's root file system is, for :meth:`commit`."""
        from supermachine.oci import load_image

        if self._image is None or self._image.config_digest in ("", "none"):
            raise ExportError(
                "this VM was not started from an image in the local store (a bare root file system):"
                " it cannot be committed; export_layer() still writes its changes"
            )
        try:
            return load_image(self._image.config_digest)
        except ImageNotFoundError:
            raise ExportError(
                f"the image this VM started from ({self._image.ref}, {self._image.config_digest[:19]})"
                " is no longer in the local store: pull it again to commit"
            ) from None

    def _env(self, env: Mapping[str, str] | None, replace_env: bool = False) -> Mapping[str, str] | None:
        """The environment a command gets: ``PATH``/``HOME``, the config's ``env``, then ``env``;
        only ``env`` with ``replace_env``.

        On emulating hosts (``compat`` CPU template) ``GLIBC_TUNABLES`` keeps glibc off AVX unless
        the caller sets it: there the guest kernel cannot preserve AVX registers across context
        switches (see the compat notes in ``guest/kernel/README.md``)."""
        compat = self._handle.cpu_template == "compat"
        if not env and not replace_env and not self.config.env and not compat:
            return None  # the agent's own default
        merged = {} if replace_env else {**DEFAULT_ENV, **self.config.env}
        merged.update(env or {})
        if compat:
            merged.setdefault("GLIBC_TUNABLES", _core.COMPAT_GLIBC_TUNABLES)
        return merged


def _no_overlay_is_export_error(
    stream: Iterable[dict[int, agent.FieldValue] | bytes],
) -> Iterator[dict[int, agent.FieldValue] | bytes]:
    """The agent's refusals (a VM without an overlay root, a tree too deep, a file that shrank
    while read) as the export errors they are."""
    try:
        yield from stream
    except AgentRequestError as exc:
        raise ExportError(str(exc)) from None


def _start_network(
    net: Network,
    runtime_dir: Path,
    target: _core.MachineConfig | _core.VmRestoreOverrides,
    *,
    card_required: bool = False,
) -> _net.Backend | None:
    """Starts the VM's passt and puts the card's configuration and the VMM's end of the socket
    pair into ``target``; ``None`` for a VM without a network (unless a restored snapshot has a
    card, which then refuses every destination)."""
    if net.mode == "none" and not card_required:
        return None
    identity = _net.Identity.new()
    backend = _net.Backend(net, identity, runtime_dir)
    target["net"] = _net.core_config(net, identity)
    target["net_fd"] = backend.vmm_fd()
    return backend


def _restored_network(
    directory: Path, info: _core.SnapshotInfo, asked: Network | NetworkMode | None
) -> Network | NetworkMode:
    """The network of a VM restored from ``directory``: the one asked for, which must fit the
    snapshot's card (or lack of one)."""
    if info["net"]:
        return "egress" if asked is None else Network.of(asked)
    if asked is not None and Network.of(asked).mode != "none":
        raise NetworkError(
            f"{directory} was taken of a VM without a network card, so it restores without a network"
        )
    return "none"


class _Phases:
    """Durations of consecutive phases, from this object's creation: each :meth:`mark` ends one."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.durations: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.durations[name] = now - self._last
        self._last = now


def _worker(
    vmm: VmmMode, runtime_dir: Path, limits: Limits | None, run_as: tuple[int, int] | None = None
) -> _core.VmWorker | None:
    """How to run the VM's VMM: ``None`` for this process."""
    return None if vmm == "in-process" else worker.worker_options(runtime_dir, limits, run_as=run_as)


def _core_mounts(mounts: Sequence[SharedFolder]) -> list[_core.VmMount]:
    """The VMM's form of ``mounts``: each folder's real path, and its tag by position."""
    return [
        {"host_dir": str(Path(m.host_dir).resolve()), "tag": _share_tag(i), "read_only": m.read_only}
        for i, m in enumerate(mounts)
    ]


def _check_restored_shares(directory: Path, info: _core.SnapshotInfo, mounts: Sequence[SharedFolder]) -> None:
    """A restore shares exactly as many folders as the snapshot's VM had (the snapshot names
    none: its caller chooses them)."""
    saved = len(info["shares"])
    if len(mounts) != saved:
        raise VmConfigError(
            f"{directory} was taken of a VM with {saved} shared folder(s), and {len(mounts)} were given:"
            " pass one per folder, in order (mounts=[SharedFolder(HOST_DIR, GUEST_DIR)], or -v HOST_DIR:/DIR)"
        )


RUNTIME_DIR_MAX_BYTES = 80
"""Longest path of a VM's runtime directory: its sockets (``vsock.sock``, and ``vsock.sock_PORT``
for connections the guest makes to the host) live in it, and a Unix socket's path holds at most
107 bytes."""


def _new_runtime_dir() -> Path:
    """A new private directory for a VM's sockets: under the temporary directory, or under
    ``/tmp`` when that one's path is too long for socket paths beneath it."""
    base = tempfile.gettempdir()
    if len(os.fsencode(os.path.join(base, "supermachine-vm-XXXXXXXX"))) > RUNTIME_DIR_MAX_BYTES:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="supermachine-vm-", dir=base))


def _share_tag(index: int) -> str:
    """The virtio-fs tag of a VM's ``index``-th shared folder (the guest mounts it by this)."""
    return f"share{index}"


def _shared_folder_owner(config: VmConfig) -> tuple[int, int] | None:
    """The uid and gid a root-started worker runs as to serve ``config``'s read-write shared
    folders: their owner, so what the guest makes there is the owner's, and the worker stays
    unprivileged. ``None`` (the jail's own user) without any, or when not running as root (the
    worker then runs as the caller, in a user namespace)."""
    writable = [Path(m.host_dir) for m in config.mounts if not m.read_only]
    if not writable or os.geteuid() != 0 or config.vmm == "in-process":
        return None
    owners = {}
    for folder in writable:
        info = folder.stat()
        if info.st_uid == 0:
            raise VmConfigError(
                f"cannot share {folder} read-write: it belongs to root, and the VMM never runs as root;"
                " chown it to an unprivileged user (the guest's files there become theirs), or add :ro"
            )
        owners[(info.st_uid, info.st_gid)] = folder
    if len({uid for uid, _ in owners}) > 1:
        listed = ", ".join(f"{folder} (uid {uid})" for (uid, _), folder in owners.items())
        raise VmConfigError(f"the read-write shared folders of one VM must have one owner: {listed}")
    return next(iter(owners))


def _with_io_limit(disks: list[_core.VmDisk], limit: IoLimit | None) -> list[_core.VmDisk]:
    """``disks`` with ``limit`` on each."""
    if limit is None:
        return disks
    return [{**disk, "rate_limit": limit.as_core()} for disk in disks]


def _seconds_left(deadline: float) -> float:
    """Seconds until ``deadline`` (:func:`time.monotonic`), at least a millisecond: a wait that is
    already late fails with a timeout rather than a complaint about its argument."""
    return max(deadline - time.monotonic(), 0.001)


def _connect_timeout(deadline: float | None) -> float:
    """Seconds to connect to the agent for a call that must end by ``deadline``."""
    return agent.CONNECT_TIMEOUT if deadline is None else min(agent.CONNECT_TIMEOUT, _seconds_left(deadline))


def _snapshot_info(directory: Path) -> _core.SnapshotInfo:
    """The snapshot's checked ``vmstate.bin``, its problems as one :class:`SnapshotError` line."""
    try:
        return _core.snapshot_info(str(directory))
    except (OSError, ValueError) as exc:
        raise SnapshotError(str(exc)) from None


def guest_disk_name(index: int) -> str:
    """The guest's name of the ``index``-th virtio disk (0: ``/dev/vda``), as Linux names them."""
    name = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        name = chr(ord("a") + rest) + name
    return f"/dev/vd{name}"


def _attach_volumes(config: VmConfig) -> list[volumes.Attachment]:
    """Each volume of ``config``, locked for this VM (all or none)."""
    attached: list[volumes.Attachment] = []
    try:
        for mount in config.volumes:
            attachment = volumes.Attachment(volumes.get(mount.name), read_only=mount.read_only)
            attachment.acquire()
            attached.append(attachment)
    except BaseException:
        _release(attached)
        raise
    return attached


def _release(attached: list[volumes.Attachment]) -> None:
    for attachment in attached:
        attachment.release()


def _cmdline(config: VmConfig) -> str:
    parts = ["console=ttyS0", "reboot=k", "panic=-1"]
    if config.quiet:
        parts.append("quiet")
    if config.rootfs is None:
        parts.append("sm.root=none")
    else:
        parts += ["sm.root=/dev/vda", f"sm.rootfstype={config.rootfs_type}"]
    if config.kernel_args:
        parts.append(config.kernel_args)
    return " ".join(parts)
