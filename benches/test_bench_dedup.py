"""Storing a 256 MiB snapshot RAM file that differs from its golden in 5% of its pages, on a
loop-mounted XFS with reflinks: supermachine's dedup (clone the golden, write the differing pages,
verify, rename) against a real dedupe tool and the obvious hand-written alternative, interleaved
round by round (see interleave.py) on the same data. Peers:

- ``supermachine-dedup``: :func:`supermachine.snapshots.dedup.dedup_file`.
- ``duperemove``: Debian's ``duperemove`` (installed by ``scripts/bench-tools.sh``) on the golden
  and the sibling, block-level: ``-d -b 4096 --dedupe-options=partial --lookup-extents=no`` with a
  fresh hash file on tmpfs each time. Without ``partial`` it only dedupes whole extents, and these
  two files have no identical extents; without ``--lookup-extents=no`` it skips hashing blocks by
  their extent state and, on a golden that is one unfragmented extent, found one run of 40 KiB to
  dedupe, not the 95% that match. It dedupes the sibling in place (``FIDEDUPERANGE``, which
  compares the bytes in the kernel); the span ends with an fsync of the sibling.
- ``cp-reflink+changed-pages``: ``cp --reflink=always`` of the golden to a temp file, the pages
  that differ from the sibling (compared with numpy) written over it with ``os.pwrite``, fsynced
  and renamed over the sibling: what a script would write by hand. It leaves XFS's default CoW
  extent size hint (32 blocks), which supermachine lowers to one page (see ``dedup.py``).
- ``cp-full-copy``: ``cp --reflink=never`` of the sibling, fsynced and renamed over it: what storing
  it costs without dedup (saves nothing; the reference for time, not for space). The former
  ``cp --reflink=always`` + whole-file rewrite peer is gone: it unshares every page it writes, so it
  saved nothing by construction, like this one, only slower.

Every peer starts from the same freshly written, unshared sibling (written and fsynced outside its
span); each span is the whole operation, fsync and rename included.

Bytes saved: the filesystem's free space (``statvfs``) after the peer minus before it, each read
after ``syncfs`` once it stops changing (``dedup.free_bytes``: XFS frees an unlinked file's extents
in the background), summed over all rounds. This counts what the filesystem really gives back at
the end of the operation, so blocks XFS holds as CoW reservations count as not saved. (FIEMAP's
shared flag would not see those: it shows the same extents shared with the golden for supermachine
and the hand-written peer, though the latter frees far less space until XFS reclaims its CoW
reservations in the background.) It is in ``extra_info`` as ``<peer>_bytes_saved``, with
``bytes_saved_method`` saying how it was measured."""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from interleave import Interleaved, report, rotation
from supermachine.snapshots import dedup

MiB = 1 << 20
SIZE = 256 * MiB  # duperemove alone takes ~70 s a round on it here (~25 s on 128 MiB, 150+ s on 512)
PAGE = 4096
CHANGED_SHARE = 0.05
ROUNDS = 4  # every one of the four peers once in every position
COMPARE_PAGES = 4096
"""Pages compared at a time by the hand-written peer (16 MiB of each file)."""
DUPEREMOVE_ARGS = ("-d", "-q", "-b", str(PAGE), "--dedupe-options=partial", "--lookup-extents=no")
SAVED_METHOD = "statvfs free bytes after minus before each peer's span (syncfs, settled), summed over rounds"


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


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory for duperemove's hash file: in tmpfs where there is one."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with tempfile.TemporaryDirectory(prefix="sm-bench-dedup-", dir=shm) as d:
            yield Path(d)
    else:
        yield tmp_path_factory.mktemp("dedup-scratch")


def supermachine_dedup(target: Path, golden: Path) -> None:
    result = dedup.dedup_file(target, golden)
    assert result.status == "deduped", result.message


def duperemove(target: Path, golden: Path, *, hashfile: Path) -> None:
    """``duperemove`` deduping the sibling against the golden, block by block, in place."""
    subprocess.run(
        ["duperemove", *DUPEREMOVE_ARGS, f"--hashfile={hashfile}", str(golden), str(target)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _differing_runs(a: mmap.mmap, b: mmap.mmap) -> list[tuple[int, int]]:
    """``(first page, count)`` of the runs of pages that differ between ``a`` and ``b``."""
    x = np.frombuffer(a, dtype=np.uint64).reshape(-1, PAGE // 8)
    y = np.frombuffer(b, dtype=np.uint64).reshape(-1, PAGE // 8)
    differ = [
        np.flatnonzero((x[i : i + COMPARE_PAGES] != y[i : i + COMPARE_PAGES]).any(axis=1)) + i
        for i in range(0, len(x), COMPARE_PAGES)
    ]
    del x, y  # no view may outlive the maps
    indexes = np.concatenate(differ)
    if not len(indexes):
        return []
    breaks = np.flatnonzero(np.diff(indexes) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(indexes)]))
    return [(int(indexes[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def reflink_and_changed_pages(target: Path, golden: Path) -> None:
    """``cp --reflink=always`` of the golden, then only the pages that differ from the sibling
    written over it, fsynced and renamed over the sibling."""
    tmp = target.with_name(".changed-pages.tmp")
    subprocess.run(["cp", "--reflink=always", str(golden), str(tmp)], check=True)
    with open(target, "rb") as t, open(golden, "rb") as g, open(tmp, "r+b") as dst:
        with (
            mmap.mmap(t.fileno(), 0, access=mmap.ACCESS_READ) as tm,
            mmap.mmap(g.fileno(), 0, access=mmap.ACCESS_READ) as gm,
        ):
            for first, count in _differing_runs(tm, gm):
                offset, size = first * PAGE, count * PAGE
                view = memoryview(tm)[offset : offset + size]
                try:
                    while view:
                        n = os.pwrite(dst.fileno(), view, offset)
                        view, offset = view[n:], offset + n
                finally:
                    view.release()
        os.fsync(dst.fileno())
    os.replace(tmp, target)


def full_copy(target: Path, golden: Path) -> None:
    """``cp`` (no reflink) of the sibling to a temp file, fsynced and renamed over it."""
    tmp = target.with_name(".copy.tmp")
    subprocess.run(["cp", "--reflink=never", str(target), str(tmp)], check=True)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


@pytest.mark.benchmark(group="dedup: 256 MiB RAM file against its golden on XFS, interleaved")
def test_store_ram_against_golden(benchmark: Any, ram: tuple[Path, bytes], scratch: Path) -> None:
    if shutil.which("duperemove") is None:
        pytest.skip("duperemove is needed for the dedupe-tool peer (scripts/bench-tools.sh installs it)")
    golden, sibling = ram
    target = golden.with_name("sibling.bin")
    hashfile = scratch / "duperemove.hash"
    peers: dict[str, Callable[[Path, Path], None]] = {
        "supermachine-dedup": supermachine_dedup,
        "duperemove": partial(duperemove, hashfile=hashfile),
        "cp-reflink+changed-pages": reflink_and_changed_pages,
        "cp-full-copy": full_copy,
    }
    names = list(peers)
    run = Interleaved[None](names[0], {name: [] for name in names})
    saved = dict.fromkeys(names, 0)
    rounds_done = 0

    def one_round() -> None:
        nonlocal rounds_done
        for name in rotation(names, rounds_done):
            target.unlink(missing_ok=True)
            hashfile.unlink(missing_ok=True)
            with open(target, "wb") as f:
                f.write(sibling)
                os.fsync(f.fileno())
            before = dedup.free_bytes(target.parent)
            started = time.perf_counter()
            peers[name](target, golden)
            run.times[name].append(time.perf_counter() - started)
            saved[name] += dedup.free_bytes(target.parent) - before
            assert target.read_bytes() == sibling, name
        rounds_done += 1

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    target.unlink()
    hashfile.unlink(missing_ok=True)
    report(benchmark, "storing a 256 MiB RAM file against its golden", run, nbytes=SIZE)
    info = benchmark.extra_info
    info["bytes_saved_method"] = SAVED_METHOD
    info["duperemove_args"] = " ".join(DUPEREMOVE_ARGS)
    for name, total in saved.items():
        info[f"{name}_bytes_saved"] = total
        info[f"{name}_saved_pct_of_ram"] = round(100 * total / (SIZE * ROUNDS), 1)
    print(f"  bytes saved over {ROUNDS} rounds ({SAVED_METHOD}):")
    for name, total in saved.items():
        print(f"  {name:<32}{total:>14}  ({100 * total / (SIZE * ROUNDS):.1f}% of the RAM written)")
    unchanged = SIZE * (1 - CHANGED_SHARE) * ROUNDS
    for name in ("supermachine-dedup", "duperemove"):
        assert saved[name] > 0.9 * unchanged, (name, saved)
