"""Shared inputs for the benchmarks. Every benchmark runs its peers on the very same bytes."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

MiB = 1 << 20


def pytest_report_header() -> list[str]:
    return [
        "supermachine benchmarks: host-side throughput (chunking, page hashing, pulling) is meaningful on",
        "any host; guest-side latencies are only meaningful on hardware KVM, not on emulating hosts.",
    ]


def skip_unless_kvm() -> None:
    """Skips the calling benchmark, with the reason printed, where /dev/kvm cannot be opened."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as e:
        pytest.skip(f"/dev/kvm is not usable: {e.strerror}")


@pytest.fixture(scope="session")
def random_256m() -> bytes:
    """256 MiB of incompressible bytes (random data defeats no chunker and favours none)."""
    return np.random.default_rng(20261122).bytes(256 * MiB)


def _ram_like(rng: np.random.Generator, pages: int, zero_share: float) -> np.ndarray:
    data = rng.integers(0, 2**64, size=(pages, 512), dtype=np.uint64)
    data[rng.random(pages) < zero_share] = 0
    return data


@pytest.fixture(scope="session")
def ram_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, mmap.mmap, mmap.mmap]]:
    """Two 256 MiB guest-RAM-like files in tmpfs (page cache, so disk speed is not measured):
    a golden with 30% zero pages, and a child that differs in 10% of its pages. Yields the paths
    and read-only maps of both, which every peer reads."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
    directory = (
        Path(tmp_path_factory.mktemp("ram", numbered=True))
        if base is None
        else base / f"sm-bench-{os.getpid()}"
    )
    directory.mkdir(exist_ok=True)
    rng = np.random.default_rng(7)
    pages = 256 * MiB // 4096
    golden = _ram_like(rng, pages, 0.3)
    child = golden.copy()
    changed = rng.random(pages) < 0.1
    child[changed] = rng.integers(0, 2**64, size=(int(changed.sum()), 512), dtype=np.uint64)
    paths = (directory / "golden.ram", directory / "child.ram")
    for path, arr in zip(paths, (golden, child), strict=True):
        path.write_bytes(arr.tobytes())
    files = [p.open("rb") for p in paths]
    maps = [mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) for f in files]
    for m in maps:  # fault the pages in once, outside the timed rounds
        np.frombuffer(m, dtype=np.uint64).sum()
    yield paths[0], paths[1], maps[0], maps[1]
    for m in maps:
        m.close()
    for f in files:
        f.close()
    for p in paths:
        p.unlink()
    if base is not None:
        directory.rmdir()


def throughput(benchmark: object, nbytes: int) -> None:
    """Adds the median throughput to the benchmark's extra_info, in MB/s."""
    stats = benchmark.stats.stats  # type: ignore[attr-defined]
    benchmark.extra_info["MB/s"] = round(nbytes / stats.median / 1e6)  # type: ignore[attr-defined]
