"""`supermachine prune` in the build cache: steps whose layer went with a removed image are deleted,
and so are the build VM snapshots no remaining step can restore (their directory or the root file
system they run on changed or went) and what killed builds left; what live steps need stays, their
root file systems included. Real stores on disk, the real CLI; no VM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from supermachine.build.cache import BuildCache, CacheEntry, LayerRef, StepSnapshot, file_stamp
from supermachine.oci.store import ImageRecord, ImageStore

MEDIA = "application/vnd.oci.image.layer.v1.tar+gzip"


def prune(cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SUPERMACHINE_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "supermachine", "prune"], capture_output=True, text=True, env=env, timeout=120
    )


def layer(store: ImageStore, data: bytes) -> LayerRef:
    digest = store.blobs.put_bytes(data)
    return LayerRef(MEDIA, digest, len(data), digest)


def step(cache: BuildCache, store: ImageStore, key: int, layer_ref: LayerRef | None, name: str | None) -> str:
    """A cache entry (key ``key``) with a snapshot directory ``name`` on a root file system of its
    own in the store; returns the entry's file name."""
    snapshot = None
    if name is not None:
        rootfs = store.rootfs_dir / f"{name[:8]}.squashfs"
        rootfs.parent.mkdir(parents=True, exist_ok=True)
        rootfs.write_bytes(b"hsqs" + name.encode())
        directory = cache.snapshots / name
        directory.mkdir(parents=True)
        (directory / "metadata.json").write_text("{}")
        (directory / "memory.bin").write_bytes(b"\0" * 4096)
        snapshot = StepSnapshot(name, 1, str(rootfs), file_stamp(rootfs))
    full_key = f"sha256:{key:064x}"
    cache.put(full_key, CacheEntry(layer_ref, snapshot))
    return f"{key:064x}.json"


def test_prune_keeps_what_live_steps_need_and_drops_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = ImageStore(root)
    cache = BuildCache(store.blobs, root / "build")
    kept_layer = layer(store, b"kept layer")
    dropped_layer = layer(store, b"layer of a removed image")
    store.add(
        ImageRecord(
            "app:1", "sha256:" + "1" * 64, "sha256:" + "2" * 64, (kept_layer.digest,), 10, "linux/amd64"
        )
    )
    live, live_snap = step(cache, store, 1, kept_layer, "a" * 64), "a" * 64
    step(cache, store, 2, dropped_layer, "b" * 64)  # its layer goes, so it goes, and its snapshot
    # A step that changed no file stays, but its snapshot ran on a root file system that was
    # rebuilt since (a new inode): it cannot be restored, so it goes, and that file system too.
    stale, stale_snap = step(cache, store, 3, None, "c" * 64), "c" * 64
    stale_rootfs = store.rootfs_dir / f"{stale_snap[:8]}.squashfs"
    stale_rootfs.unlink()
    stale_rootfs.write_bytes(b"rebuilt")
    orphan = cache.snapshots / ("d" * 64)  # no step names it
    orphan.mkdir()
    partial = cache.snapshots / f".{'e' * 64}.snapshot-partial"  # a killed snapshot write
    partial.mkdir()
    (cache.dir / f".{'f' * 64}.json.tmp-0123456789ab").write_text("{")  # a killed entry write
    (cache.dir / f"{'9' * 64}.json").write_text("not json")  # damaged: a miss, so deleted

    result = prune(root)
    assert result.returncode == 0, result.stderr
    assert "Deleted 2 build cache steps and 3 build VM snapshots whose images are gone" in result.stdout

    assert sorted(p.name for p in cache.dir.iterdir()) == sorted([live, stale])
    assert [p.name for p in cache.snapshots.iterdir()] == [live_snap]
    assert store.blobs.has(kept_layer.digest) and not store.blobs.has(dropped_layer.digest)
    assert sorted(p.name for p in store.rootfs_dir.iterdir()) == [f"{live_snap[:8]}.squashfs"]
    entry = cache.get(f"sha256:{1:064x}")
    assert entry is not None and entry.snapshot is not None
    assert cache.snapshot_usable(entry.snapshot) == cache.snapshots / live_snap
    assert json.loads((cache.dir / stale).read_text())["layer"] is None

    again = prune(root)
    assert again.returncode == 0 and "build cache steps" not in again.stdout, again.stdout
