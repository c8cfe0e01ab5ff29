"""Suite-wide markers.

``heavy`` marks the few tests that take several minutes each on hosts that emulate guest kernel
code (every step of a Dockerfile build boots or restores a VM). They run with ``make test-heavy``
(``SUPERMACHINE_HEAVY_TESTS=1``), not in ``make test``, which keeps CI on two cores well inside its
time limit; the cheaper tests of the same modules still run everywhere.
"""

from __future__ import annotations

import os

import pytest

HEAVY_ENV = "SUPERMACHINE_HEAVY_TESTS"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"heavy: minutes per test here; runs only with {HEAVY_ENV}=1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(HEAVY_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"heavy (minutes per test): run `make test-heavy` ({HEAVY_ENV}=1)")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)
