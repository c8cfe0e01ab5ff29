"""The agent crate's own unit tests (field decoding, user lookup, kernel command line).

The crate is outside the host workspace, so ``cargo test`` at the top level does not run them.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from supermachine import initramfs, paths


def test_agent_unit_tests() -> None:
    if shutil.which("cargo") is None:
        pytest.skip("cargo is not installed")
    crate = initramfs.agent_build_script().parent
    env = dict(os.environ, CARGO_TARGET_DIR=str(paths.cache_dir() / "agent" / "target-test"))
    result = subprocess.run(
        ["nice", "-n", "10", "cargo", "test", "--locked", "-q"],
        cwd=crate,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test result: ok" in result.stdout
