"""Tiny freestanding guests (no Linux kernel, no agent) for the snapshot-store tests that need a real
VM to snapshot: they start in milliseconds even where guest kernel code is emulated."""

from __future__ import annotations

import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

from supermachine import _core
from supermachine.snapshots import bake
from supermachine.snapshots.bake import BakeResult, BaseChoice
from supermachine.snapshots.metadata import ImageIdentity, RunDefaults

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "snapshot"))
import snap_guests

MIB = 1 << 20
# The counter guest boots without a root filesystem, which is what this identity says (a restore
# then attaches no disk).
IMAGE = ImageIdentity("rootfs:none", "none")


def counter(vm: Any) -> int:
    return int(struct.unpack("<Q", vm.read_memory(snap_guests.RESULTS, 8))[0])


def start_counter(guest_dir: Path, memory_mib: int, **config: Any) -> Any:
    """A VM counting in RAM, started and seen counting."""
    vm = _core.Vm.start(
        {"raw": str(snap_guests.build(snap_guests.COUNTER, guest_dir)), "memory_mib": memory_mib, **config}
    )
    deadline = time.monotonic() + 60
    while counter(vm) < 100:
        assert time.monotonic() < deadline, "the test guest never started counting"
        time.sleep(0.005)
    return vm


def fill_random(memory_bin: Path, start: int, end: int) -> None:
    """Random bytes over ``[start, end)`` of a RAM file: RAM the guest does not use, so a VM restored
    from it runs as before but has that much RAM to write when it is snapshotted."""
    block = os.urandom(MIB)
    with open(memory_bin, "r+b") as f:
        for offset in range(start, end, MIB):
            f.seek(offset)
            f.write(block[offset // MIB % 7 :] + block[: offset // MIB % 7])


def bake_raw(
    handle: Any, target: Path, identity_file: Path, memory_mib: int, base: BaseChoice = None
) -> BakeResult:
    """Snapshot a raw guest into ``target`` the way ``Vm.snapshot`` does (pause, write, describe,
    publish); ``identity_file`` stands in for the kernel and the agent."""
    return bake.bake(
        handle,
        target,
        image=IMAGE,
        memory_mib=memory_mib,
        vcpus=1,
        kernel=identity_file,
        initramfs=identity_file,
        run=RunDefaults(),
        base=base,
    )


CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
import rawvm_support
from supermachine import _core
seed, target, identity = sys.argv[1:4]
vm = _core.Vm.restore(seed)
print("ready", flush=True)
rawvm_support.bake_raw(vm, Path(target), Path(identity), int(sys.argv[5]))
print("done", flush=True)
vm.stop()
"""
"""A child that restores ``seed`` and bakes it into ``target`` (argv: seed, target, identity file,
this directory, RAM MiB), saying ``ready`` before it starts writing and ``done`` after."""
