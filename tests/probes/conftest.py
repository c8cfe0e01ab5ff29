from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_cli(tmp_path: Path) -> RunCli:
    """Runs the installed ``supermachine`` CLI in a child process with a private cache dir."""

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "SUPERMACHINE_CACHE_DIR": str(tmp_path / "cache"), **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "supermachine", *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=300,
        )

    return run
