"""Page hashing + overlap of two 256 MiB RAM images (zero pages, same-offset diff against the
golden, global unique pages), against a plain NumPy read scan of the same bytes (the memory
bandwidth ceiling) and the approaches a Python user would write: NumPy array comparison, and
per-page xxhash / hashlib loops. All read the same page-cache-resident maps."""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path

import numpy as np
import pytest
import xxhash
from conftest import throughput
from supermachine import pages

PAGE = 4096
Pair = tuple[Path, Path, mmap.mmap, mmap.mmap]


def supermachine_overlap(a: mmap.mmap, b: mmap.mmap, algo: pages.HashAlgo = "xxh3") -> tuple[int, int, int]:
    golden, child = pages.digest_pages(a, algo), pages.digest_pages(b, algo)
    cmp = pages.compare(child, golden)
    _, unique = pages.unique_pages([golden, child])
    return child.zero_pages, cmp.differ, unique


def numpy_read_scan(a: mmap.mmap, b: mmap.mmap) -> int:
    """Reads every byte once and does nothing else: the ceiling for any page scan."""
    return int(np.frombuffer(a, dtype=np.uint64).sum() + np.frombuffer(b, dtype=np.uint64).sum())


def numpy_compare(a: mmap.mmap, b: mmap.mmap) -> tuple[int, int, int]:
    """Zero pages and same-offset differences with array operations (no unique count possible
    without hashing, so it answers less than the others)."""
    ga = np.frombuffer(a, dtype=np.uint64).reshape(-1, PAGE // 8)
    gb = np.frombuffer(b, dtype=np.uint64).reshape(-1, PAGE // 8)
    zero = int((~gb.any(axis=1)).sum())
    differ = int((ga != gb).any(axis=1).sum())
    return zero, differ, -1


def _loop(a: mmap.mmap, b: mmap.mmap, digest: object) -> tuple[int, int, int]:
    zero_digest = digest(bytes(PAGE))  # type: ignore[operator]
    va, vb = memoryview(a), memoryview(b)
    da = [digest(va[i : i + PAGE]) for i in range(0, len(va), PAGE)]  # type: ignore[operator]
    db = [digest(vb[i : i + PAGE]) for i in range(0, len(vb), PAGE)]  # type: ignore[operator]
    zero = sum(1 for d in db if d == zero_digest)
    differ = sum(1 for x, y in zip(da, db, strict=True) if x != y)
    return zero, differ, len(set(da) | set(db))


def xxhash_loop(a: mmap.mmap, b: mmap.mmap) -> tuple[int, int, int]:
    return _loop(a, b, xxhash.xxh3_64_intdigest)


def hashlib_sha256_loop(a: mmap.mmap, b: mmap.mmap) -> tuple[int, int, int]:
    return _loop(a, b, lambda page: hashlib.sha256(page).digest())


IMPLS = {
    "supermachine-xxh3": supermachine_overlap,
    "supermachine-blake3": lambda a, b: supermachine_overlap(a, b, "blake3"),
    "numpy-read-scan": numpy_read_scan,
    "numpy-compare": numpy_compare,
    "python-xxhash-loop": xxhash_loop,
    "python-hashlib-sha256-loop": hashlib_sha256_loop,
}


@pytest.mark.benchmark(group="page hashing + overlap: 2 x 256 MiB")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_page_overlap(benchmark: object, ram_pair: Pair, impl: str) -> None:
    _, _, a, b = ram_pair
    result = benchmark.pedantic(IMPLS[impl], args=(a, b), rounds=5, warmup_rounds=1)  # type: ignore[attr-defined]
    if impl != "numpy-read-scan":
        zero, differ, _ = result
        pages_total = len(b) // PAGE
        assert 0.25 < zero / pages_total < 0.35  # the fixture zeroes 30% of the pages
        assert 0.05 < differ / pages_total < 0.15  # and changes 10% in the child
    throughput(benchmark, len(a) + len(b))
