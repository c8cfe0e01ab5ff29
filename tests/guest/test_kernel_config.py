"""The recipe refuses a configuration in which a requested option did not stick (needs the source)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_GUEST = Path(__file__).resolve().parents[2] / "guest"
SOURCE = Path("/usr/src/linux-source-6.12.tar.xz")


@pytest.mark.slow
def test_option_with_unmet_dependencies_is_named(tmp_path: Path) -> None:
    if not SOURCE.is_file():
        print(f"skipping the kernel configuration test: {SOURCE} is missing")
        pytest.skip(f"{SOURCE} is missing (Debian package linux-source-6.12)")
    guest = tmp_path / "guest"
    shutil.copytree(REPO_GUEST, guest)
    with (guest / "kernel" / "config" / "base.config").open("a") as fragment:
        # ACPI_BUTTON needs ACPI, which the fragment turns off; PCI_MSI needs PCI, likewise.
        fragment.write("CONFIG_ACPI_BUTTON=y\nCONFIG_PCI_MSI=y\n")
    env = dict(os.environ, SUPERMACHINE_CACHE_DIR=str(tmp_path / "cache"))
    try:
        result = subprocess.run(
            ["bash", str(guest / "kernel" / "build.sh"), "--config-only", "normal"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )
    finally:
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("build.sh: error: options did not stick in .config"), result.stderr
    assert "CONFIG_ACPI_BUTTON (wanted y, got unset)" in last
    assert "CONFIG_PCI_MSI (wanted y, got unset)" in last
    assert result.stdout == ""


def _fragment_value(profile: str, option: str) -> str | None:
    """``option``'s last setting in the fragments ``profile`` merges, in the recipe's order."""
    listed = subprocess.run(
        ["bash", str(REPO_GUEST / "kernel" / "build.sh"), "--inputs", profile],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    value = None
    for name in listed:
        if not name.startswith("config/"):
            continue
        for line in (REPO_GUEST / "kernel" / name).read_text().splitlines():
            if line.startswith(f"{option}="):
                value = line.split("=", 1)[1]
            elif line == f"# {option} is not set":
                value = "n"
    return value


def test_the_cpu_count_of_each_profile_is_what_its_config_builds() -> None:
    from supermachine import kernel

    for profile in kernel.PROFILES:
        assert _fragment_value(profile, "CONFIG_NR_CPUS") == str(kernel.PROFILE_CPUS[profile]), profile
        smp = _fragment_value(profile, "CONFIG_SMP")
        assert (smp == "y") == (kernel.PROFILE_CPUS[profile] > 1), profile


def test_every_vcpu_count_gets_a_kernel_that_brings_up_that_many_cpus(tmp_path: Path) -> None:
    from supermachine import _core, kernel

    emulating = tmp_path / "emulating"
    (emulating / "kvm_pvm").mkdir(parents=True)
    for host in (tmp_path, emulating):
        for vcpus in range(1, _core.MAX_VCPUS + 1):
            profile = kernel.default_profile(host, vcpus=vcpus)
            assert kernel.PROFILE_CPUS[profile] >= vcpus, (host.name, vcpus, profile)
