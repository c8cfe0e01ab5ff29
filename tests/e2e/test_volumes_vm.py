"""Named volumes in real guests: data one VM writes is there for the next; a second writer is
refused while the first runs; a snapshot unmounts the volume and a clone attaches the one its
restore names; a read-only attachment cannot be written; a volume whose VM crashed cannot be
attached read-only until a read-write attachment replays its journal (the CLI's -v); stopping a
VM is idempotent and final."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from supermachine import volumes
from supermachine.errors import SnapshotError, VmError, VolumeError, VolumeInUseError
from supermachine.vm import Vm, VmConfig, VolumeMount

pytestmark = pytest.mark.slow


def test_data_outlives_its_vm_with_one_writer_at_a_time(
    kvm: None, rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUPERMACHINE_DATA_DIR", str(tmp_path / "data"))
    volumes.create("data", "32M")
    writer = VmConfig(rootfs=rootfs, memory_mib=256, volumes=(VolumeMount("data", "/srv/data"),))
    with Vm.start(writer) as vm:
        vm.exec(["sh", "-c", "echo kept > /srv/data/f && sync"], check=True)
        mounts = vm.exec(["cat", "/proc/mounts"]).stdout.decode()
        line = next(m for m in mounts.splitlines() if " /srv/data " in m)
        assert line.startswith("/dev/vdb /srv/data ext4 rw,nosuid,nodev"), line
        # The volume is taken: a second writer is refused before anything boots.
        with pytest.raises(VolumeInUseError, match="volume data is attached to another VM"):
            Vm.start(writer)
        # A snapshot unmounts the volume (refused while the guest uses it) and mounts it again.
        user = vm.spawn(["sh", "-c", "cd /srv/data && exec sleep 600"])
        vm.exec(["sh", "-c", "while ! pidof sleep; do sleep 0.1; done"], check=True, timeout=120)
        with pytest.raises(SnapshotError, match="the guest is using volume data on /srv/data"):
            vm.snapshot(tmp_path / "snap", base=None)
        assert not (tmp_path / "snap").exists()
        vm.exec(["sh", "-c", "kill $(pidof sleep)"], check=True)
        user.wait()
        vm.snapshot(tmp_path / "snap", base=None)
        vm.exec(["sh", "-c", "echo after > /srv/data/after && sync"], check=True)
        assert vm.exec(["cat", "/srv/data/f"]).stdout == b"kept\n"
    # A clone attaches the volume its restore names and reads what the VM wrote after the snapshot.
    with Vm.restore(tmp_path / "snap", rootfs=rootfs, volumes=(VolumeMount("data", "/srv/data"),)) as clone:
        shown = clone.exec(["cat", "/srv/data/f", "/srv/data/after"], timeout=900)
        assert (shown.status, shown.stdout) == (0, b"kept\nafter\n"), shown.stderr
        clone.exec(["sh", "-c", "echo clone > /srv/data/clone && sync"], check=True)
    reader = VmConfig(rootfs=rootfs, memory_mib=256, volumes=(VolumeMount("data", "/data", read_only=True),))
    with Vm.start(reader) as vm:
        assert vm.exec(["cat", "/data/f", "/data/clone"]).stdout == b"kept\nclone\n"
        denied = vm.exec(["sh", "-c", "echo x > /data/g"])
        assert denied.status != 0 and b"Read-only file system" in denied.stderr
        # Stopping is idempotent and final. Checked on this VM of its own: the session's VM is
        # shared by every module a test worker runs, so no test may stop it.
        vm.stop()
        vm.stop()
        assert vm.outcome is not None and vm.outcome.kind == "stopped"
        with pytest.raises(VmError, match="stopped"):
            vm.exec(["true"])
    # A writer that crashes leaves the journal to replay: read-only cannot, read-write does.
    with Vm.start(writer) as vm:
        vm.exec(["sh", "-c", "echo more > /srv/data/more && sync"], check=True)
        assert vm.pid is not None
        os.kill(vm.pid, signal.SIGKILL)
    with pytest.raises(VolumeError, match="did not unmount it"):
        Vm.start(reader)
    cli = [sys.executable, "-m", "supermachine", "boot", "--rootfs", str(rootfs), "--memory", "256"]
    shown = subprocess.run(
        [*cli, "-v", "data:/v", "--", "cat", "/v/f", "/v/more"], capture_output=True, text=True, timeout=900
    )
    assert (shown.returncode, shown.stdout) == (0, "kept\nmore\n"), shown.stderr
    missing = subprocess.run(
        [*cli, "-v", "nope:/v", "--", "true"], capture_output=True, text=True, timeout=120
    )
    assert (
        missing.returncode == 1
        and missing.stderr.strip() == "error: no volume named nope (supermachine volume create nope)"
    )
