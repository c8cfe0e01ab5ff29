"""The same parallel guest job on a 1-vCPU VM and on a 2-vCPU VM.

Both VMs boot the same guest kernel (the SMP one chosen for the 2-vCPU VM: ``compat-smp`` on
hosts that emulate guest kernel code, ``normal`` elsewhere), the same root filesystem and the
same memory. The job is two shell loops of pure user-space work started together, unpinned; the
guest's scheduler places them. Every round runs it once on each VM in rotating order; the timed
span is the whole ``vm.exec`` (agent round trip included on both sides). Reported: each VM's
time and the per-round ratio 2 vCPUs / 1 vCPU (0.5 would be perfect scaling).

On hosts that emulate guest kernel code the loops themselves run natively (they make no system
calls), so the ratio is meaningful there; the fork, exec and wait around them are emulated and
cost the same on both sides.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import busybox_squashfs, skip_unless_kvm
from interleave import interleave
from supermachine import kernel
from supermachine.vm import Vm, VmConfig

ROUNDS = 4
LOOPS = 2
ITERATIONS = 1_000_000
JOB = f"for n in $(seq {LOOPS}); do (i=0; while [ $i -lt {ITERATIONS} ]; do i=$((i+1)); done) & done; wait"


@pytest.fixture(scope="module")
def vms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Vm]]:
    skip_unless_kvm()
    work = tmp_path_factory.mktemp("vcpus")
    rootfs = busybox_squashfs(work)
    # One kernel for both: the one a 2-vCPU VM gets by default.
    vmlinux = kernel.kernel_path(kernel.default_profile(vcpus=2))
    machines: dict[int, Vm] = {}
    try:
        for vcpus in (1, 2):
            config = VmConfig(rootfs=rootfs, memory_mib=256, vcpus=vcpus, kernel=vmlinux, network="none")
            machines[vcpus] = Vm.start(config)
        for vcpus, machine in machines.items():
            assert machine.exec(["nproc"], check=True).stdout == f"{vcpus}\n".encode()
        yield machines
    finally:
        for machine in machines.values():
            machine.stop()


@pytest.mark.timeout(3600)  # every guest fork and system call is emulated on some hosts
def test_parallel_user_space_job_on_1_vs_2_vcpus(benchmark: Any, vms: dict[int, Vm]) -> None:
    def job(vm: Vm) -> Any:
        def run() -> int:
            result = vm.exec(["sh", "-c", JOB], timeout=900)
            assert result.status == 0, result.stderr
            return result.status

        return run

    interleave(
        benchmark,
        f"{LOOPS} parallel shell loops of {ITERATIONS:,} iterations in the guest",
        {"1 vCPU": job(vms[1]), "2 vCPUs": job(vms[2])},
        rounds=ROUNDS,
    )
