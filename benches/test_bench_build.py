"""Dockerfile builds: ``supermachine build`` vs ``buildah bud``, whole commands, in the same run.

Both build the same Dockerfile from the same context and the same local base image (an OCI layout
of static busybox, already in each builder's storage, so no pull is timed), with buildah's layer
cache on (``--layers``) as ours always is, and ``--isolation chroot`` (buildah's lightest runtime).
Three scenarios, each timed as the whole CLI command (process start to exit, teardown included),
the peers in rotating order every round:

1. cold: ``--no-cache`` (every step runs: for supermachine a build VM boots);
2. cached: nothing changed since the last build (every step from the cache);
3. last step changed: ``--build-arg LAST=<new>``, an ARG only the last RUN sees, so every step
   before it is cached and the last one runs again (supermachine restores the build VM of the
   step before it from that step's snapshot instead of booting one).

Per scenario: each peer's median (min..max) seconds, and the per-round ratio supermachine /
buildah (median, min..max), in ``extra_info`` and printed (run with ``-s``).

On hosts whose KVM emulates guest kernel code (kvm_pvm) a VM boot takes tens of seconds and every
guest system call hundreds of microseconds, so the scenarios that run a step are dominated by that
emulation; buildah runs the steps as host processes. The cached scenario boots nothing and is
meaningful here, and so is the restore in scenario 3 (the VMM side of a restore is host work).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import skip_unless_kvm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "oci"))
from _support import full_busybox_rootfs, private_cache, umoci_image

ROUNDS = 3
NOTE = "whole commands; step-running scenarios are dominated by guest kernel emulation on kvm_pvm hosts"
DOCKERFILE = """\
ARG BASE
FROM ${BASE}
ENV APP=/app
WORKDIR /app
COPY src/ ./src/
RUN mkdir -p /app/out && for f in src/*; do cat "$f" >> /app/out/all; done \\
 && sha256sum /app/out/all > /app/out/sum
RUN rm -rf /app/src && echo done > /app/out/state
ARG LAST=first
RUN echo "$LAST" > /app/out/last
CMD ["cat", "/app/out/sum"]
"""
SCENARIOS = ("cold", "cached", "last step changed")
PEERS = ("supermachine", "buildah")


@dataclass
class Setup:
    base: str
    context: Path
    cache: Path
    buildah_root: Path
    times: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    rounds: int = 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, installed_bytecode: None) -> Iterator[Setup]:
    skip_unless_kvm()
    if shutil.which("buildah") is None:
        pytest.skip("buildah is not installed (Debian package buildah)")
    work = tmp_path_factory.mktemp("build-bench")
    root = full_busybox_rootfs(work / "rootfs", "root:x:0:0::/root:/bin/sh\n", "root:x:0:\n")
    umoci_image(work / "layout", "base", root, work, {"cmd": "sh"})
    context = work / "context"
    (context / "src").mkdir(parents=True)
    for i in range(64):
        (context / "src" / f"part{i:02}.txt").write_bytes(os.urandom(16 << 10).hex().encode())
    (context / "Dockerfile").write_text(DOCKERFILE)
    cache = private_cache(work / "cache")
    setup = Setup(f"oci:{work / 'layout'}:base", context, cache, work / "buildah")
    # Both builders get the base image into their storage, and warm: not timed.
    for peer in PEERS:
        _build(setup, peer, "warm-up")
    yield setup


def _build(setup: Setup, peer: str, last: str, *extra: str) -> float:
    args = [
        "--build-arg",
        f"BASE={setup.base}",
        "--build-arg",
        f"LAST={last}",
        "-t",
        f"bench-{peer}:1",
        *extra,
    ]
    if peer == "supermachine":
        cmd = [sys.executable, "-m", "supermachine", "build", "-q", *args, str(setup.context)]
        env = {**os.environ, "SUPERMACHINE_CACHE_DIR": str(setup.cache)}
    else:
        root = ["--root", str(setup.buildah_root / "root"), "--runroot", str(setup.buildah_root / "run")]
        cmd = [
            "buildah",
            *root,
            "--storage-driver",
            "vfs",
            "bud",
            "-q",
            "--layers",
            "--isolation",
            "chroot",
            *args,
        ]
        cmd.append(str(setup.context))
        env = dict(os.environ)
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    took = time.perf_counter() - started
    assert result.returncode == 0, f"{peer}: {result.stderr[-2000:]}"
    return took


def _round(setup: Setup) -> None:
    k = setup.rounds % len(PEERS)
    order = [*PEERS[k:], *PEERS[:k]]
    tag = f"r{setup.rounds}"
    for peer in order:
        times = setup.times.setdefault(peer, {s: [] for s in SCENARIOS})
        times["cold"].append(_build(setup, peer, tag, "--no-cache"))
        times["cached"].append(_build(setup, peer, tag))
        times["last step changed"].append(_build(setup, peer, tag + "-changed"))
    setup.rounds += 1


def _report(benchmark: Any, setup: Setup) -> None:
    lines = [
        f"build, {setup.rounds} rounds ({NOTE}):",
        f"  {'scenario':<20} {'supermachine s':>24} {'buildah s':>24}"
        f"   {'ratio sm/buildah: med (min..max)':>34}",
    ]
    for scenario in SCENARIOS:
        sm, bh = setup.times["supermachine"][scenario], setup.times["buildah"][scenario]
        ratios = sorted(a / b for a, b in zip(sm, bh, strict=True))

        def cell(v: list[float]) -> str:
            return f"{statistics.median(v):8.3f} ({min(v):.3f}..{max(v):.3f})"

        ratio = f"{statistics.median(ratios):.3f} ({ratios[0]:.3f}..{ratios[-1]:.3f})"
        benchmark.extra_info[scenario] = {
            "supermachine_median_s": round(statistics.median(sm), 3),
            "buildah_median_s": round(statistics.median(bh), 3),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_min": round(ratios[0], 3),
            "ratio_max": round(ratios[-1], 3),
        }
        lines.append(f"  {scenario:<20} {cell(sm):>24} {cell(bh):>24}   {ratio:>34}")
    benchmark.extra_info["note"] = NOTE
    print("\n" + "\n".join(lines))


@pytest.mark.benchmark(group="build: supermachine build vs buildah bud")
def test_build_vs_buildah(benchmark: Any, setup: Setup) -> None:
    benchmark.pedantic(_round, args=(setup,), rounds=ROUNDS, iterations=1)
    _report(benchmark, setup)
