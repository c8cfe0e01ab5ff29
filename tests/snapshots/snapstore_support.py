"""Helpers for the snapshot-store tests: real snapshots of a tiny raw guest whose RAM the test sets."""

from __future__ import annotations

import atexit
import functools
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from supermachine import _core, pages
from supermachine.snapshots import metadata
from supermachine.snapshots.metadata import FileIdentity, ImageIdentity, SnapshotMetadata

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "snapshot"))
import snap_guests

MIB = 1 << 20
RAM_SIZE = 64 * MIB
PAGE = pages.PAGE_SIZE
IMAGE_DIGEST = "sha256:" + "ab" * 32


@dataclass(frozen=True)
class Ram:
    golden: bytes
    sibling: bytes
    changed: list[int]


def make_ram(size: int = RAM_SIZE, changed_share: float = 0.05, seed: int = 1) -> Ram:
    """Random golden RAM and a sibling with ``changed_share`` of its pages rewritten."""
    rng = random.Random(seed)
    golden = os.urandom(size)
    npages = size // PAGE
    changed = sorted(rng.sample(range(npages), int(npages * changed_share)))
    sibling = bytearray(golden)
    for i in changed:
        sibling[i * PAGE : (i + 1) * PAGE] = os.urandom(PAGE)
    return Ram(golden, bytes(sibling), changed)


def base_meta(**changes: object) -> SnapshotMetadata:
    meta = SnapshotMetadata(
        image=ImageIdentity("alpine:3.20", IMAGE_DIGEST),
        memory_mib=64,
        vcpus=1,
        kernel=FileIdentity("/k/vmlinux", "sha256:" + "11" * 32),
        agent=FileIdentity("/k/agent", "sha256:" + "22" * 32),
        created=1_700_000_000.0,
    )
    return replace(meta, **changes)  # type: ignore[arg-type]


@functools.cache
def _guest() -> Path:
    """The counting raw guest, built once per process (the test is skipped without KVM or
    binutils)."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        pytest.skip(f"/dev/kvm is not usable: {e.strerror}")
    for tool in ("as", "ld", "objcopy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (binutils) is needed to build the test guests")
    workdir = Path(tempfile.mkdtemp(prefix="snapstore-guest-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    return snap_guests.build(snap_guests.COUNTER, workdir)


def write_snapshot(store: Path, name: str, ram: bytes, *, base: str | None = None, **changes: object) -> Path:
    """A real snapshot in ``store/name`` whose RAM is ``ram`` (zeros after it): a raw guest of
    ``memory_mib`` MiB (from ``changes``, else the least that holds ``ram``, at least 2), paused,
    its whole RAM overwritten, snapshotted by the VMM (as a diff against the sibling ``base``
    when given), with metadata made of :func:`base_meta` and ``changes``. The VM is never run
    again, so it does not matter that its code was overwritten."""
    memory_mib = changes.pop("memory_mib", max(2, -(-len(ram) // MIB)))
    assert isinstance(memory_mib, int)
    d = store / name
    vm = _core.Vm.start({"raw": str(_guest()), "memory_mib": memory_mib})
    try:
        vm.pause()
        vm.write_memory(0, ram + bytes((memory_mib << 20) - len(ram)))
        vm.snapshot(str(d), None if base is None else str(store / base))
    finally:
        vm.stop()
    metadata.save(d, base_meta(memory_mib=memory_mib, **changes))
    return d


def file_blake3(path: Path) -> str:
    return metadata.blake3_file(path)


def run_dedup_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``supermachine dedup ARGS`` in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "supermachine.cli.snapshots", "dedup", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


DEEP_JSON = b"[" * 100_000
"""A ``metadata.json`` that sends a recursive JSON parser past Python's recursion limit."""


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``supermachine ARGS`` in a child process (the real entry point: one-line errors, exit codes)."""
    return subprocess.run(
        [sys.executable, "-m", "supermachine", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
