"""A real Linux guest: boot to the agent, run commands, move files, stop; a panic is reported."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from supermachine.errors import ExecTimeoutError, GuestPanickedError
from supermachine.vm import Vm, VmConfig

pytestmark = pytest.mark.slow


def test_echo(vm: Vm) -> None:
    result = vm.exec(["/bin/echo", "hi"])
    assert result.stdout == b"hi\n"
    assert (result.status, result.signal, result.timed_out) == (0, None, False)


def test_rootfs_is_mounted_with_a_writable_overlay(vm: Vm) -> None:
    assert vm.exec(["cat", "/etc/motd"]).stdout == b"hello from the rootfs\n"
    assert vm.exec(["sh", "-c", "echo changed > /etc/motd && cat /etc/motd"]).stdout == b"changed\n"
    mounts = vm.exec(["cat", "/proc/mounts"]).stdout.decode()
    assert "overlay / overlay" in mounts


def test_commands_create_files_with_umask_022(vm: Vm) -> None:
    """As in a container: new files 0644, directories 0755 (PID 1 starts with umask 0)."""
    result = vm.exec(
        ["sh", "-c", "rm -rf /tmp/um && mkdir /tmp/um && touch /tmp/um/f && stat -c %a /tmp/um /tmp/um/f"]
    )
    assert result.stdout == b"755\n644\n", result.stderr


def test_exit_status_stderr_and_signals(vm: Vm) -> None:
    failed = vm.exec(["sh", "-c", "echo oops >&2; exit 3"])
    assert (failed.status, failed.stderr, failed.stdout) == (3, b"oops\n", b"")
    killed = vm.exec(["sh", "-c", "kill -9 $$"])
    assert (killed.status, killed.signal) == (None, 9)


def test_stdin_env_cwd_user(vm: Vm) -> None:
    data = os.urandom(200_000)
    assert vm.exec(["cat"], input=data).stdout == data
    env = vm.exec(["env"], env={"ONLY": "this", "PATH": "/bin"}, replace_env=True).stdout.decode().split()
    # On emulating hosts the VM adds GLIBC_TUNABLES (glibc kept off AVX); nothing else is added.
    assert sorted(e for e in env if not e.startswith("GLIBC_TUNABLES=")) == ["ONLY=this", "PATH=/bin"]
    # Without replace_env, env adds to the defaults (as `run -e` adds to the image's Env).
    added = vm.exec(["env"], env={"EXTRA": "1"}).stdout.decode().split()
    assert "EXTRA=1" in added and "HOME=/root" in added
    assert vm.exec(["pwd"], cwd="/tmp").stdout == b"/tmp\n"
    assert vm.exec(["id", "-u"], user="nobody").stdout == b"65534\n"


def test_timeout_kills_the_command(vm: Vm) -> None:
    result = vm.exec(["sh", "-c", "sleep 600 & sleep 600"], timeout=2)
    assert result.timed_out and result.status is None
    with pytest.raises(ExecTimeoutError, match="timed out after 1 s"):
        vm.exec(["sleep", "600"], timeout=1, check=True)


def test_file_round_trip(vm: Vm) -> None:
    payload = os.urandom(300_000)
    vm.write_file("/tmp/blob", payload, mode=0o600)
    assert vm.read_file("/tmp/blob") == payload
    assert vm.exec(["stat", "-c", "%a %s", "/tmp/blob"]).stdout == b"600 300000\n"
    with pytest.raises(Exception, match="No such file"):
        vm.read_file("/tmp/missing")


def test_copy_a_tree_in_list_it_and_copy_it_back_out(vm: Vm, tmp_path: Path) -> None:
    source = tmp_path / "src" / "proj"
    (source / "lib").mkdir(parents=True)
    (source / "lib/data.bin").write_bytes(os.urandom(150_000))
    (source / "run.sh").write_text("#!/bin/sh\necho ran\n")
    os.chmod(source / "run.sh", 0o755)
    os.symlink("run.sh", source / "link")
    vm.exec(["sh", "-c", "rm -rf /tmp/cp && mkdir /tmp/cp"], check=True)
    assert vm.copy_in(source, "/tmp/cp") == 5
    assert vm.exec(["/tmp/cp/proj/link"]).stdout == b"ran\n"
    listing = {e.name: e for e in vm.listdir("/tmp/cp/proj")}
    assert sorted(listing) == ["lib", "link", "run.sh"]
    assert (listing["link"].type, listing["link"].link) == ("symlink", "run.sh")
    assert (listing["lib"].type, listing["run.sh"].mode, listing["run.sh"].uid) == ("dir", 0o755, 0)
    # What the guest adds comes back out with the rest; its /dev node does not.
    vm.exec(["sh", "-c", "echo made > /tmp/cp/proj/made && mknod /tmp/cp/proj/null c 1 3"], check=True)
    out = tmp_path / "out"
    out.mkdir()
    result = vm.copy_out("/tmp/cp/proj", out)
    assert (result.entries, result.skipped) == (6, 1)
    assert (out / "proj/lib/data.bin").read_bytes() == (source / "lib/data.bin").read_bytes()
    assert (out / "proj/made").read_text() == "made\n" and os.readlink(out / "proj/link") == "run.sh"
    assert not (out / "proj/null").exists()


def test_spawn_streams_output(vm: Vm) -> None:
    process = vm.spawn(["sh", "-c", "echo one; sleep 1; echo two >&2"])
    events = [(e.stream, e.data) for e in process]
    result = process.wait()
    assert result.status == 0
    assert b"".join(d for s, d in events if s == "stdout") == b"one\n"
    assert b"".join(d for s, d in events if s == "stderr") == b"two\n"


def test_console_log_has_the_agent_ready_line(vm: Vm) -> None:
    # The kernel boots with `quiet`; the agent announces itself on the console.
    assert "supermachine-agent" in vm.console_log and "ready on vsock port 1024" in vm.console_log


@pytest.mark.usefixtures("kvm")
def test_kernel_panic_is_reported_with_the_console(tmp_path: Path) -> None:
    """An initramfs whose /init exits makes the kernel panic ("Attempted to kill init")."""
    root = tmp_path / "initrd"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "busybox").write_bytes(Path("/bin/busybox").read_bytes())
    (root / "bin" / "busybox").chmod(0o755)
    (root / "init").write_text("#!/bin/busybox sh\nexit 7\n")
    (root / "init").chmod(0o755)
    initrd = tmp_path / "initrd.cpio"
    with initrd.open("wb") as out:
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, stdout=out, check=True)
    with pytest.raises(GuestPanickedError, match="Attempted to kill init"):
        Vm.start(VmConfig(initramfs=initrd, memory_mib=128, boot_timeout=240))


@pytest.mark.usefixtures("kvm")
def test_a_zstd_root_filesystem_boots_and_reads(
    tmp_path: Path, make_squashfs: Callable[[Path, Path, str | None], Path]
) -> None:
    """zstd's decoders must not pick BMI2 code on hosts that emulate guest kernel code: those
    report BMI2 in CPUID but cannot run it, and mounting the root stopped the guest with an
    emulation failure. The agent reads the file itself, so no program from the root runs."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    text = b"".join(b"line %d of a file that compresses\n" % i for i in range(20_000))
    (tree / "etc" / "motd").write_bytes(text)
    image = make_squashfs(tree, tmp_path / "zstd.squashfs", "zstd")
    with Vm.start(VmConfig(rootfs=image, memory_mib=128, network="none")) as machine:
        assert machine.read_file("/etc/motd") == text
