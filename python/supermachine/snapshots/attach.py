"""What a restore attaches to the guest: only what the caller names or the image store vouches for.

A snapshot directory may have been written by anyone. Its ``vmstate.bin`` and ``metadata.json``
describe the VM, but no path in them is ever opened: the root filesystem of an OCI image's snapshot
is the image cache's squashfs for the image's config digest, a bare root filesystem's snapshot needs
the caller's file (whose content must match the recorded digest), extra disks are the caller's, and
a diff's base is the sibling directory its ``vmstate.bin`` names as ``../NAME`` (the VMM refuses
anything else), or the caller's ``base=``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from supermachine.errors import SnapshotError, SupermachineError
from supermachine.snapshots.metadata import ImageIdentity, SnapshotMetadata

if TYPE_CHECKING:
    from supermachine import _core
    from supermachine.vm import Disk

_BARE_ROOTFS = "rootfs:"
_NO_ROOTFS = "rootfs:none"

_vouched_rootfs: dict[str, Path] = {}
"""Bare root filesystems VMs of this process were snapshotted on, by content digest: files the
caller gave :meth:`Vm.start <supermachine.vm.Vm.start>`, so restoring those snapshots in this
process needs no ``rootfs=`` (the file's content is checked again before it is attached)."""


def vouch_for_rootfs(identity: ImageIdentity, rootfs: str | os.PathLike[str] | None) -> None:
    """Remembers the caller's bare root filesystem behind ``identity`` (see ``_vouched_rootfs``)."""
    if rootfs is not None and identity.ref.startswith(_BARE_ROOTFS) and identity.ref != _NO_ROOTFS:
        _vouched_rootfs[identity.config_digest] = Path(os.path.abspath(rootfs))


def check_state_matches(directory: Path, meta: SnapshotMetadata, info: _core.SnapshotInfo) -> None:
    """The metadata agrees with the VM state on the VM's shape. (Whether it is a diff, and of
    which base, only the VM state records.)"""
    if info["memory_size"] != meta.memory_mib << 20:
        raise SnapshotError(
            f"{directory}: metadata says {meta.memory_mib} MiB of RAM, "
            f"the VM state {info['memory_size'] >> 20} MiB"
        )
    if info["vcpus"] != meta.vcpus:
        raise SnapshotError(f"{directory}: metadata says {meta.vcpus} vCPUs, the VM state {info['vcpus']}")


def snapshot_rootfs(
    directory: Path, meta: SnapshotMetadata, given: str | os.PathLike[str] | None
) -> Path | None:
    """The root filesystem to attach: ``given`` (the caller's), else the image cache's for the
    snapshot's image. A bare root filesystem must be given, and must hold the recorded content."""
    image = meta.image
    if image.ref == _NO_ROOTFS:
        if given is not None:
            raise SnapshotError(
                f"{directory} was taken of a VM without a root filesystem; do not pass rootfs"
            )
        return None
    if image.ref.startswith(_BARE_ROOTFS):
        return _checked_bare_rootfs(directory, meta, given)
    if given is not None:
        return Path(given)
    return _cached_rootfs(directory, meta)


def _checked_bare_rootfs(
    directory: Path, meta: SnapshotMetadata, given: str | os.PathLike[str] | None
) -> Path:
    from supermachine.snapshots import bake

    recorded = meta.image.ref.removeprefix(_BARE_ROOTFS)
    if given is None:
        given = _vouched_rootfs.get(meta.image.config_digest)
    if given is None:
        raise SnapshotError(
            f"{directory} was taken of a VM on the root filesystem image {recorded}; "
            "pass rootfs= with that file"
        )
    path = Path(given)
    if not _is_regular(path):
        raise SnapshotError(f"rootfs {path} does not exist or is not a regular file")
    digest = bake.rootfs_identity(path).config_digest
    if digest != meta.image.config_digest:
        raise SnapshotError(
            f"rootfs {path} does not match {directory}: its content is {digest}, "
            f"the snapshot was taken on {meta.image.config_digest}"
        )
    return path


def _cached_rootfs(directory: Path, meta: SnapshotMetadata) -> Path:
    from supermachine.oci.store import ImageStore

    image = meta.image
    try:
        path = ImageStore().rootfs_path(image.config_digest)
    except SupermachineError:
        raise SnapshotError(
            f"{directory}: the image config digest {image.config_digest!r} is not a digest; pass rootfs="
        ) from None
    if not _is_regular(path):
        raise SnapshotError(
            f"{directory}: the root filesystem of {image.ref} ({image.config_digest}) is not in the image "
            "cache; pull the image again or pass rootfs="
        )
    return path


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def restore_disks(
    directory: Path,
    rootfs: Path | str | None,
    disks: Sequence[Disk],
    info: _core.SnapshotInfo,
    volume_disks: Sequence[_core.VmDisk] = (),
) -> list[_core.VmDisk]:
    """The disks in device order: the root filesystem (always read-only), then the caller's,
    then its volumes' (held by the caller)."""
    wanted: list[_core.VmDisk] = []
    if rootfs is not None:
        wanted.append({"path": str(rootfs), "read_only": True})
    wanted += [{"path": str(d.path), "read_only": d.read_only} for d in disks]
    wanted += volume_disks
    saved = len(info["disks"])
    if len(wanted) != saved:
        has_root = "the root filesystem and " if rootfs is not None else ""
        raise SnapshotError(
            f"{directory} has {saved} disks, but {len(wanted)} were given ({has_root}disks= and volumes=): "
            "pass the snapshot's extra disks and volumes, in order"
        )
    for disk in disks:
        if not _is_regular(Path(disk.path)):
            raise SnapshotError(f"disk {disk.path} does not exist or is not a regular file")
    return wanted


_SIBLING_RULE = (
    "a diff's base must be a sibling snapshot in the same store, named by one directory name "
    "(pass base= to name another)"
)


def recorded_base(directory: Path, recorded: str) -> Path:
    """The base directory a diff's ``vmstate.bin`` records (``_core.snapshot_info(dir)["base"]
    ["path"]``): only ``../NAME``, a sibling that is not a symlink (the rule the VMM applies too).
    Raises :class:`SnapshotError` naming the rule."""
    name = recorded.removeprefix("../")
    if name == recorded or "/" in name or name in ("", ".", "..") or "\0" in name:
        raise SnapshotError(
            f"{directory}: the VM state names the base {recorded!r}, not '../NAME'; {_SIBLING_RULE}"
        )
    path = directory.parent / name
    if path.is_symlink():
        raise SnapshotError(f"{directory}: the base {name!r} is a symlink; {_SIBLING_RULE}")
    return path


def base_name(info: _core.SnapshotInfo) -> str | None:
    """How to show the base a snapshot's VM state records: a sibling's directory name (the VM
    state says ``../NAME``), any other recorded path as it is, ``None`` for a full snapshot."""
    if info["base"] is None:
        return None
    recorded = info["base"]["path"]
    name = recorded.removeprefix("../")
    return name if name != recorded and "/" not in name else recorded


def base_override(
    directory: Path, meta: SnapshotMetadata, info: _core.SnapshotInfo, given: str | os.PathLike[str] | None
) -> str | None:
    """Where the VMM finds a diff's base: ``given`` (the caller's), else ``None`` for the sibling
    the VM state records (which the VMM and :func:`.verify.check_ram` accept only as ``../NAME``,
    see :func:`recorded_base`). ``directory``, ``meta`` and ``info`` are not consulted: the VM
    state alone records the base."""
    del directory, meta, info
    return None if given is None else os.fspath(given)


__all__ = [
    "base_name",
    "base_override",
    "check_state_matches",
    "recorded_base",
    "restore_disks",
    "snapshot_rootfs",
    "vouch_for_rootfs",
]
