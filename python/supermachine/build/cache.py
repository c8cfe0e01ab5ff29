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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supermachine import paths
from supermachine.oci.store import BlobStore, atomic_write_bytes

ENTRY_VERSION = 1
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
class CacheEntry:
    """What a step made: a layer, or nothing (a step that changed no file)."""

    layer: LayerRef | None


def chain(previous: str, step: object) -> str:
    """The key of a step: its inputs (JSON) after the key of the step before."""
    data = json.dumps([previous, step], sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()


class BuildCache:
    """Step results by key (see the module docstring)."""

    def __init__(self, blobs: BlobStore, root: Path | None = None) -> None:
        self.dir = (root or paths.cache_dir() / "build") / "steps"
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
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # damaged: the step runs again and rewrites it
        if layer is not None and not self.blobs.has(layer.digest, layer.size):
            return None
        return CacheEntry(layer)

    def put(self, key: str, entry: CacheEntry) -> None:
        data = {"version": ENTRY_VERSION, "layer": entry.layer.to_json() if entry.layer else None}
        atomic_write_bytes(self._path(key), json.dumps(data).encode())
