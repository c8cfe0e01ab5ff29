"""Storing a 512 MiB snapshot RAM file that differs from its golden in 5% of its pages, on a
loop-mounted XFS with reflinks: supermachine's dedup (clone the golden, write the differing pages,
verify, rename) against the obvious alternatives a script would use, a reflink copy of the golden
with the whole file rewritten over it, and a plain full copy. Every peer starts from the same
unshared file; the bytes each one gives back are measured with statvfs and reported in extra_info."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from supermachine.snapshots import dedup

MiB = 1 << 20
SIZE = 512 * MiB
PAGE = 4096
CHANGED_SHARE = 0.05


@pytest.fixture(scope="module")
def xfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None:
        pytest.skip("needs root and mkfs.xfs (xfsprogs) to loop-mount an XFS image")
    base = tmp_path_factory.mktemp("xfs-bench")
    image, mnt = base / "xfs.img", base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(3 * 1024 * MiB)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
    if subprocess.run(["mount", "-o", "loop", str(image), str(mnt)]).returncode != 0:
        pytest.skip("cannot loop-mount an XFS image here")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])
        image.unlink()


@pytest.fixture(scope="module")
def ram(xfs: Path) -> tuple[Path, bytes]:
    """The golden on disk, and the sibling's bytes (5% of pages rewritten)."""
    rng = np.random.default_rng(20261122)
    golden = rng.integers(0, 2**64, size=(SIZE // PAGE, PAGE // 8), dtype=np.uint64)
    sibling = golden.copy()
    changed = rng.random(len(golden)) < CHANGED_SHARE
    sibling[changed] = rng.integers(0, 2**64, size=(int(changed.sum()), PAGE // 8), dtype=np.uint64)
    path = xfs / "golden.bin"
    path.write_bytes(golden.tobytes())
    return path, sibling.tobytes()


def supermachine_dedup(target: Path, golden: Path) -> None:
    result = dedup.dedup_file(target, golden)
    assert result.status == "deduped", result.message


def reflink_and_rewrite(target: Path, golden: Path) -> None:
    """``cp --reflink=always`` of the golden, then the whole sibling written over it, renamed."""
    tmp = target.with_name(".rewrite.tmp")
    subprocess.run(["cp", "--reflink=always", str(golden), str(tmp)], check=True)
    with open(target, "rb") as src, open(tmp, "r+b") as dst:
        shutil.copyfileobj(src, dst, 8 * MiB)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, target)


def full_copy(target: Path, golden: Path) -> None:
    """``cp`` (no reflink) of the sibling to a temp file, fsynced and renamed over it."""
    tmp = target.with_name(".copy.tmp")
    subprocess.run(["cp", "--reflink=never", str(target), str(tmp)], check=True)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


PEERS: dict[str, Callable[[Path, Path], None]] = {
    "supermachine-dedup": supermachine_dedup,
    "cp-reflink+rewrite": reflink_and_rewrite,
    "cp-full-copy": full_copy,
}


@pytest.mark.parametrize("peer", list(PEERS))
def test_store_ram_against_golden(benchmark, ram: tuple[Path, bytes], peer: str) -> None:  # type: ignore[no-untyped-def]
    golden, sibling = ram
    target = golden.with_name("sibling.bin")
    saved: list[int] = []
    free_before: list[int] = []

    def setup() -> tuple[tuple[Path, Path], dict[str, object]]:
        target.unlink(missing_ok=True)
        with open(target, "wb") as f:
            f.write(sibling)
            os.fsync(f.fileno())
        free_before.append(dedup.free_bytes(target.parent))
        return (target, golden), {}

    def run(t: Path, g: Path) -> None:
        PEERS[peer](t, g)

    benchmark.pedantic(run, setup=setup, rounds=3, warmup_rounds=0)
    saved.append(dedup.free_bytes(target.parent) - free_before[-1])
    assert target.read_bytes() == sibling
    benchmark.extra_info["bytes_saved"] = saved[-1]
    benchmark.extra_info["saved_pct_of_ram"] = round(100 * saved[-1] / SIZE, 1)
    benchmark.extra_info["MB/s"] = round(SIZE / benchmark.stats.stats.median / 1e6)
    target.unlink()
