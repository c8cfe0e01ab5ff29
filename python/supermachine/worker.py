"""How each VM's VMM process (``supermachine-vmm``) is found, confined and limited.

Every VM runs in its own worker process: a crash, an out-of-memory kill or a VMM bug ends only
that VM. When supermachine runs as root the worker starts in fresh mount, PID, IPC, UTS and
network namespaces, pivots into an empty read-only root, drops to an unprivileged uid/gid and
installs a seccomp filter per thread before the guest runs; as another user it builds the same
jail inside a user namespace where the host allows one (without the uid change). Every worker
also restricts each thread with Landlock where the kernel has it (no file or TCP access).
``supermachine doctor`` shows what this host provides; what a worker runs without, and why, is on
its VM's log (``vmm.log`` in the runtime directory).

One worker is kept started ahead of need (spawned and greeted, holding no VM), so a start or
restore does not wait for a process to be created; ``SUPERMACHINE_SPARE_WORKERS=0`` turns that
off. ``SUPERMACHINE_SECCOMP=log`` makes the filters log forbidden calls instead of ending the
worker (for finding what a list lacks), ``SUPERMACHINE_SECCOMP=off`` leaves them out.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from supermachine import _core
from supermachine.errors import WorkerStartError

__all__ = ["JAIL_GID", "JAIL_UID", "IoLimit", "Limits", "VmmMode", "program_path", "worker_options"]

VmmMode = Literal["worker", "in-process"]
"""Where a VM's VMM runs: its own jailed process (default), or threads of this process (no
isolation; kept to measure the worker's cost against)."""

JAIL_UID = int(os.environ.get("SUPERMACHINE_JAIL_UID", "65534"))
"""The unprivileged uid a root-started worker drops to (default ``nobody``)."""
JAIL_GID = int(os.environ.get("SUPERMACHINE_JAIL_GID", "65534"))

_PROGRAM = "supermachine-vmm"
_names = itertools.count()


@dataclass(frozen=True)
class Limits:
    """Resource limits of one VM, enforced on its worker through cgroups (v2, or the v1
    controllers where v2 has none). ``None``: no limit. Out-of-range values are refused when
    the VM starts (:class:`~supermachine.errors.ResourceLimitError`)."""

    memory_mib: int | None = None
    """The most memory the VM's worker may use: guest RAM it touches plus VMM overhead. A VM that
    needs more is ended with an ``oom`` outcome."""
    cpus: float | None = None
    """CPU time, in CPUs (``0.5``: half of one CPU)."""
    pids: int | None = None
    """Most threads of the worker (each vCPU and device is one)."""


@dataclass(frozen=True)
class IoLimit:
    """Block I/O rate limits, applied to each of a VM's disks (its root filesystem included):
    token buckets refilled every second, like Firecracker's. A burst is spent once, before the
    rate applies. ``None``: no limit of that kind."""

    bytes_per_sec: int | None = None
    bytes_burst: int | None = None
    ops_per_sec: int | None = None
    ops_burst: int | None = None

    def as_core(self) -> _core.VmRateLimit:
        out: _core.VmRateLimit = {}
        if self.bytes_per_sec is not None:
            out["bytes_per_sec"] = self.bytes_per_sec
        if self.bytes_burst is not None:
            out["bytes_burst"] = self.bytes_burst
        if self.ops_per_sec is not None:
            out["ops_per_sec"] = self.ops_per_sec
        if self.ops_burst is not None:
            out["ops_burst"] = self.ops_burst
        return out


def program_path() -> Path:
    """The ``supermachine-vmm`` executable: ``SUPERMACHINE_VMM`` if set, else the one installed
    with the package (next to this module, in ``bin/``)."""
    override = os.environ.get("SUPERMACHINE_VMM")
    path = Path(override) if override else Path(__file__).parent / "bin" / _PROGRAM
    if path.is_file() and os.access(path, os.X_OK):
        return path
    hint = "fix SUPERMACHINE_VMM" if override else "run scripts/setup.sh (or reinstall supermachine)"
    raise WorkerStartError(f"the VMM worker {path} is missing or not executable: {hint}")


def worker_options(
    runtime_dir: Path,
    limits: Limits | None,
    console_capacity: int | None = None,
    *,
    run_as: tuple[int, int] | None = None,
) -> _core.VmWorker:
    """The ``worker`` argument of ``_core.Vm.start``/``restore`` for a VM whose private runtime
    directory is ``runtime_dir``. A root-started worker drops to ``run_as`` (uid, gid; never
    root), or to :data:`JAIL_UID`/:data:`JAIL_GID`."""
    root = os.geteuid() == 0
    options: _core.VmWorker = {
        "program": str(program_path()),
        "isolation": "namespaces" if root else "user_namespaces",
        "runtime_dir": str(runtime_dir),
        "seccomp": os.environ.get("SUPERMACHINE_SECCOMP") != "off",
    }
    if root:
        uid, gid = run_as or (JAIL_UID, JAIL_GID)
        if uid == 0 or gid == 0:
            raise ValueError("a VMM worker never runs as root")
        options["uid"] = uid
        options["gid"] = gid
    if console_capacity is not None:
        options["console_capacity"] = console_capacity
    if limits is not None and limits != Limits():
        options["cgroup_name"] = f"vm-{os.getpid()}-{next(_names)}"
        if limits.memory_mib is not None:
            options["memory_max"] = limits.memory_mib << 20
        if limits.cpus is not None:
            options["cpu_max"] = limits.cpus
        if limits.pids is not None:
            options["pids_max"] = limits.pids
    return options
