"""Helpers for the snapshot-store tests: fake snapshot directories with real RAM files."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from supermachine import pages
from supermachine.snapshots import metadata
from supermachine.snapshots.metadata import FileIdentity, ImageIdentity, SnapshotMetadata

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
        ram_size=0,
        ram_blake3="blake3:" + "00" * 32,
        created=1_700_000_000.0,
    )
    return replace(meta, **changes)  # type: ignore[arg-type]


def write_snapshot(store: Path, name: str, ram: bytes, **changes: object) -> Path:
    """A snapshot directory with ``memory.bin`` = ``ram``, a ``vmstate.bin`` and true metadata."""
    d = store / name
    d.mkdir()
    (d / metadata.MEMORY_FILE).write_bytes(ram)
    (d / metadata.VMSTATE_FILE).write_bytes(b"vmstate")
    size, digest = metadata.ram_identity(d)
    metadata.save(d, base_meta(ram_size=size, ram_blake3=digest, **changes))
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
