"""The build cache: what each step made, by the step's key.

A key is a chain: ``sha256`` of the previous step's key and this step's instruction and inputs (the
build arguments in scope, the digest of the files a COPY takes), starting from the base image's
config digest. So a key names the whole history of a file system, and a hit means the step's
result is known without running it.

Entries live under ``<cache>/build/steps/<key hex>.json`` and name their layer by digest; the layer
itself is a blob of the image store. An entry is written atomically once its layer is stored, so a
killed build leaves either a complete entry or none. An entry whose layer the store no longer has
(``supermachine prune`` removed it) is a miss.

Step snapshots live beside the entries, under ``<cache>/build/snapshots/<key hex>``, each a diff
against the one of the step before. :meth:`BuildCache.prune` (part of ``supermachine prune``)
deletes the entries that became misses, and every snapshot no entry can restore any more, keeping
the bases the kept ones are diffs of.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supermachine import paths
from supermachine.oci.store import BlobStore, atomic_write_bytes, remove_entry, scan_entries

ENTRY_VERSION = 1
_SNAPSHOT_NAME = re.compile(r"[a-f0-9]{64}")
_ENTRY_NAME = re.compile(r"[a-f0-9]{64}\.json")
_MAX_ENTRY_BYTES = 64 << 10


@dataclass(frozen=True)
class LayerRef:
    """A layer of an image being built: its descriptor and its diff id."""

    media_type: str
    digest: str
    size: int
    diff_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "media_type": self.media_type,
            "digest": self.digest,
            "size": self.size,
            "diff_id": self.diff_id,
        }

    @classmethod
    def from_json(cls, data: Any) -> LayerRef:
        return cls(str(data["media_type"]), str(data["digest"]), int(data["size"]), str(data["diff_id"]))


@dataclass(frozen=True)
class StepSnapshot:
    """The build VM right after a step: a snapshot beside the cache entries, the agent's mark of
    that moment, and the root file system image the VM runs on as it was then (a rebuilt one,
    even of the same layers, may lay its blocks out otherwise: the VM's page cache would lie)."""

    name: str
    mark: int
    rootfs: str
    rootfs_stamp: tuple[int, int, int]
    """(inode, size, mtime ns) of ``rootfs`` when the snapshot was taken."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mark": self.mark,
            "rootfs": self.rootfs,
            "rootfs_stamp": list(self.rootfs_stamp),
        }

    @classmethod
    def from_json(cls, data: Any) -> StepSnapshot:
        stamp = tuple(int(v) for v in data["rootfs_stamp"])
        if len(stamp) != 3 or not _SNAPSHOT_NAME.fullmatch(str(data["name"])):
            raise ValueError("bad snapshot record")
        return cls(str(data["name"]), int(data["mark"]), str(data["rootfs"]), (stamp[0], stamp[1], stamp[2]))


def file_stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class CacheEntry:
    """What a step made: a layer, or nothing (a step that changed no file), and, when it ran, a
    snapshot of the build VM after it."""

    layer: LayerRef | None
    snapshot: StepSnapshot | None = None


@dataclass(frozen=True)
class CachePruneResult:
    """What :meth:`BuildCache.prune` deleted."""

    entries: int
    snapshots: int
    other: int
    """Files and directories that are neither: what killed builds left."""
    bytes_freed: int
    rootfs_in_use: frozenset[Path]
    """The root file systems the kept snapshots restore with."""


def chain(previous: str, step: object) -> str:
    """The key of a step: its inputs (JSON) after the key of the step before."""
    data = json.dumps([previous, step], sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()


class BuildCache:
    """Step results by key (see the module docstring)."""

    def __init__(self, blobs: BlobStore, root: Path | None = None) -> None:
        base = root or paths.cache_dir() / "build"
        self.dir = base / "steps"
        self.snapshots = base / "snapshots"
        """Step snapshots, siblings, so each can be a diff against the one before it."""
        self.blobs = blobs

    def _path(self, key: str) -> Path:
        return self.dir / f"{key.removeprefix('sha256:')}.json"

    def get(self, key: str) -> CacheEntry | None:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, OSError):
            return None
        with os.fdopen(fd, "rb") as f:
            raw = f.read(_MAX_ENTRY_BYTES + 1)
        try:
            data = json.loads(raw)
            if data.get("version") != ENTRY_VERSION or len(raw) > _MAX_ENTRY_BYTES:
                return None
            layer = LayerRef.from_json(data["layer"]) if data.get("layer") else None
            snapshot = StepSnapshot.from_json(data["snapshot"]) if data.get("snapshot") else None
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # damaged: the step runs again and rewrites it
        if layer is not None and not self.blobs.has(layer.digest, layer.size):
            return None
        return CacheEntry(layer, snapshot)

    def snapshot_usable(self, snapshot: StepSnapshot) -> Path | None:
        """The snapshot's directory if it and the root file system it ran on are still as they
        were; ``None`` otherwise (a boot serves instead)."""
        directory = self.snapshots / snapshot.name
        try:
            if file_stamp(Path(snapshot.rootfs)) != snapshot.rootfs_stamp:
                return None
        except OSError:
            return None
        return directory if (directory / "metadata.json").is_file() else None

    def put(self, key: str, entry: CacheEntry) -> None:
        data: dict[str, Any] = {
            "version": ENTRY_VERSION,
            "layer": entry.layer.to_json() if entry.layer else None,
        }
        if entry.snapshot is not None:
            data["snapshot"] = entry.snapshot.to_json()
        atomic_write_bytes(self._path(key), json.dumps(data).encode())

    def prune(self) -> CachePruneResult:
        """Deletes entries whose layer is gone, snapshots no remaining entry can restore (its
        directory or root file system changed or went) unless a kept one is a diff of it, and
        leftovers. The caller (:meth:`ImageStore.prune <supermachine.oci.store.ImageStore.prune>`)
        holds the image store's lock exclusively, so no build is running, and keeps the root file
        systems the result names."""
        entries = other = freed = 0
        live: set[str] = set()
        rootfs: set[Path] = set()
        for item in scan_entries(self.dir):
            if not _ENTRY_NAME.fullmatch(item.name) or not item.is_file(follow_symlinks=False):
                freed += remove_entry(item)
                other += 1
                continue
            entry = self.get("sha256:" + item.name.removesuffix(".json"))
            if entry is None:
                freed += remove_entry(item)
                entries += 1
            elif entry.snapshot is not None and self.snapshot_usable(entry.snapshot) is not None:
                live.add(entry.snapshot.name)
                rootfs.add(Path(entry.snapshot.rootfs))
        todo = list(live)
        while todo:
            base = self._base_of(todo.pop())
            if base is not None and base not in live:
                live.add(base)
                todo.append(base)
        snapshots = 0
        for item in scan_entries(self.snapshots):
            if item.name in live and item.is_dir(follow_symlinks=False):
                continue
            freed += remove_entry(item)
            if _SNAPSHOT_NAME.fullmatch(item.name):
                snapshots += 1
            else:
                other += 1
        return CachePruneResult(entries, snapshots, other, freed, frozenset(rootfs))

    def _base_of(self, name: str) -> str | None:
        """The sibling a step snapshot is a diff of (``None``: a full one, or unreadable)."""
        from supermachine.errors import SupermachineError
        from supermachine.snapshots import attach, verify

        try:
            base = attach.base_name(verify.snapshot_info(self.snapshots / name))
        except SupermachineError:
            return None
        return base if base is not None and _SNAPSHOT_NAME.fullmatch(base) else None
