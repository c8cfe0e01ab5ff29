"""``supermachine doctor`` on this host: the real probe, through the real console entry point."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from supermachine import _core
from supermachine.cli import doctor as doctor_cli

ROOT = os.geteuid() == 0


def _kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def _landlock_abi() -> int | str:
    """The kernel's answer, asked directly: landlock_create_ruleset(NULL, 0, VERSION)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    sys_landlock_create_ruleset = 444  # the same number on x86_64 and arm64
    abi = libc.syscall(sys_landlock_create_ruleset, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return abi if abi > 0 else errno.errorcode[ctypes.get_errno()]


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "python")}
    return subprocess.run(
        [sys.executable, "-m", "supermachine", "doctor", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )


def test_json_states_the_facts_of_this_host() -> None:
    proc = _doctor("--json")
    report = json.loads(proc.stdout)
    protections = report["protections"]
    assert list(protections) == list(doctor_cli.LABELS)
    for name, entry in protections.items():
        assert isinstance(entry["available"], bool), name
        assert entry["detail"] and "\n" not in entry["detail"], name
    assert protections["kvm"]["available"] is _kvm_usable()
    assert report["vms_can_run"] is _kvm_usable()
    assert proc.returncode == (0 if _kvm_usable() else 1)
    assert protections["root"]["available"] is ROOT
    assert protections["kvm_pvm"]["available"] is Path("/sys/module/kvm_pvm").exists()
    emulating = protections["kvm_pvm"]["available"]
    assert report["rootfs_compression"]["compression"] == ("none" if emulating else "gzip")
    if ROOT:
        assert report["jail"] == "full"
    landlock = protections["landlock"]
    abi = _landlock_abi()
    if isinstance(abi, int):
        assert landlock["available"], landlock
        assert landlock["detail"].startswith(f"Landlock ABI version {abi}"), landlock
        assert "every worker thread restricts itself (files" in landlock["detail"], landlock
        # TCP rights came with ABI 4, the abstract-socket scope with ABI 6.
        assert ("TCP" in landlock["detail"]) is (abi >= 4)
        assert ("abstract sockets" in landlock["detail"]) is (abi >= 6)
    else:
        assert not landlock["available"]
        assert landlock["detail"].startswith("Landlock is not available: ")


@pytest.mark.skipif(not ROOT or not _kvm_usable(), reason="states the facts of a root host with KVM")
def test_root_host_with_kvm() -> None:
    protections = _core.host_protections()
    for name in ("root", "kvm", "seccomp", "no_new_privs", "mount_namespace", "pid_namespace", "pivot_root"):
        assert protections[name]["available"], f"{name}: {protections[name]['detail']}"
    assert protections["kvm"]["detail"].startswith("/dev/kvm opens read-write")
    assert _core.host_jail_level() == "full"
    # The memory controller: v2 when the unified hierarchy offers it, else the v1 hierarchy.
    memory = protections["cgroup_memory"]
    assert memory["available"], memory["detail"]
    unified = Path("/sys/fs/cgroup/cgroup.controllers")
    if not unified.exists() or "memory" not in unified.read_text().split():
        assert memory["detail"].startswith("cgroup v1 memory controller"), memory["detail"]


def test_table_lists_every_protection_and_the_jail() -> None:
    result = CliRunner().invoke(doctor_cli.doctor, [], catch_exceptions=False) if _kvm_usable() else None
    if result is None:
        pytest.skip("the table exits through KvmUnavailableError without KVM; the JSON test covers that")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["PROTECTION", "STATE", "WHY"]
    for label in doctor_cli.LABELS.values():
        assert any(line.startswith(label) for line in lines), label
    assert "VMs run in a " in result.output
    assert (
        "Image root filesystems: " + ("uncompressed" if Path("/sys/module/kvm_pvm").exists() else "gzip")
        in result.output
    )
    landlock_line = next(line for line in lines if line.startswith("Landlock"))
    if isinstance(_landlock_abi(), int):
        assert landlock_line.split()[1] == "active", landlock_line
        assert f"Landlock ABI version {_landlock_abi()}" in result.output
        assert ", Landlock, one worker process per VM." in result.output
    else:
        assert "not available" in landlock_line


@pytest.mark.skipif(not ROOT, reason="hiding /dev/kvm in a private mount namespace needs root")
def test_exit_1_with_one_line_when_kvm_is_missing() -> None:
    # The command runs where /dev is an empty tmpfs: its own mount namespace, so nothing else sees it.
    python = str(Path(__file__).parents[2] / "python")
    script = f'mount -t tmpfs tmpfs /dev && PYTHONPATH={python} exec "$0" -m supermachine doctor'
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, sys.executable],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: VMs cannot run here: /dev/kvm does not exist"), proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "not available" in proc.stdout  # the table is still printed, before the error
