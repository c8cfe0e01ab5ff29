"""CLI start-up: whole ``supermachine --help``, ``pull --help`` and ``run --help`` processes, from
exec to exit, against ``python -c pass`` on the same interpreter (the floor: no command can start
faster), interleaved round by round (see interleave.py).

The goal is every one of them within 150 ms; ``benchmark.extra_info`` says for each whether its
median met it, next to the medians and the per-round ratios to the floor.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from interleave import interleave

ROUNDS = 20  # every order of the four peers, five times
GOAL_MS = 150
FLOOR = "python -c pass"
SUPERMACHINE = Path(sys.executable).with_name("supermachine")
"""The installed console script, next to this interpreter."""


def _process(*argv: str) -> Callable[[], None]:
    def run() -> None:
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)

    return run


@pytest.mark.benchmark(group="cli: start-up of whole processes, interleaved")
def test_cli_startup(benchmark: object, installed_bytecode: None) -> None:
    if not SUPERMACHINE.is_file():
        pytest.skip(f"no installed supermachine console script at {SUPERMACHINE}")
    peers = {
        FLOOR: _process(sys.executable, "-c", "pass"),
        "supermachine --help": _process(str(SUPERMACHINE), "--help"),
        "supermachine pull --help": _process(str(SUPERMACHINE), "pull", "--help"),
        "supermachine run --help": _process(str(SUPERMACHINE), "run", "--help"),
    }
    interleave(benchmark, "CLI start-up, whole processes", peers, rounds=ROUNDS)
    info = benchmark.extra_info  # type: ignore[attr-defined]
    info["goal_ms"] = GOAL_MS
    within = {name: info[f"{name}_median_ms"] <= GOAL_MS for name in peers if name != FLOOR}
    for name, met in within.items():
        info[f"{name}_within_goal"] = met
    print(f"  median within the goal of {GOAL_MS} ms: {within}")
