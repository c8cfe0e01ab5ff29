"""Chunking throughput: supermachine's FastCDC vs the peers, configured identically
(min 2 KiB / avg 16 KiB / max 64 KiB) on the same 256 MiB buffer in the same run.

Peers: the `fastcdc` Rust crate's v2020 chunker (through a benchmark-only binding), PyPI
`pyfastcdc` (FastCDC 2020, Cython) and PyPI `fastcdc` (FastCDC 2016, Cython)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import MiB, throughput
from supermachine import cdc

MIN, AVG, MAX = 2048, 16384, 65536


def _supermachine(data: bytes) -> int:
    return len(cdc.lengths(data))


def _fastcdc_rs(data: bytes) -> int:
    import supermachine_bench_peers

    return len(supermachine_bench_peers.fastcdc_v2020_lengths(data, MIN, AVG, MAX))


def _pyfastcdc(data: bytes) -> int:
    from pyfastcdc import FastCDC

    return sum(1 for _ in FastCDC(avg_size=AVG, min_size=MIN, max_size=MAX).cut_buf(data))


def _fastcdc_py(data: bytes) -> int:
    from fastcdc import fastcdc

    return sum(1 for _ in fastcdc(data, MIN, AVG, MAX))


PEERS: dict[str, Callable[[bytes], int]] = {
    "supermachine": _supermachine,
    "fastcdc-rs-v2020": _fastcdc_rs,
    "pyfastcdc": _pyfastcdc,
    "fastcdc-py-2016": _fastcdc_py,
}


@pytest.mark.benchmark(group="chunking: one 256 MiB buffer, one thread")
@pytest.mark.parametrize("impl", list(PEERS))
def test_chunking_single_thread(benchmark: object, random_256m: bytes, impl: str) -> None:
    fn = PEERS[impl]
    chunks = benchmark.pedantic(fn, args=(random_256m,), rounds=9, warmup_rounds=1)  # type: ignore[attr-defined]
    assert 8_000 < chunks < 24_000  # every peer finds chunks of about the same average size
    throughput(benchmark, len(random_256m))


@pytest.mark.benchmark(group="chunking: 8 x 32 MiB inputs, scaling over threads")
@pytest.mark.parametrize("threads", [1, 2])
def test_chunking_many_inputs(benchmark: object, random_256m: bytes, threads: int) -> None:
    view = memoryview(random_256m)
    inputs = [view[i * 32 * MiB : (i + 1) * 32 * MiB] for i in range(8)]
    result = benchmark.pedantic(  # type: ignore[attr-defined]
        cdc.chunk_many, args=(inputs,), kwargs={"threads": threads}, rounds=5, warmup_rounds=1
    )
    assert len(result) == 8
    throughput(benchmark, len(random_256m))


@pytest.mark.benchmark(group="chunking: peers interleaved round by round, one thread")
def test_chunking_interleaved(benchmark: object, random_256m: bytes) -> None:
    """Every peer once per round, in rotating order, so a shared machine's slow and fast phases
    fall on all of them alike (the per-peer tests above run their rounds back to back). The timed
    unit is one whole round; each peer's min and median go to extra_info, with its median per
    round relative to supermachine's."""
    import statistics
    import time

    names = list(PEERS)
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds = 0

    def one_round() -> None:
        nonlocal rounds
        order = names[rounds % len(names) :] + names[: rounds % len(names)]
        rounds += 1
        for name in order:
            started = time.perf_counter()
            PEERS[name](random_256m)
            times[name].append(time.perf_counter() - started)

    benchmark.pedantic(one_round, rounds=11, warmup_rounds=1)  # type: ignore[attr-defined]
    ours = times["supermachine"]
    info = benchmark.extra_info  # type: ignore[attr-defined]
    for name in names:
        info[f"{name}_min_ms"] = round(min(times[name]) * 1e3, 1)
        info[f"{name}_median_ms"] = round(statistics.median(times[name]) * 1e3, 1)
        ratios = [t / s for t, s in zip(times[name], ours, strict=True)]
        info[f"{name}_vs_supermachine_median_ratio"] = round(statistics.median(ratios), 3)
