"""Shared set-up for the VMM tests: KVM availability, guest builds, the slow marker."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import vmm_guests as guests
from supermachine import _core, worker


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: boots a real guest kernel (30 s or more on emulating hosts); deselect with -m 'not slow'",
    )


def _kvm_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist (no KVM on this machine)"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm is not usable: {os.strerror(e.errno or errno.EIO)}"
    os.close(fd)
    return None


@pytest.fixture(scope="session")
def kvm() -> None:
    """Skips (with the reason) when KVM is missing or unusable."""
    problem = _kvm_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="session")
def guest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool in ("as", "ld", "objcopy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (binutils) is needed to build the test guests")
    return tmp_path_factory.mktemp("guests")


@pytest.fixture(params=["in-process", "worker"])
def start_vm(
    kvm: None, guest_dir: Path, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., Any]]:
    """Starts a raw test guest from assembly source, its VMM in this process or in a jailed
    worker process (each test runs with both); every VM is stopped at teardown."""
    vms: list[Any] = []

    def start(source: str, **config: Any) -> Any:
        binary = guests.build(source, guest_dir, load_addr=config.pop("load_addr", guests.LOAD_ADDR))
        cfg: dict[str, Any] = {"raw": str(binary), "memory_mib": 16}
        cfg.update(config)
        options = None
        if request.param == "worker":
            runtime = Path(tempfile.mkdtemp(dir=tmp_path, prefix="vm-"))
            options = worker.worker_options(runtime, None)
        vm = _core.Vm.start(cfg, options)
        vms.append(vm)
        return vm

    yield start
    for vm in vms:
        vm.stop()
