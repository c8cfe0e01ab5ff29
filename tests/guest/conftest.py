"""Shared set-up for the guest kernel tests."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: builds or boots a guest kernel (minutes); deselect with -m 'not slow'"
    )
