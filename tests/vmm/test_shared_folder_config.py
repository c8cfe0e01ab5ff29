"""Shared host folders (virtio-fs) up to the VM: what ``VmConfig``, the ``-v`` option and the
VMM's config binding refuse before a guest runs, and which user a root-started worker serves a
read-write folder as. The guest side is in tests/e2e/test_shared_folders.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import vmm_guests as g
from supermachine import errors
from supermachine.errors import InputError, VmConfigError
from supermachine.vm import SharedFolder, VmConfig, VolumeMount, _check_restored_shares, _shared_folder_owner

StartVm = Callable[..., Any]


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """A file standing in for a root filesystem image (nothing boots here)."""
    image = tmp_path / "rootfs.squashfs"
    image.write_bytes(b"")
    return image


def folder(path: Path, owner: tuple[int, int] | None = None) -> Path:
    path.mkdir(parents=True)
    if owner is not None:
        os.chown(path, *owner)
    return path


def test_a_valid_share_builds_its_device_and_the_guest_runs(start_vm: StartVm, tmp_path: Path) -> None:
    share = folder(tmp_path / "share")
    mounts = [
        {"host_dir": str(share), "tag": "share0"},
        {"host_dir": str(share), "tag": "ro", "read_only": True},
    ]
    vm = start_vm(g.HELLO, mounts=mounts)
    ended = vm.wait(10)
    assert ended is not None and (ended.kind, ended.code) == ("poweroff", 42)


@pytest.mark.parametrize(
    ("mounts", "error", "message"),
    [
        ([{"host_dir": "SHARE", "tag": "has space"}], errors.VmConfigError, "must be 1 to 36 ASCII letters"),
        ([{"host_dir": "SHARE", "tag": "x" * 37}], errors.VmConfigError, "must be 1 to 36"),
        (
            [{"host_dir": "SHARE", "tag": "t"}, {"host_dir": "SHARE", "tag": "t"}],
            errors.VmConfigError,
            'two shared folders have the tag "t"',
        ),
        ([{"host_dir": "SHARE", "tag": "t", "color": 1}], ValueError, "unknown mount key 'color'"),
        ([{"tag": "t"}], ValueError, "a mount needs a 'host_dir'"),
        ([{"host_dir": "SHARE"}], ValueError, "a mount needs a 'tag'"),
        (["SHARE"], TypeError, "each mount must be a dict"),
        ({"host_dir": "SHARE"}, TypeError, "key 'mounts' must be a list"),
        ([{"host_dir": "SHARE/missing", "tag": "t"}], OSError, "missing"),
        ([{"host_dir": "SHARE/file", "tag": "t"}], errors.VmConfigError, "share/file is not a directory"),
    ],
)
def test_the_vmm_refuses_a_bad_share_in_one_line(
    start_vm: StartVm, tmp_path: Path, mounts: Any, error: type[Exception], message: str
) -> None:
    share = folder(tmp_path / "share")
    (share / "file").write_text("not a directory")

    def place(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("SHARE", str(share))
        if isinstance(value, list):
            return [place(v) for v in value]
        if isinstance(value, dict):
            return {k: place(v) for k, v in value.items()}
        return value

    with pytest.raises(error, match=message) as raised:
        start_vm(g.HELLO, mounts=place(mounts))
    assert "\n" not in str(raised.value)


def test_vm_config_checks_shares_before_anything_starts(rootfs: Path, tmp_path: Path) -> None:
    share = folder(tmp_path / "share")
    (tmp_path / "file").write_text("x")
    cases: list[tuple[VmConfig, type[Exception], str]] = [
        (VmConfig(mounts=(SharedFolder(share, "/s"),)), VmConfigError, "need a root filesystem"),
        (
            VmConfig(rootfs=rootfs, mounts=(SharedFolder(tmp_path / "nope", "/s"),)),
            VmConfigError,
            "nope does not exist or is not a directory",
        ),
        (
            VmConfig(rootfs=rootfs, mounts=(SharedFolder(tmp_path / "file", "/s"),)),
            VmConfigError,
            "file does not exist or is not a directory",
        ),
        (VmConfig(rootfs=rootfs, mounts=(SharedFolder(share, "s"),)), InputError, "absolute path below /"),
        (VmConfig(rootfs=rootfs, mounts=(SharedFolder(share, "/"),)), InputError, "absolute path below /"),
        (VmConfig(rootfs=rootfs, mounts=(SharedFolder(share, "/a/../etc"),)), InputError, "'..'"),
        (
            VmConfig(rootfs=rootfs, mounts=(SharedFolder(share, "/d/"),), volumes=(VolumeMount("v", "/d"),)),
            VmConfigError,
            "two mounts share the guest directory /d",
        ),
    ]
    for config, error, message in cases:
        with pytest.raises(error, match=message):
            config.validated()


@pytest.mark.skipif(os.geteuid() != 0, reason="a worker changes its user only when started by root")
def test_a_root_started_worker_serves_read_write_shares_as_their_owner(rootfs: Path, tmp_path: Path) -> None:
    def owner(*mounts: SharedFolder, vmm: Any = "worker") -> tuple[int, int] | None:
        return _shared_folder_owner(VmConfig(rootfs=rootfs, mounts=mounts, vmm=vmm))

    mine = folder(tmp_path / "mine", (1234, 2345))
    also_mine = folder(tmp_path / "also", (1234, 2345))
    theirs = folder(tmp_path / "theirs", (4321, 4321))
    roots = folder(tmp_path / "roots", (0, 0))
    assert owner(SharedFolder(mine, "/a"), SharedFolder(also_mine, "/b")) == (1234, 2345)
    # Read-only shares do not choose: they are read as whoever serves the VM.
    assert owner(SharedFolder(mine, "/a"), SharedFolder(roots, "/r", read_only=True)) == (1234, 2345)
    assert owner(SharedFolder(roots, "/r", read_only=True)) is None
    assert owner(SharedFolder(roots, "/r"), vmm="in-process") is None
    with pytest.raises(VmConfigError, match=r"roots read-write: it belongs to root, .* or add :ro"):
        owner(SharedFolder(roots, "/r"))
    two_owners = r"must have one owner: .*mine \(uid 1234\), .*theirs \(uid 4321\)"
    with pytest.raises(VmConfigError, match=two_owners):
        owner(SharedFolder(mine, "/a"), SharedFolder(theirs, "/b"))


def test_the_cli_refuses_bad_shares_in_one_line(rootfs: Path, tmp_path: Path) -> None:
    for spec, complaint in [
        (f"{tmp_path / 'nope'}:/data", "nope does not exist or is not a directory"),
        (f"{tmp_path}:data", "the guest directory must be an absolute path below /"),
        (f"{tmp_path}:/data:rx", "expected NAME:/GUEST/DIR[:ro] or HOST_DIR:/GUEST/DIR[:ro]"),
        ("bad name:/data", "volume name"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "supermachine", "boot", "--rootfs", str(rootfs), "-v", spec, "--", "true"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode != 0 and complaint in proc.stderr, (spec, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_a_restore_names_one_folder_per_share_of_the_snapshot(tmp_path: Path) -> None:
    share = folder(tmp_path / "share")
    info: Any = {"shares": [False, True]}
    _check_restored_shares(tmp_path, info, (SharedFolder(share, "/a"), SharedFolder(share, "/b")))
    with pytest.raises(
        VmConfigError, match=r"with 2 shared folder\(s\), and 1 were given: pass one per folder"
    ):
        _check_restored_shares(tmp_path, info, (SharedFolder(share, "/a"),))
