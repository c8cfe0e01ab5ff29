"""Peers timed interleaved, round by round, as every peer comparison in these benchmarks is.

Each round runs every peer once, in an order that rotates with the round, so a shared machine's
slow and fast phases fall on all peers alike instead of on whichever ran its rounds last. The
unit that ``benchmark.pedantic`` times is one whole round; each peer's own span is timed around
its call alone. What is reported is per round: each peer's time divided by the baseline's in the
same round, with its median and spread, so noise between rounds cancels out of the ratio.

:func:`interleave` does all of it for peers that are plain callables. Benchmarks whose peers
need untimed work around their span, or time several spans at once, can build their own round
from :func:`rotation` and report with :func:`report`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def rotation(names: Sequence[T], round_no: int) -> list[T]:
    """All of ``names``, the first one rotating with ``round_no``: over ``len(names)`` rounds
    every peer runs once in every position."""
    k = round_no % len(names)
    return [*names[k:], *names[:k]]


@dataclass(frozen=True)
class Spread:
    """Median and spread of per-round values: min, quartiles, max."""

    median: float
    low: float
    q1: float
    q3: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        ordered = sorted(values)
        q1, _, q3 = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else (ordered[0],) * 3
        return cls(statistics.median(ordered), ordered[0], q1, q3, ordered[-1])


@dataclass
class Interleaved(Generic[R]):
    """Every peer's time in every timed round (seconds, in round order), its result from the
    last round (for sanity checks on what the peers computed), and the baseline's name."""

    baseline: str
    times: dict[str, list[float]]
    results: dict[str, R] = field(default_factory=dict)

    def ratios(self, name: str) -> list[float]:
        """``name``'s time over the baseline's, per round (below 1: faster than the baseline)."""
        return [t / b for t, b in zip(self.times[name], self.times[self.baseline], strict=True)]


def interleave(
    benchmark: Any,
    title: str,
    peers: Mapping[str, Callable[[], R]],
    *,
    rounds: int,
    warmup_rounds: int = 1,
    baseline: str | None = None,
    nbytes: int | None = None,
    before: Callable[[], object] | None = None,
) -> Interleaved[R]:
    """Runs ``peers`` interleaved for ``warmup_rounds`` untimed rounds (caches, first-use paths),
    then ``rounds`` timed ones as the benchmark's rounds, and reports them (see :func:`report`).
    ``baseline`` defaults to the first peer; ``nbytes``, the input size, adds throughputs;
    ``before`` runs untimed before every peer's span (``gc.collect``, settling a pool), so that no
    peer pays for what the one before it left behind. Make ``rounds`` a multiple of the number of
    peers to give each peer every position equally."""
    names = list(peers)
    run = Interleaved[R](baseline or names[0], {name: [] for name in names})
    started_rounds = 0

    def one_round(record: bool = True) -> None:
        nonlocal started_rounds
        for name in rotation(names, started_rounds):
            if before is not None:
                before()
            started = time.perf_counter()
            run.results[name] = peers[name]()
            if record:
                run.times[name].append(time.perf_counter() - started)
        started_rounds += 1

    for _ in range(warmup_rounds):
        one_round(record=False)
    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    report(benchmark, title, run, nbytes=nbytes)
    return run


def report(
    benchmark: Any, title: str, run: Interleaved[Any], *, nbytes: int | None = None, key: str = ""
) -> None:
    """Each peer's min and median time (and median throughput, given ``nbytes``) and its per-round
    ratio to the baseline (median, min, quartiles, max), into ``benchmark.extra_info`` and printed
    as a table (run pytest with ``-s`` to see it). ``key`` prefixes the extra_info names, for
    benchmarks that report several spans."""
    info = benchmark.extra_info
    prefix = f"{key}_" if key else ""
    info[f"{prefix}baseline"] = run.baseline
    lines = [
        f"{title} ({len(run.times[run.baseline])} rounds, ratio = peer / {run.baseline} per round)",
        f"  {'peer':<32}{'min ms':>10}{'median ms':>11}{'MB/s':>8}   ratio median [q1 q3] (min max)",
    ]
    for name, times in run.times.items():
        median, ratio = statistics.median(times), Spread.of(run.ratios(name))
        k = f"{prefix}{name}"
        info[f"{k}_min_ms"] = round(min(times) * 1e3, 2)
        info[f"{k}_median_ms"] = round(median * 1e3, 2)
        mbps = ""
        if nbytes is not None:
            info[f"{k}_MB/s"] = round(nbytes / median / 1e6)
            mbps = str(info[f"{k}_MB/s"])
        info[f"{k}_ratio_median"] = round(ratio.median, 3)
        info[f"{k}_ratio_min_max"] = [round(ratio.low, 3), round(ratio.high, 3)]
        info[f"{k}_ratio_q1_q3"] = [round(ratio.q1, 3), round(ratio.q3, 3)]
        lines.append(
            f"  {name:<32}{min(times) * 1e3:>10.1f}{median * 1e3:>11.1f}{mbps:>8}"
            f"   {ratio.median:.3f} [{ratio.q1:.3f} {ratio.q3:.3f}] ({ratio.low:.3f} {ratio.high:.3f})"
        )
    print("\n" + "\n".join(lines))
