"""The build cache: what each step made, by the step's key.

A key is a chain: ``sha256`` of the previous step's key and this step's instruction and inputs (the
build arguments in scope, the digest of the files a COPY takes), starting from the base image's
config digest. So a key names the whole history of a file system, and a hit means the step's
result is known without running it.

Entries live under ``<cache>/build/steps/<key hex>.json`` and name their layer by digest; the layer
itself is a blob of the image store. An entry is written atomically once its layer is stored, so a
killed build leaves either a complete entry or none. An entry whose layer the store no longer has
(``supermachine prune`` removed it) is a miss.
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
from supermachine.oci.store import BlobStore, atomic_write_bytes

ENTRY_VERSION = 1
_SNAPSHOT_NAME = re.compile(r"[a-f0-9]{64}")
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
