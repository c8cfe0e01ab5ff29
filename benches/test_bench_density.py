"""Host memory per VM, side by side in one run: (A) clones restored from one snapshot vs (B) cold
boots of the same read-only root filesystem, N = 2 VMs each (``supermachine probe density``).

Every VM has the same 16 MiB file of random bytes as a read-only disk and reads it whole. A's
snapshot was taken after its VM had read it, so every clone finds it in the snapshot's guest page
cache and shares those pages (host page cache, mapped copy-on-write); each cold boot reads it into
RAM of its own. The timed function is one VM's start (restore or boot until the guest agent
answers), one round per VM; ``extra_info`` holds the host RSS and PSS each VM added to this process
(the VMM runs in it) once it had read the blob.

The memory figures are meaningful on any host; on hosts whose KVM emulates guest kernel code
(kvm_pvm) the cold-boot times are not representative of hardware KVM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import busybox_squashfs, skip_unless_kvm
from supermachine.probes import density
from supermachine.vm import Vm, VmConfig

MiB = 1 << 20
VMS = 2
BLOB_MIB = 16
MEMORY_MIB = 256
EMULATING = os.path.exists("/sys/module/kvm_pvm")
_results: dict[str, density.ModeResult] = {}


@dataclass(frozen=True)
class Guest:
    config: VmConfig
    blob_device: str
    snapshot: Path


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    """The root filesystem, the blob, and A's snapshot (one cold boot, untimed)."""
    skip_unless_kvm()
    workdir = tmp_path_factory.mktemp("density-bench")
    blob = workdir / "blob.bin"
    density.write_blob(blob, BLOB_MIB * MiB)
    config, device = density.with_blob(
        VmConfig(rootfs=busybox_squashfs(workdir), memory_mib=MEMORY_MIB), blob
    )
    density.bake_golden(config, device, workdir / "golden")
    return Guest(config, device, workdir / "golden")


@pytest.mark.benchmark(group=f"density: start one VM, host memory per VM ({VMS} VMs, {BLOB_MIB} MiB blob)")
@pytest.mark.parametrize("mode", ["restore", "boot"])
def test_density(benchmark: Any, guest: Guest, mode: density.Mode) -> None:
    def start() -> Vm:
        return Vm.restore(guest.snapshot) if mode == "restore" else Vm.start(guest.config)

    with density.Fleet(mode, density.blob_reader(guest.blob_device, mode)) as fleet:

        def settle_previous() -> None:  # untimed: the previous VM reads the blob and is measured
            if fleet.pending:
                fleet.settle()

        benchmark.pedantic(fleet.start, args=(start,), setup=settle_previous, rounds=VMS, iterations=1)
        settle_previous()
        result = fleet.result()
    _results[mode] = result
    info = benchmark.extra_info
    info["vms"] = VMS
    info["blob_mib"] = BLOB_MIB
    info["pss_added_mib"] = [round(s.pss_added / MiB, 1) for s in result.samples]
    info["rss_added_mib"] = [round(s.rss_added / MiB, 1) for s in result.samples]
    info["mean_pss_added_mib"] = round(result.mean_pss_added / MiB, 1)
    info["mean_rss_added_mib"] = round(result.mean_rss_added / MiB, 1)
    info["read_seconds"] = [round(s.read_seconds, 2) for s in result.samples]
    if mode == "boot" and "restore" in _results:
        restored = _results["restore"].mean_pss_added
        info["pss_per_vm_boot_over_restore"] = round(result.mean_pss_added / restored, 2)
    info["note"] = (
        "guest-side boot is emulated on this host: boot times are not representative of hardware KVM"
        if EMULATING
        else "hardware KVM"
    )
