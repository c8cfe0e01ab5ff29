"""Sequential reads of the same data in one guest: from a host folder shared over virtio-fs, and
from the root filesystem (squashfs on virtio-blk).

One VM boots with both: the root filesystem holds ``/data/blob`` and the shared folder holds
the same bytes. Every round reads each copy once with ``cat FILE > /dev/null``, the guest's page
cache dropped just before (untimed), the peers in rotating order; the timed span is the whole
``vm.exec`` of that command for both (the agent round trip included on both sides). Reported:
each peer's time and throughput, and the per-round ratio virtio-fs / virtio-blk.

On hosts that emulate guest kernel code (kvm_pvm) both reads are dominated by that emulation
(every guest page fault and system call costs hundreds of microseconds), so the ratio there
says more about how many guest kernel operations each path needs than about hardware KVM.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import busybox_squashfs, skip_unless_kvm, squash
from interleave import interleave
from supermachine.vm import SharedFolder, Vm, VmConfig

BLOB_MIB = 8
ROUNDS = 4


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory, random_256m: bytes) -> Iterator[Vm]:
    skip_unless_kvm()
    work = tmp_path_factory.mktemp("shared-folders")
    blob = random_256m[: BLOB_MIB << 20]
    busybox_squashfs(work)  # leaves its tree in work/root
    (work / "root" / "data").mkdir()
    (work / "root" / "data" / "blob").write_bytes(blob)
    # The product's compression for this host; the random blob is stored as it is either way.
    rootfs = squash(work / "root", work / "with-blob.squashfs")
    share = work / "share"
    share.mkdir()
    (share / "blob").write_bytes(blob)
    shared = SharedFolder(share, "/mnt/share", read_only=True)
    config = VmConfig(rootfs=rootfs, memory_mib=512, mounts=(shared,))
    with Vm.start(config) as machine:
        yield machine


@pytest.mark.timeout(3600)  # every guest page fault and system call is emulated on some hosts
def test_sequential_read_virtio_fs_vs_virtio_blk(benchmark: Any, vm: Vm) -> None:
    def read(path: str) -> Any:
        def run() -> int:
            result = vm.exec(["sh", "-c", f"cat {path} > /dev/null"], timeout=900)
            assert result.status == 0, result.stderr
            return result.status

        return run

    def drop_caches() -> None:
        vm.exec(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True, timeout=300)

    sums = vm.exec(["sh", "-c", "md5sum /data/blob /mnt/share/blob | cut -d' ' -f1"], check=True, timeout=900)
    first, second = sums.stdout.split()
    assert first == second, "the two copies differ"
    interleave(
        benchmark,
        f"sequential read of {BLOB_MIB} MiB in the guest",
        {
            "virtio-blk (squashfs root)": read("/data/blob"),
            "virtio-fs (shared folder)": read("/mnt/share/blob"),
        },
        rounds=ROUNDS,
        nbytes=BLOB_MIB << 20,
        before=drop_caches,
    )
