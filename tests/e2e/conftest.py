"""End-to-end tests: a real Linux guest on KVM, booted with supermachine's kernel and agent.

Each boot costs tens of seconds on hosts that emulate guest kernel code, so the suite boots one VM
per session for most tests. They are skipped, with the reason printed, where KVM is not usable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from supermachine.errors import KvmUnavailableError
from supermachine.oci.rootfs import compression_args, default_compression
from supermachine.vm import Vm, VmConfig, check_kvm


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: boots a real Linux guest (tens of seconds on emulating hosts)")


def kvm_or_skip() -> None:
    try:
        check_kvm()
    except KvmUnavailableError as exc:
        pytest.skip(f"KVM is not usable here: {exc}")


def busybox_squashfs(dest: Path) -> Path:
    """A root filesystem: static busybox with every applet, /etc/passwd with root and nobody."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).is_file():
        pytest.fail("busybox (busybox-static) is not installed; run scripts/setup.sh")
    root = dest / "root"
    for d in ("bin", "etc", "tmp", "root", "proc", "sys", "dev", "run", "home/nobody"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home/nobody:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (root / "etc" / "motd").write_text("hello from the rootfs\n")
    os.chmod(root / "tmp", 0o1777)
    return squash(root, dest / "rootfs.squashfs")


def squash(tree: Path, image: Path, compression: str | None = None) -> Path:
    """``tree`` as a squashfs ``image``, every file owned by root, compressed as the product
    compresses images on this host unless ``compression`` is given (uncompressed where guest
    kernel code is emulated: decompressing there made each booted VM's first command take a
    minute)."""
    args = compression_args(compression or default_compression())
    subprocess.run(
        ["mksquashfs", str(tree), str(image), "-noappend", "-quiet", "-all-root", *args],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return image


@pytest.fixture(scope="session")
def make_squashfs() -> Callable[[Path, Path, str | None], Path]:
    """:func:`squash`, for tests that make root filesystems of their own."""
    return squash


@pytest.fixture(scope="session")
def kvm() -> None:
    """Skips (with the reason printed) where KVM cannot be used."""
    kvm_or_skip()


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return busybox_squashfs(tmp_path_factory.mktemp("rootfs"))


@pytest.fixture(scope="session")
def vm(rootfs: Path) -> Iterator[Vm]:
    """One VM for the session, booted on the busybox root filesystem."""
    kvm_or_skip()
    with Vm.start(VmConfig(rootfs=rootfs, memory_mib=256)) as machine:
        yield machine
