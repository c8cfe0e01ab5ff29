"""Real filesystems for the snapshot-store tests: XFS and btrfs (reflinks) and ext4/tmpfs (none),
each a loop-mounted image (or a tmpfs) in a temp dir, unmounted by a finalizer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from snapstore_support import MIB

MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}


def _skip(reason: str) -> None:
    print(f"skipping: {reason}", file=sys.stderr)
    pytest.skip(reason)


def _mount_image(base: Path, fstype: str, size: int) -> Iterator[Path]:
    if os.geteuid() != 0:
        _skip("loop-mounting a filesystem image needs root")
    if shutil.which(MKFS[fstype][0]) is None:
        _skip(f"{MKFS[fstype][0]} is not installed (scripts/apt-packages.txt)")
    if not Path("/dev/loop-control").exists():
        _skip("no loop devices (/dev/loop-control missing)")
    image = base / f"{fstype}.img"
    mnt = base / f"{fstype}-mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size)
    mkfs = subprocess.run([*MKFS[fstype], str(image)], capture_output=True, text=True)
    if mkfs.returncode != 0:
        _skip(f"{MKFS[fstype][0]} failed: {mkfs.stderr.strip()}")
    mount = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
    if mount.returncode != 0:
        _skip(f"cannot loop-mount a {fstype} image: {mount.stderr.strip()}")
    try:
        yield mnt
    finally:
        _umount(mnt)
        image.unlink(missing_ok=True)


def _umount(mnt: Path) -> None:
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture(scope="session")
def xfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield from _mount_image(tmp_path_factory.mktemp("xfs"), "xfs", 1024 * MIB)


@pytest.fixture(scope="session")
def btrfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield from _mount_image(tmp_path_factory.mktemp("btrfs"), "btrfs", 1024 * MIB)


@pytest.fixture(scope="session")
def ext4_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield from _mount_image(tmp_path_factory.mktemp("ext4"), "ext4", 512 * MIB)


@pytest.fixture(scope="session")
def tmpfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        _skip("mounting a tmpfs needs root")
    mnt = tmp_path_factory.mktemp("tmpfs")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256M", "tmpfs", str(mnt)], capture_output=True
    )
    if result.returncode != 0:
        _skip(f"cannot mount a tmpfs: {result.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        _umount(mnt)


def _store_in(mnt: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    store = mnt / request.node.name.replace("[", "_").replace("]", "").replace("/", "_")
    store.mkdir()
    try:
        yield store
    finally:
        shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(params=["xfs", "btrfs"])
def reflink_store(request: pytest.FixtureRequest) -> Iterator[Path]:
    """An empty snapshot store on a filesystem with reflinks (XFS, then btrfs)."""
    mnt = request.getfixturevalue(f"{request.param}_mount")
    yield from _store_in(mnt, request)


@pytest.fixture
def xfs_store(xfs_mount: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    yield from _store_in(xfs_mount, request)


@pytest.fixture(params=["tmpfs", "ext4"])
def plain_store(request: pytest.FixtureRequest) -> Iterator[Path]:
    """An empty snapshot store on a filesystem without reflinks (tmpfs, then ext4)."""
    mnt = request.getfixturevalue(f"{request.param}_mount")
    yield from _store_in(mnt, request)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache directory of the test's own, so verification records never touch the user's."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def raw_guests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory to build the tiny test guests in; skips where KVM or binutils are missing."""
    if not os.path.exists("/dev/kvm"):
        _skip("/dev/kvm does not exist (no KVM on this machine)")
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        _skip(f"/dev/kvm is not usable: {e.strerror}")
    for tool in ("as", "ld", "objcopy"):
        if shutil.which(tool) is None:
            _skip(f"{tool} (binutils) is needed to build the test guests")
    return tmp_path_factory.mktemp("raw-guests")
