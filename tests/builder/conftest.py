"""Shared set-up of the build tests."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: builds in microVMs (minutes on hosts that emulate guest kernels)"
    )
