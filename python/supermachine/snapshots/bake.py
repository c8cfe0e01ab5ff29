"""Taking a snapshot of a running VM into a store: choose the base, write, describe.

A snapshot is written into a hidden partial directory beside its target and renamed into place
once ``memory.bin``, ``vmstate.bin`` and ``metadata.json`` are all in it (see :mod:`.publish`), so
a store never holds a half snapshot under its final name, even if the writer is killed. The writer
holds the name's lock throughout; a second writer of the same name fails at once.

Bake-time dedup: unless told otherwise (``base=None``, or ``SUPERMACHINE_AUTO_DEDUP=0``), a fresh
snapshot is stored as a *diff* against its golden (see :mod:`.golden`): only the pages that differ
from the golden's RAM are written, and a restore maps the golden copy-on-write under them, so every
VM restored from any snapshot on that golden shares the golden's pages in the host page cache.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from supermachine.errors import SnapshotError
from supermachine.snapshots import golden, metadata, publish, verify
from supermachine.snapshots.metadata import FileIdentity, ImageIdentity, RunDefaults, SnapshotMetadata

BaseChoice = str | os.PathLike[str] | Literal["auto"] | None


class _Snapshottable(Protocol):
    def snapshot(self, dir: str, base: str | None = None) -> Any: ...


@dataclass(frozen=True)
class BakeResult:
    directory: Path
    meta: SnapshotMetadata
    report: dict[str, Any]
    """The VMM's report: ``memory_bytes``, ``diff_pages``, ``compared_pages``, ``phases``..."""
    seconds: float


@functools.lru_cache(maxsize=64)
def _identity(path: str, size: int, mtime_ns: int) -> FileIdentity:
    return FileIdentity.of(path)


def file_identity(path: str | os.PathLike[str]) -> FileIdentity:
    """:class:`FileIdentity` of a file, hashed once per (path, size, mtime) in this process."""
    st = os.stat(path)
    return _identity(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _rootfs_digest(path: str, size: int, mtime_ns: int) -> str:
    return metadata.blake3_file(path)


def rootfs_identity(rootfs: str | os.PathLike[str] | None) -> ImageIdentity:
    """The image identity of a VM booted on a bare root filesystem image (not from an OCI image):
    the file's content hash stands in for the config digest."""
    if rootfs is None:
        return ImageIdentity("rootfs:none", "none")
    path = os.path.abspath(rootfs)
    st = os.stat(path)
    return ImageIdentity(f"rootfs:{path}", _rootfs_digest(path, st.st_size, st.st_mtime_ns))


def choose_base(target: Path, prospective: SnapshotMetadata, base: BaseChoice) -> Path | None:
    """The snapshot directory a new snapshot at ``target`` is stored against, or ``None`` for a
    full one. ``"auto"`` picks the golden among ``target``'s siblings, unless auto dedup is off."""
    if base is None:
        return None
    if base != "auto":
        path = Path(base)
        if not (path / metadata.METADATA_FILE).is_file():
            raise SnapshotError(f"base snapshot {path} has no {metadata.METADATA_FILE} (not a snapshot?)")
        return path
    if not golden.auto_dedup_enabled() or not target.parent.is_dir():
        return None
    fresh = golden.Snapshot(target, prospective, time.time_ns())
    return None if (choice := golden.select_golden(target.parent, fresh).golden) is None else choice.path


def bake(
    handle: _Snapshottable,
    target: str | os.PathLike[str],
    *,
    image: ImageIdentity,
    memory_mib: int,
    vcpus: int,
    kernel: str | os.PathLike[str] | FileIdentity,
    initramfs: str | os.PathLike[str] | FileIdentity,
    run: RunDefaults,
    base: BaseChoice = "auto",
) -> BakeResult:
    """Pauses the VM behind ``handle`` and writes a complete snapshot directory at ``target`` (which
    must not hold a snapshot yet). The VM stays paused. Raises :class:`SnapshotBusyError` at once if
    another writer holds the name.

    ``kernel`` and ``initramfs`` are the files the VM booted (hashed), or the identities recorded
    by the snapshot it was restored from (carried forward: the paths a snapshot's metadata names
    are never opened)."""
    with publish.name_lock(target):
        started = time.monotonic()
        directory = Path(target)
        kernel_id = kernel if isinstance(kernel, FileIdentity) else file_identity(kernel)
        agent_id = initramfs if isinstance(initramfs, FileIdentity) else file_identity(initramfs)
        prospective = SnapshotMetadata(
            image=image,
            memory_mib=memory_mib,
            vcpus=vcpus,
            kernel=kernel_id,
            agent=agent_id,
            run=run,
        )
        # The VMM refuses a base of another RAM size itself (one line, before it writes anything).
        base_dir = choose_base(directory, prospective, base)
        partial = publish.prepare(directory)
        try:
            try:
                report = dict(handle.snapshot(str(partial), None if base_dir is None else str(base_dir)))
            except (OSError, ValueError, RuntimeError) as exc:
                raise SnapshotError(f"cannot snapshot the VM: {exc}") from None
            # What the VMM owns (memory identity, base and its identity) it recorded in
            # vmstate.bin; the metadata adds only what it does not know.
            meta = dataclasses.replace(prospective, created=time.time())
            metadata.save(partial, meta)
            publish.publish(partial, directory)
        except BaseException:
            publish.discard(partial)
            raise
        if isinstance(memory_id := report.get("memory_id"), str):
            verify.record_written(directory, memory_id)
        return BakeResult(directory, meta, report, time.monotonic() - started)


__all__ = ["BakeResult", "BaseChoice", "bake", "choose_base", "file_identity", "rootfs_identity"]
