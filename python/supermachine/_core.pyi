"""Type stubs for the Rust extension module (rust/src/py)."""

import os
import pathlib
from collections.abc import Callable, Sequence
from typing import TypedDict, final

from typing_extensions import Buffer

_Input = Buffer | str | os.PathLike[str]

__version__: str
PAGE_SIZE: int
# The VMM's defaults and limits (their one owner is the VMM's machine configuration).
DEFAULT_MEMORY_MIB: int
MAX_MEMORY_MIB: int
DEFAULT_VCPUS: int
MAX_VCPUS: int  # the most vCPUs a VM (and a snapshot) may have
MAX_VIRTIO_DEVICES: int  # the most virtio devices (disks, volumes, vsock, network card) a VM may have
WORKER_PROTOCOL_VERSION: int  # what this module and its supermachine-vmm speak
# Destination ranges a network card refuses unless a rule allows them: (name, CIDR), in the
# order of the VMM's dropped_builtin counters.
NET_BUILTIN_DENY: list[tuple[str, str]]
COMPAT_GLIBC_TUNABLES: str
# The chunker's window hash (see supermachine.cdc).
CDC_WINDOW: int
CDC_MULTIPLIER: int
CDC_BYTE_KEY: int

def cdc_lengths(
    data: _Input,
    *,
    min_size: int = ...,
    avg_size: int = ...,
    max_size: int = ...,
    normalization: int = ...,
    kernel: str | None = None,
) -> list[int]: ...
def cdc_kernels() -> list[str]: ...
def cdc_lengths_many(
    inputs: Sequence[_Input],
    *,
    min_size: int = ...,
    avg_size: int = ...,
    max_size: int = ...,
    normalization: int = ...,
    threads: int | None = None,
) -> list[list[int]]: ...
def cdc_chunks(
    data: _Input, *, min_size: int = ..., avg_size: int = ..., max_size: int = ..., normalization: int = ...
) -> list[tuple[int, int, bytes]]: ...
def cdc_masks(
    *, min_size: int = ..., avg_size: int = ..., max_size: int = ..., normalization: int = ...
) -> tuple[int, int]: ...

class PageDigests:
    @property
    def algo(self) -> str: ...
    @property
    def digest_size(self) -> int: ...
    @property
    def page_count(self) -> int: ...
    @property
    def zero_pages(self) -> int: ...
    @property
    def byte_len(self) -> int: ...
    def __len__(self) -> int: ...
    def digest(self, index: int) -> bytes: ...
    def is_zero_page(self, index: int) -> bool: ...
    def compare(self, golden: PageDigests) -> tuple[int, int, int]: ...

def page_digests(data: _Input, *, algo: str = "xxh3", threads: int | None = None) -> PageDigests: ...
def unique_pages(inputs: Sequence[PageDigests]) -> tuple[int, int]: ...

class SchemeStats(TypedDict):
    chunks: int
    bytes: int
    unique_chunks: int
    unique_bytes: int
    unique_zstd_bytes: int

class LayerDedup:
    def __init__(
        self,
        *,
        min_size: int = ...,
        avg_size: int = ...,
        max_size: int = ...,
        normalization: int = ...,
        fixed_size: int = ...,
        zstd_level: int = ...,
    ) -> None: ...
    def add_layers(
        self,
        paths: Sequence[str | os.PathLike[str]],
        progress: Callable[[int], object] | None = None,
        threads: int | None = None,
    ) -> list[dict[str, object]]: ...
    def cdc_stats(self) -> SchemeStats: ...
    def fixed_stats(self) -> SchemeStats: ...
    @property
    def fixed_size(self) -> int: ...

# --- VMM (rust/src/py/vm.rs) ---

class VmRateLimit(TypedDict, total=False):
    # Token buckets per disk: each rate refills its bucket once a second; a burst is spent once.
    bytes_per_sec: int
    bytes_burst: int
    ops_per_sec: int
    ops_burst: int

class VmDisk(TypedDict, total=False):
    path: str | os.PathLike[str]
    read_only: bool
    rate_limit: VmRateLimit

class VmMount(TypedDict, total=False):
    # A host folder shared with the guest (virtio-fs), which the guest mounts by its tag.
    host_dir: str | os.PathLike[str]  # required
    tag: str  # required: 1 to 36 ASCII letters, digits, '.', '_' or '-', unique in the VM
    read_only: bool  # default False

class MachineConfig(TypedDict, total=False):
    # Exactly one of kernel (ELF vmlinux, PVH boot) or raw (flat binary).
    kernel: str | os.PathLike[str]
    initramfs: str | os.PathLike[str] | None
    cmdline: str
    raw: str | os.PathLike[str]
    raw_load_addr: int  # default 0x100000 (long), 0x7c00 (real)
    raw_mode: str  # "long" (default) | "real"
    memory_mib: int  # default DEFAULT_MEMORY_MIB
    memory_file: str | os.PathLike[str] | None  # default: an anonymous memfd
    vcpus: int  # default DEFAULT_VCPUS
    disks: Sequence[VmDisk | str | os.PathLike[str]]
    vsock_path: str | os.PathLike[str] | None
    # The network card: JSON {"mac": [6 ints], "policy": {...}, "rate_limit": {"tx", "rx"}}, and
    # this process's end of the socket pair whose other end the backend (passt) holds.
    net: str
    net_fd: int
    mounts: Sequence[VmMount]
    console_log: str | os.PathLike[str] | None
    console_capacity: int  # bytes of serial output kept in memory, default 1 MiB
    cpu_template: str  # "auto" (default) | "normal" | "compat"
    track_dirty_pages: bool  # KVM dirty-page logging for Vm.dirty_pages(), default False

class VmWorker(TypedDict, total=False):
    # How the VM's own VMM process runs (rust/src/worker).
    program: str  # the supermachine-vmm executable (required)
    isolation: str  # "namespaces" (default; needs root) | "user_namespaces" | "none"
    runtime_dir: str  # the VM's private directory: the jail's empty root and vmm.log go here
    uid: int  # unprivileged ids a root-started worker drops to
    gid: int
    seccomp: bool  # per-thread seccomp filters, default True
    memory_max: int  # cgroup limits (bytes, CPUs, threads); need cgroup_name
    cpu_max: float
    pids_max: int
    cgroup_name: str  # unique per VM
    console_capacity: int  # bytes of console kept in the shared ring

@final
class VmOutcome:
    """How a VM ended."""
    @property
    def kind(self) -> str: ...  # "poweroff" | "reset" | "panic" | "crash" | "stopped" | "vmm_crash" | "oom"
    @property
    def reason(self) -> str: ...
    @property
    def code(self) -> int | None: ...  # poweroff only
    def __eq__(self, other: object) -> bool: ...

@final
class VmDevice:
    """One virtio device of a VM."""
    @property
    def kind(self) -> str: ...  # "blk" | "vsock" | "net"
    @property
    def mmio_base(self) -> int: ...
    @property
    def gsi(self) -> int: ...
    @property
    def path(self) -> pathlib.Path: ...  # the disk image or the vsock socket on the host
    @property
    def read_only(self) -> bool: ...  # disks only; False for vsock

@final
class VmTimings:
    """Seconds from the start (or restore) call until each milestone."""
    @property
    def running(self) -> float: ...
    @property
    def first_kvm_run(self) -> float | None: ...
    @property
    def first_console_byte(self) -> float | None: ...
    # Seconds per start-up phase, in order. Restore: load_state, memory, create_vm, devices,
    # vm_state, vcpu_state, running; a worker adds spawn, limits and hello first.
    @property
    def phases(self) -> dict[str, float]: ...
    @property
    def refused_msrs(self) -> int: ...  # MSRs a restore could not load on this host

class VmRestoreOverrides(TypedDict, total=False):
    vsock_path: str | os.PathLike[str]  # required when the snapshot has a vsock device
    net: str  # required when the snapshot has a network card (as in MachineConfig)
    net_fd: int
    console_log: str | os.PathLike[str]
    # The disks to attach, one per saved disk, in order (required: the snapshot names none); a
    # disk is read-only if the caller or the snapshot says so.
    disks: Sequence[VmDisk | str | os.PathLike[str]]
    # The host folders to share, one per shared folder the snapshot has, in order (required:
    # the snapshot names none); read-only if the caller or the snapshot says so.
    mounts: Sequence[VmMount]
    track_dirty_pages: bool
    base: str | os.PathLike[str]  # where a diff's base is, if not where the diff recorded it

class VmSnapshotReport(TypedDict):
    memory_bytes: int  # guest RAM bytes written (all-zero pages stay holes)
    state_bytes: int
    memory_id: str  # the snapshot's memory identity: 64 hex digits (BLAKE3, recorded in vmstate.bin)
    diff_pages: int | None  # pages a diff stores; None for a full snapshot
    compared_pages: int | None  # pages a diff compared with its base
    phases: dict[str, float]  # pause, capture, memory, state, commit

class SnapshotBase(TypedDict):
    path: str  # "../name" for a sibling in the same store, else absolute
    memory_id: str  # the base's memory identity when the diff was taken

# What vmstate.bin records: the one record of a snapshot's memory identity and base.
class SnapshotInfo(TypedDict):
    memory_size: int
    vcpus: int
    cmdline: str
    cpu_template: str
    disks: list[bool]  # read-only flag of each disk, in device order (no paths are kept)
    vsock: bool
    net: bool  # whether the VM had a network card
    shares: list[bool]  # read-only flag of each shared host folder, in device order (no paths)
    memory_id: str  # 64 hex digits: BLAKE3 over its pages (see hash_snapshot_memory)
    base: SnapshotBase | None
    diff_pages: int

# Reads and checks a snapshot directory's vmstate.bin (magic, version, length, CRC); a file of
# another format version is one line ending "take the snapshot again".
def snapshot_info(dir: str | os.PathLike[str]) -> SnapshotInfo: ...

# The memory identity (hex) of the snapshot in dir, computed again from memory.bin (or from the
# open regular file memory_fd) the way the VMM recorded it in vmstate.bin: equal to
# snapshot_info(dir)["memory_id"] exactly when the file holds the memory the VMM wrote. Reads
# the file (never maps it) with the GIL released; ValueError (one line) if it cannot.
def hash_snapshot_memory(dir: str | os.PathLike[str], memory_fd: int | None = None) -> str: ...

class Vm:
    # With `worker` the VMM runs in its own jailed process; without, in this one.
    @staticmethod
    def start(config: MachineConfig, worker: VmWorker | None = None) -> Vm: ...
    # A snapshot directory holds memory.bin (raw guest RAM, mapped copy-on-write on restore)
    # and vmstate.bin (versioned, checksummed). snapshot() leaves the VM paused; with a base
    # it stores only the pages that differ from the base snapshot's memory.
    @staticmethod
    def restore(
        dir: str | os.PathLike[str],
        overrides: VmRestoreOverrides | None = None,
        worker: VmWorker | None = None,
    ) -> Vm: ...
    def snapshot(
        self, dir: str | os.PathLike[str], base: str | os.PathLike[str] | None = None
    ) -> VmSnapshotReport: ...
    # One bit per 4 KiB page the guest wrote since the start or the last call (LSB first);
    # VMM writes are not logged. Needs track_dirty_pages.
    def dirty_pages(self) -> bytes: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def stop(self) -> None: ...
    def wait(self, timeout: float | None = None) -> VmOutcome | None: ...
    @property
    def outcome(self) -> VmOutcome | None: ...
    def console(self) -> bytes: ...
    def read_memory(self, gpa: int, length: int) -> bytes: ...
    def write_memory(self, gpa: int, data: Buffer) -> None: ...
    @property
    def vsock_path(self) -> str | None: ...
    # What the network card counted (JSON, NetCounters), or None without a card.
    def net_counters_json(self) -> str | None: ...
    @property
    def console_capacity(self) -> int: ...  # bytes of serial output the console ring keeps
    @property
    def cmdline(self) -> str: ...
    @property
    def cpu_template(self) -> str: ...
    @property
    def memory_size(self) -> int: ...
    @property
    def devices(self) -> list[VmDevice]: ...
    def device_status(self, index: int) -> int: ...
    @property
    def unhandled_exits(self) -> tuple[int, int]: ...
    @property
    def timings(self) -> VmTimings: ...
    @property
    def pid(self) -> int | None: ...  # the worker's pid; None in-process
    @property
    def protections(self) -> list[str]: ...  # in force in the worker, by name
    def __enter__(self) -> Vm: ...
    def __exit__(self, *args: object) -> None: ...

class HostProtection(TypedDict):
    available: bool
    detail: str  # one sentence: why it is or is not available

# What this host offers VM workers (a few ms, no VM): kvm, root, mount/pid/ipc/uts/net/user
# _namespace, pivot_root, seccomp, landlock, cgroup_memory/cpu/pids, no_new_privs, kvm_pvm.
def host_protections() -> dict[str, HostProtection]: ...

# "full" (root), "unprivileged" (user namespaces) or "minimal" (seccomp, no_new_privs only).
def host_jail_level() -> str: ...
