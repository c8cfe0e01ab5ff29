"""Which root filesystem a restore attaches: the caller's or the image cache's, never a path from
the snapshot's metadata (no VM needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from supermachine.errors import SnapshotError
from supermachine.oci.store import ImageStore
from supermachine.snapshots import attach, bake
from supermachine.snapshots.metadata import FileIdentity, ImageIdentity, RunDefaults, SnapshotMetadata

DIGEST = "sha256:" + "ab" * 32


def _meta(image: ImageIdentity, rootfs: str | None) -> SnapshotMetadata:
    unused = FileIdentity("/nonexistent", "sha256:" + "0" * 64)
    return SnapshotMetadata(
        image=image,
        memory_mib=64,
        vcpus=1,
        kernel=unused,
        agent=unused,
        run=RunDefaults(rootfs=rootfs),
    )


@pytest.fixture
def host_file(tmp_path: Path) -> Path:
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"not for the guest")
    return secret


def test_an_oci_snapshot_gets_the_cached_rootfs_not_the_recorded_path(
    tmp_path: Path, host_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(tmp_path / "cache"))
    meta = _meta(ImageIdentity("busybox:latest", DIGEST), str(host_file))
    with pytest.raises(
        SnapshotError, match=r"root filesystem of busybox:latest \(sha256:abab.*\) is not in the image cache"
    ):
        attach.snapshot_rootfs(tmp_path, meta, None)
    cached = ImageStore().rootfs_path(DIGEST)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"squashfs")
    assert attach.snapshot_rootfs(tmp_path, meta, None) == cached
    # A digest that is no digest never becomes a path.
    bad = _meta(ImageIdentity("x", "sha256:../../etc"), None)
    with pytest.raises(SnapshotError, match="is not a digest; pass rootfs="):
        attach.snapshot_rootfs(tmp_path, bad, None)


def test_a_bare_rootfs_snapshot_needs_the_callers_file_with_the_same_content(
    tmp_path: Path, host_file: Path
) -> None:
    rootfs = tmp_path / "root.squashfs"
    rootfs.write_bytes(b"the root filesystem")
    identity = bake.rootfs_identity(rootfs)
    # The metadata names the host file as the rootfs, and even records its digest: not used.
    meta = _meta(ImageIdentity(f"rootfs:{host_file}", identity.config_digest), str(host_file))
    with pytest.raises(SnapshotError, match=f"on the root filesystem image {host_file}; pass rootfs="):
        attach.snapshot_rootfs(tmp_path, meta, None)
    with pytest.raises(SnapshotError, match=r"does not match .*: its content is blake3:"):
        attach.snapshot_rootfs(tmp_path, meta, host_file)
    assert attach.snapshot_rootfs(tmp_path, meta, rootfs) == rootfs
    with pytest.raises(SnapshotError, match="does not exist or is not a regular file"):
        attach.snapshot_rootfs(tmp_path, meta, tmp_path)


def test_a_rootfs_this_process_booted_is_vouched_for(tmp_path: Path) -> None:
    rootfs = tmp_path / "vouched.squashfs"
    rootfs.write_bytes(b"booted here")
    identity = bake.rootfs_identity(rootfs)
    meta = _meta(identity, None)
    with pytest.raises(SnapshotError, match="pass rootfs="):
        attach.snapshot_rootfs(tmp_path, meta, None)
    attach.vouch_for_rootfs(identity, rootfs)
    assert attach.snapshot_rootfs(tmp_path, meta, None) == rootfs
    rootfs.write_bytes(b"changed since")  # checked again before it is attached
    with pytest.raises(SnapshotError, match="does not match"):
        attach.snapshot_rootfs(tmp_path, meta, None)


def test_a_snapshot_without_rootfs_takes_none(tmp_path: Path) -> None:
    meta = _meta(ImageIdentity("rootfs:none", "none"), "/etc/passwd")
    assert attach.snapshot_rootfs(tmp_path, meta, None) is None
    with pytest.raises(SnapshotError, match="without a root filesystem"):
        attach.snapshot_rootfs(tmp_path, meta, tmp_path / "x")
