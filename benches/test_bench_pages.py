"""Page hashing + overlap of two 256 MiB RAM images (zero pages, same-offset diff against the
golden, global unique pages), against a plain NumPy read scan of the same bytes (the memory
bandwidth ceiling) and the approaches a Python user would write: NumPy array comparison, and
per-page xxhash / hashlib loops. All read the same page-cache-resident maps.

Thread for thread: every peer on one thread, then every peer that can use them on all cores
(supermachine's rayon pool of that size; the NumPy scans split into contiguous parts over a thread
pool, NumPy releasing the GIL), each group interleaved round by round (see interleave.py). Both
report supermachine's throughput per core as a percentage of the one-thread NumPy read ceiling.
Of supermachine's three calls only ``digest_pages`` (the hashing, nearly all of the work) takes a
thread count: ``compare`` runs on rayon's global pool and ``unique_pages`` on the calling thread."""

from __future__ import annotations

import gc
import hashlib
import mmap
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import pytest
import xxhash
from interleave import Interleaved, Spread, interleave
from supermachine import pages

PAGE = 4096
CORES = len(os.sched_getaffinity(0))
ONE_THREAD_ROUNDS = 6  # every order of the six peers once
ALL_CORES_ROUNDS = 10  # every order of the five peers twice
CEILING = "numpy-read-scan"
REFERENCE = "numpy-read-scan-1-thread"
"""The one-thread ceiling, run among the all-core peers as the reference for per-core figures."""
OURS = ("supermachine-xxh3", "supermachine-blake3")
Pair = tuple[Path, Path, mmap.mmap, mmap.mmap]
T = TypeVar("T")
R = TypeVar("R")


class Overlap(NamedTuple):
    zero: int
    """Zero pages in the child."""
    differ: int
    """Child pages that differ from the golden's at the same offset."""
    unique: int | None
    """Distinct pages over both images; None where a peer cannot tell without hashing."""


def _parts(n: int, count: int) -> list[slice]:
    """``range(n)`` cut into ``count`` contiguous slices, as equal as can be."""
    return [slice(n * i // count, n * (i + 1) // count) for i in range(count)]


def _map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> list[R]:
    """``fn`` over ``items``, on a pool of ``threads`` threads started for this call (as
    supermachine starts its rayon pool for a call with a thread count), or inline for one."""
    if threads == 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def supermachine_overlap(a: mmap.mmap, b: mmap.mmap, algo: pages.HashAlgo, threads: int) -> Overlap:
    golden = pages.digest_pages(a, algo, threads=threads)
    child = pages.digest_pages(b, algo, threads=threads)
    cmp = pages.compare(child, golden)
    _, unique = pages.unique_pages([golden, child])
    return Overlap(child.zero_pages, cmp.differ, unique)


def numpy_read_scan(a: mmap.mmap, b: mmap.mmap, threads: int) -> int:
    """Reads every byte once and does nothing else: the ceiling for any page scan. Each thread sums
    a contiguous part of each image."""
    words = [np.frombuffer(m, dtype=np.uint64) for m in (a, b)]
    parts = [w[s] for w in words for s in _parts(len(w), threads)]
    return sum(_map(lambda part: int(part.sum()), parts, threads))


def numpy_compare(a: mmap.mmap, b: mmap.mmap, threads: int) -> Overlap:
    """Zero pages and same-offset differences with array operations, each thread on a contiguous
    range of pages (no unique count possible without hashing, so it answers less than the others)."""
    ga = np.frombuffer(a, dtype=np.uint64).reshape(-1, PAGE // 8)
    gb = np.frombuffer(b, dtype=np.uint64).reshape(-1, PAGE // 8)

    def count(s: slice) -> tuple[int, int]:
        return int((~gb[s].any(axis=1)).sum()), int((ga[s] != gb[s]).any(axis=1).sum())

    counts = _map(count, _parts(len(ga), threads), threads)
    return Overlap(sum(z for z, _ in counts), sum(d for _, d in counts), None)


def _loop(a: mmap.mmap, b: mmap.mmap, digest: Callable[[memoryview], Any]) -> Overlap:
    zero_digest = digest(memoryview(bytes(PAGE)))
    va, vb = memoryview(a), memoryview(b)
    da = [digest(va[i : i + PAGE]) for i in range(0, len(va), PAGE)]
    db = [digest(vb[i : i + PAGE]) for i in range(0, len(vb), PAGE)]
    zero = sum(1 for d in db if d == zero_digest)
    differ = sum(1 for x, y in zip(da, db, strict=True) if x != y)
    return Overlap(zero, differ, len(set(da) | set(db)))


def xxhash_loop(a: mmap.mmap, b: mmap.mmap) -> Overlap:
    return _loop(a, b, xxhash.xxh3_64_intdigest)


def hashlib_sha256_loop(a: mmap.mmap, b: mmap.mmap) -> Overlap:
    return _loop(a, b, lambda page: hashlib.sha256(page).digest())


def _multi_threaded_peers(a: mmap.mmap, b: mmap.mmap, threads: int) -> dict[str, Callable[[], Any]]:
    return {
        OURS[0]: partial(supermachine_overlap, a, b, "xxh3", threads),
        OURS[1]: partial(supermachine_overlap, a, b, "blake3", threads),
        CEILING: partial(numpy_read_scan, a, b, threads),
        "numpy-compare": partial(numpy_compare, a, b, threads),
    }


def _check(run: Interleaved[Any], pages_total: int) -> None:
    """Every peer that answers found the fixture's share of zero and changed pages, and exactly
    the same counts as supermachine (no digest collides on these few pages)."""
    ours = run.results[OURS[0]]
    assert 0.25 < ours.zero / pages_total < 0.35  # the fixture zeroes 30% of the pages
    assert 0.05 < ours.differ / pages_total < 0.15  # and changes 10% in the child
    for name, result in run.results.items():
        if isinstance(result, Overlap):
            assert (result.zero, result.differ) == (ours.zero, ours.differ), name
            assert result.unique in (None, ours.unique), name


def _report_per_core(benchmark: Any, run: Interleaved[Any], ceiling: str, threads: int) -> None:
    """supermachine's throughput per core (over ``threads`` threads) as a percentage of the
    one-thread NumPy read ``ceiling``'s, per round: median and spread."""
    lines = [f"  per core, % of the one-thread NumPy read ceiling ({threads} thread(s)):"]
    for name in OURS:
        pcts = [c / (t * threads) * 100 for c, t in zip(run.times[ceiling], run.times[name], strict=True)]
        pct = Spread.of(pcts)
        benchmark.extra_info[f"{name}_per_core_pct_of_ceiling"] = {
            "median": round(pct.median, 1),
            "min_max": [round(pct.low, 1), round(pct.high, 1)],
        }
        lines.append(f"    {name}: {pct.median:.1f}% ({pct.low:.1f} .. {pct.high:.1f})")
    print("\n".join(lines))


@pytest.mark.benchmark(group="page hashing + overlap: 2 x 256 MiB, one thread each")
def test_page_overlap_one_thread(benchmark: Any, ram_pair: Pair) -> None:
    _, _, a, b = ram_pair
    peers: dict[str, Callable[[], Any]] = {
        **_multi_threaded_peers(a, b, 1),
        "python-xxhash-loop": partial(xxhash_loop, a, b),
        "python-hashlib-sha256-loop": partial(hashlib_sha256_loop, a, b),
    }
    title = "page hashing + overlap, 2 x 256 MiB, one thread each"
    # The Python loops leave millions of objects behind; collected untimed, not in the next span.
    run = interleave(
        benchmark, title, peers, rounds=ONE_THREAD_ROUNDS, nbytes=len(a) + len(b), before=gc.collect
    )
    _check(run, len(b) // PAGE)
    _report_per_core(benchmark, run, CEILING, 1)


@pytest.mark.benchmark(group="page hashing + overlap: 2 x 256 MiB, all cores each")
def test_page_overlap_all_cores(benchmark: Any, ram_pair: Pair) -> None:
    if CORES < 2:
        pytest.skip("one core: the one-thread comparison covers it")
    _, _, a, b = ram_pair
    peers: dict[str, Callable[[], Any]] = {
        **_multi_threaded_peers(a, b, CORES),
        REFERENCE: partial(numpy_read_scan, a, b, 1),
    }
    title = f"page hashing + overlap, 2 x 256 MiB, {CORES} threads each ({REFERENCE}: one)"
    run = interleave(benchmark, title, peers, rounds=ALL_CORES_ROUNDS, nbytes=len(a) + len(b))
    _check(run, len(b) // PAGE)
    _report_per_core(benchmark, run, REFERENCE, CORES)
