"""Shared set-up for the snapshot tests: KVM availability, guest builds, VMs stopped at teardown."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import snap_guests
from supermachine import _core, worker


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: boots a real Linux guest (tens of seconds on emulating hosts)")


@pytest.fixture(scope="session")
def kvm() -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm does not exist (no KVM on this machine)")
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        pytest.skip(f"/dev/kvm is not usable: {e.strerror}")


@pytest.fixture(scope="session")
def guest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool in ("as", "ld", "objcopy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (binutils) is needed to build the test guests")
    return tmp_path_factory.mktemp("snap-guests")


@pytest.fixture(params=["in-process", "worker"])
def vms(kvm: None, guest_dir: Path, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """`vms.start(source, **config)` and `vms.restore(dir, **overrides)`; all stopped at teardown.
    Each test runs with the VMM in this process and in a jailed worker process."""

    def options() -> Any:
        if request.param != "worker":
            return None
        return worker.worker_options(Path(tempfile.mkdtemp(dir=tmp_path, prefix="vm-")), None)

    class Vms:
        def __init__(self) -> None:
            self.all: list[Any] = []

        def start(self, source: str, **config: Any) -> Any:
            cfg: dict[str, Any] = {"raw": str(snap_guests.build(source, guest_dir)), "memory_mib": 16}
            cfg.update(config)
            vm = _core.Vm.start(cfg, options())
            self.all.append(vm)
            return vm

        def restore(self, directory: Path, **overrides: Any) -> Any:
            vm = _core.Vm.restore(str(directory), overrides or None, options())
            self.all.append(vm)
            return vm

    v = Vms()
    yield v
    for vm in v.all:
        vm.stop()
