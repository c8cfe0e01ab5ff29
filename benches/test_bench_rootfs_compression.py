"""A booted VM's first command on a gzip root filesystem against the same on an uncompressed one.

Both squashfs images hold the same busybox tree, made with the arguments the product uses for each
compression (``supermachine.oci.rootfs.compression_args``). Every round boots a VM on each, in
rotating order, and times the command's first run after the boot (the guest reads, and for gzip
decompresses, every block it touches) and its second run, each the whole ``vm.exec`` call.
Reported: both runs with their per-round ratio gzip / uncompressed, and each image's size.

This is the measurement behind :func:`supermachine.oci.rootfs.default_compression`: on hosts that
emulate guest kernel code (kvm_pvm) decompressing dominates; on hardware KVM it costs milliseconds
and the gzip image is half the size.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import busybox_squashfs, skip_unless_kvm, squash, timed_exec
from interleave import Interleaved, report, rotation
from supermachine.vm import Vm, VmConfig

ROUNDS = 2
COMMAND = ["sh", "-c", "ls -l /bin > /dev/null && cat /etc/motd"]
EXPECTED = b"hello from the rootfs\n"
COMPRESSIONS = ("gzip", "none")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    skip_unless_kvm()
    if shutil.which("unsquashfs") is None:
        pytest.skip("unsquashfs (squashfs-tools) is needed to unpack the benchmark's tree")
    work = tmp_path_factory.mktemp("rootfs-compression")
    tree = work / "tree"
    subprocess.run(["unsquashfs", "-q", "-d", str(tree), str(busybox_squashfs(work))], check=True)
    return {c: squash(tree, work / f"{c}.squashfs", c) for c in COMPRESSIONS}


@pytest.mark.timeout(3600)  # every block a guest reads is decompressed by emulated code on some hosts
def test_first_command_after_a_boot_on_gzip_against_uncompressed(
    benchmark: Any, images: dict[str, Path]
) -> None:
    first: dict[str, list[float]] = {c: [] for c in COMPRESSIONS}
    again: dict[str, list[float]] = {c: [] for c in COMPRESSIONS}
    rounds = 0

    def one_round() -> None:
        nonlocal rounds
        for compression in rotation(COMPRESSIONS, rounds):
            with Vm.start(VmConfig(rootfs=images[compression], memory_mib=256, network="none")) as vm:
                first[compression].append(timed_exec(vm, COMMAND, EXPECTED))
                again[compression].append(timed_exec(vm, COMMAND, EXPECTED))
        rounds += 1

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    title = f"first run after a boot: {' '.join(COMMAND)}"
    report(benchmark, title, Interleaved[Any]("none", first), key="first")
    report(benchmark, "the second run", Interleaved[Any]("none", again), key="again")
    sizes = {c: images[c].stat().st_size for c in COMPRESSIONS}
    print(f"image bytes {sizes}")
    benchmark.extra_info["image_bytes"] = sizes
