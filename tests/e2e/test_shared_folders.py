"""Host folders shared with a real guest (virtio-fs): the guest reads and changes a read-write
folder, and the host sees each change at once, made as the folder's owner; a read-only folder
refuses writes; links that point out of a folder are not followed, device nodes are not made and
set-id bits are dropped. A snapshot unmounts the folders (refused while the guest uses one) and
mounts them again; a clone shares the folders its restore names."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from supermachine.errors import SnapshotError, VmConfigError
from supermachine.vm import SharedFolder, Vm, VmConfig

pytestmark = pytest.mark.slow

OWNER = (1234, 2345)
"""Who owns the read-write folder (when the test runs as root, its worker serves it as them)."""

GUEST_SCRIPT = r"""
cat /mnt/rw/hello.txt /mnt/rw/sub/deep.txt
echo guest-wrote > /mnt/rw/new.txt && echo wrote
mkdir /mnt/rw/gdir && mv /mnt/rw/new.txt /mnt/rw/gdir/moved.txt && echo moved
rm /mnt/rw/sub/deep.txt && echo removed
readlink /mnt/rw/out-abs; readlink /mnt/rw/out-rel
cat /mnt/rw/out-abs 2>/dev/null || echo abs-link-stays-in-the-guest
cat /mnt/rw/out-rel 2>/dev/null || echo rel-link-stays-in-the-share
ln -s /etc/passwd /mnt/rw/glink && echo linked
mknod /mnt/rw/node c 1 3 2>/dev/null && echo mknod-made || echo mknod-refused
touch /mnt/rw/s && chmod 4755 /mnt/rw/s
dd if=/dev/zero of=/mnt/rw/big bs=1M count=3 2>/dev/null && echo dd
cat /mnt/ro/data.txt
echo x 2>/dev/null > /mnt/ro/new || echo ro-refused
sed -n 's#^[^ ]* \(/mnt/r[ow]\) \([^ ]*\) \([^,]*,[^,]*,[^,]*\).*#\1 \2 \3#p' /proc/mounts
"""

GUEST_OUTPUT = """from host
deep
wrote
moved
removed
/etc/hostsecret
../secret.txt
abs-link-stays-in-the-guest
rel-link-stays-in-the-share
linked
mknod-refused
dd
read only
ro-refused
/mnt/rw virtiofs rw,nosuid,nodev
/mnt/ro virtiofs ro,nosuid,nodev
"""


def test_a_guest_works_in_shared_folders_and_cannot_leave_them(
    kvm: None, rootfs: Path, tmp_path: Path
) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    (rw / "sub").mkdir(parents=True)
    ro.mkdir()
    (rw / "hello.txt").write_text("from host\n")
    (rw / "sub" / "deep.txt").write_text("deep\n")
    (tmp_path / "secret.txt").write_text("outside the share\n")
    os.symlink("/etc/hostsecret", rw / "out-abs")
    os.symlink("../secret.txt", rw / "out-rel")
    (ro / "data.txt").write_text("read only\n")
    root = os.geteuid() == 0
    if root:
        for path in [rw, *rw.rglob("*")]:
            os.chown(path, *OWNER, follow_symlinks=False)
    config = VmConfig(
        rootfs=rootfs,
        memory_mib=256,
        mounts=(SharedFolder(rw, "/mnt/rw"), SharedFolder(ro, "/mnt/ro", read_only=True)),
    )
    snap = tmp_path / "snap"
    with Vm.start(config) as vm:
        result = vm.exec(["sh", "-c", GUEST_SCRIPT], timeout=600)
        assert result.stdout.decode() == GUEST_OUTPUT, result.stderr
        # The host sees the guest's changes while the VM runs.
        moved = rw / "gdir" / "moved.txt"
        assert moved.read_text() == "guest-wrote\n"
        if root:
            assert (moved.stat().st_uid, moved.stat().st_gid) == OWNER
        # A folder in use (a working directory there) refuses the snapshot, and stays mounted.
        user = vm.spawn(["sh", "-c", "cd /mnt/rw && exec sleep 600"])
        vm.exec(["sh", "-c", "while ! pidof sleep; do sleep 0.1; done"], check=True, timeout=120)
        with pytest.raises(SnapshotError, match="the guest is using the shared folder on /mnt/rw"):
            vm.snapshot(snap, base=None)
        assert not snap.exists()
        vm.exec(["sh", "-c", "kill $(pidof sleep)"], check=True)
        user.wait()
        vm.snapshot(snap, base=None)
        # Mounted again after the snapshot.
        vm.exec(["sh", "-c", "echo after > /mnt/rw/after.txt"], check=True)
        assert (rw / "after.txt").read_text() == "after\n"
    assert not (rw / "sub" / "deep.txt").exists() and not (rw / "new.txt").exists()
    assert os.readlink(rw / "glink") == "/etc/passwd"
    assert not os.path.lexists(rw / "node")
    assert stat.S_IMODE((rw / "s").stat().st_mode) & (stat.S_ISUID | stat.S_ISGID) == 0
    assert (rw / "big").stat().st_size == 3 << 20
    assert (tmp_path / "secret.txt").read_text() == "outside the share\n"
    assert sorted(p.name for p in ro.iterdir()) == ["data.txt"]

    # A clone shares the folders its restore names, where they say.
    other = tmp_path / "other"
    other.mkdir()
    (other / "hello.txt").write_text("another folder\n")
    if root:
        os.chown(other, *OWNER)
    with pytest.raises(VmConfigError, match=r"with 2 shared folder\(s\), and 0 were given"):
        Vm.restore(snap, rootfs=rootfs)
    shared = (SharedFolder(other, "/srv/other"), SharedFolder(ro, "/mnt/ro", read_only=True))
    with Vm.restore(snap, rootfs=rootfs, mounts=shared) as clone:
        script = "cat /srv/other/hello.txt /mnt/ro/data.txt && echo from-clone > /srv/other/new.txt"
        result = clone.exec(["sh", "-c", script], timeout=900)
        assert (result.status, result.stdout) == (0, b"another folder\nread only\n"), result.stderr
    assert (other / "new.txt").read_text() == "from-clone\n"
    assert not (rw / "new.txt").exists()
