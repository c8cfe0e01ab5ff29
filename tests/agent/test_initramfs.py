"""The initramfs builder: a newc cpio with the agent as /init, reproducible and cached."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from supermachine import initramfs
from supermachine.errors import AgentBuildError
from supermachine.initramfs import CpioEntry, newc_archive

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio is not installed")


def _listing(archive: bytes) -> list[str]:
    result = subprocess.run(["cpio", "-it", "--quiet"], input=archive, capture_output=True, check=True)
    return result.stdout.decode().split()


@needs_cpio
def test_initramfs_holds_the_agent_as_init(agent_binary: Path, tmp_path: Path) -> None:
    path = initramfs.initramfs_path()
    archive = path.read_bytes()
    names = _listing(archive)
    assert "init" in names
    for directory in ("dev", "proc", "sys", "run", "tmp", "mnt/lower", "mnt/rw", "mnt/root"):
        assert directory in names
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames", "init", "tmp"],
        input=archive,
        cwd=tmp_path,
        check=True,
    )
    init = tmp_path / "init"
    assert init.read_bytes() == agent_binary.read_bytes()
    assert stat.S_IMODE(init.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "tmp").stat().st_mode) == 0o1777


def test_initramfs_is_cached_and_reproducible(agent_binary: Path) -> None:
    first = initramfs.initramfs_path()
    data = first.read_bytes()
    assert initramfs.initramfs_path(build=False) == first
    rebuilt = newc_archive(initramfs.initramfs_entries(agent_binary.read_bytes()))
    assert rebuilt == data
    assert newc_archive(initramfs.initramfs_entries(agent_binary.read_bytes())) == rebuilt
    assert first.parent.parent.name == "initramfs"


@needs_cpio
def test_newc_format_details() -> None:
    archive = newc_archive(
        [
            CpioEntry("dir", stat.S_IFDIR | 0o750),
            CpioEntry("dir/file", stat.S_IFREG | 0o640, b"abc"),
            CpioEntry("dir/link", stat.S_IFLNK | 0o777, b"file"),
            CpioEntry("dev", stat.S_IFDIR | 0o755),
            CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        ]
    )
    assert archive.startswith(b"070701")
    assert len(archive) % 4 == 0
    assert b"TRAILER!!!\0" in archive
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    lines = listing.splitlines()
    assert lines[0].startswith("drwxr-x---")
    assert lines[1].startswith("-rw-r-----") and lines[1].endswith("dir/file")
    assert lines[2].startswith("lrwxrwxrwx") and lines[2].endswith("dir/link -> file")
    assert lines[4].startswith("crw-------") and "5,   1" in lines[4]


def test_member_names_are_checked() -> None:
    with pytest.raises(AgentBuildError, match="invalid initramfs member name '/init'"):
        newc_archive([CpioEntry("/init", stat.S_IFREG | 0o755, b"")])
