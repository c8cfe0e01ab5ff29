"""Exception hierarchy. Every message is one line that names the problem."""

from __future__ import annotations


class SupermachineError(Exception):
    """Base class of every error supermachine raises on purpose."""


class InputError(SupermachineError):
    """An input file or directory is missing, unreadable or malformed."""


class ImageReferenceError(SupermachineError):
    """An image reference (``name[:tag][@digest]``, ``oci:PATH``, ...) cannot be parsed."""


class RegistryError(SupermachineError):
    """A registry refused a request, could not be reached, or answered something unusable."""


class AuthenticationError(RegistryError):
    """A registry rejected the credentials (or demanded credentials that were not given)."""


class ManifestError(SupermachineError):
    """A manifest, image index or image config is malformed, unsupported or has no matching platform."""


class DigestMismatchError(SupermachineError):
    """Content did not match the digest or size that refers to it."""


class LayerError(SupermachineError):
    """A layer cannot be read or applied to the root filesystem."""


class UnsafeLayerError(LayerError):
    """A layer entry would write outside the root filesystem."""


class ImageNotFoundError(SupermachineError):
    """No stored image matches the given reference."""


class RootfsError(SupermachineError):
    """Building a root filesystem image (squashfs) failed."""


class KernelError(SupermachineError):
    """The guest kernel could not be found or built."""


class AgentBuildError(SupermachineError):
    """The guest agent binary or the initramfs that carries it could not be built."""


class AgentError(SupermachineError):
    """Talking to the guest agent failed."""


class AgentUnreachable(AgentError):
    """No agent answered at the given address, or the connection to it broke."""


class ProtocolError(AgentError):
    """A peer broke the agent protocol: bad hello, malformed, oversized or unexpected frame."""


class AgentRequestError(AgentError):
    """The agent refused or could not carry out one request (the connection stays usable).

    ``kind`` is the agent's error class (``request``, ``os``, ``exec``); ``errno`` is set for
    failed system calls.
    """

    def __init__(self, message: str, kind: str = "request", errno: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.errno = errno


class VmError(SupermachineError):
    """A microVM could not be started, or stopped in a way the caller did not ask for."""


class NetworkError(VmError):
    """A VM's network could not be set up: a bad policy or port mapping, or its backend (passt)
    is missing or failed."""


class KvmUnavailableError(VmError):
    """``/dev/kvm`` is missing or not usable by this process."""


class VmmError(VmError):
    """The VMM refused or failed a request; the subclass says what kind of problem it was."""


class VmConfigError(VmmError, ValueError):
    """A VM configuration value the VMM cannot use."""


class VmmOSError(VmmError, OSError):
    """An operating-system failure in the VMM: permissions, I/O, a device."""


class VmmFileNotFoundError(VmmOSError, FileNotFoundError):
    """A file the VM needs (kernel, initramfs, disk, snapshot) does not exist."""


class JailError(VmmOSError):
    """The VM's worker could not confine itself (namespaces, root, privileges, seccomp)."""


class WorkerStartError(VmmOSError):
    """The VM's worker process (``supermachine-vmm``) could not be found or started."""


class ResourceLimitError(VmmOSError):
    """The VM's resource limits could not be set up (no cgroup controller, no permission)."""


class VmmStateError(VmmError, RuntimeError):
    """A request that does not fit the VMM's state (a second start, a VM already stopped)."""


class VmmRuntimeError(VmmError, RuntimeError):
    """KVM or the VMM failed while running the VM."""


class VmmCrashedError(VmmError, RuntimeError):
    """The VM's VMM process died (a signal, a panic, a forbidden system call, a kill, or it broke
    its protocol); only that VM ended. The message says why."""


class VmOutOfMemoryError(VmmCrashedError):
    """The VM exceeded its memory limit and the kernel's OOM killer ended its VMM."""


class GuestPanickedError(VmError):
    """The guest kernel panicked; the message carries the panic line from the console."""


class ExecTimeoutError(AgentError):
    """A command ran past its timeout and was killed (raised only when asked to, with ``check``)."""


class CommandFailedError(AgentError):
    """A command exited non-zero or by a signal (raised only when asked to, with ``check``)."""


class SnapshotError(SupermachineError):
    """A snapshot directory or snapshot store is missing, inconsistent or cannot be processed."""


class SnapshotStateError(SnapshotError, VmmError, ValueError):
    """A snapshot's ``vmstate.bin`` is damaged, of another version, or does not fit the restore."""


class SnapshotWriteError(SnapshotError, VmmOSError):
    """A snapshot could not be written (disk full, permissions, I/O error)."""


class SnapshotMetadataError(SnapshotError):
    """A snapshot's ``metadata.json`` is missing, not valid JSON, of an unknown version or malformed."""


class PoolError(SupermachineError):
    """A warm pool cannot hand out a VM: it is closed, none became free in time, or restores fail."""


class LayerLimitError(LayerError):
    """A layer exceeds a bound on what it may put on the disk: entries, path length or depth."""


class LayerTooLargeError(LayerLimitError):
    """A layer expands to more bytes than allowed (its ratio to the compressed size, or free space)."""


class CorruptBlobError(DigestMismatchError):
    """A blob in the local cache no longer matches its digest; it has been discarded."""


class CacheWriteError(SupermachineError):
    """Writing to the local image cache failed (disk full, permissions, I/O error)."""


class SnapshotBusyError(SnapshotError):
    """Another process (or thread) is writing a snapshot of the same name right now."""


class AgentTimeoutError(AgentUnreachable):
    """The agent did not answer within the deadline of a request; the connection was closed.

    Raised for connection hand-shakes, pings, file transfers and the starts of commands that take
    too long, and for commands still running past their ``timeout`` plus a grace period that the
    agent should have killed and reported (a stuck or misbehaving guest).
    """


class OutputLimitError(AgentError):
    """What the guest sent back exceeded the size limit of the call (``max_output`` of ``exec``,
    ``max_bytes`` of ``read_file``). The command was killed, the read stopped and the connection
    closed; ``stdout`` and ``stderr`` hold what was collected up to the limit."""

    def __init__(self, message: str, limit: int, stdout: bytes = b"", stderr: bytes = b"") -> None:
        super().__init__(message)
        self.limit = limit
        self.stdout = stdout
        self.stderr = stderr


class ExportError(SupermachineError):
    """A VM's changes cannot be exported or committed as a layer: too large for the limit, a name a
    layer cannot hold, or a VM that has no change set (booted on its initramfs)."""


class CopyError(SupermachineError):
    """A copy between the host and a VM failed: a host source that cannot be read, a destination
    that cannot be written, or an archive from the guest that breaks the rules of
    :func:`supermachine.transfer.unpack_guest_archive`."""


class VolumeError(SupermachineError):
    """A named volume cannot be made, found, attached, mounted or removed."""


class VolumeInUseError(VolumeError):
    """A volume is attached read-write to another VM (or, for a writer, to any)."""
