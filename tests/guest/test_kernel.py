"""Fast tests of the guest kernel recipe's front end (no kernel is built here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from supermachine import kernel
from supermachine.errors import KernelError, SupermachineError

REPO_GUEST = Path(__file__).resolve().parents[2] / "guest"


@pytest.fixture
def guest_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of guest/, a private cache and a stand-in source tarball."""
    guest = tmp_path / "guest"
    shutil.copytree(REPO_GUEST, guest)
    source = tmp_path / "linux-source.tar.xz"
    source.write_bytes(b"not really a kernel")
    monkeypatch.setenv("SUPERMACHINE_GUEST_DIR", str(guest))
    monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SUPERMACHINE_KERNEL_SOURCE", str(source))
    return guest


def test_kernel_error_is_a_supermachine_error() -> None:
    assert issubclass(KernelError, SupermachineError)


def test_default_profile_is_compat_under_kvm_pvm(tmp_path: Path) -> None:
    (tmp_path / "kvm").mkdir()
    assert kernel.default_profile(tmp_path) == "normal"
    assert kernel.default_profile(tmp_path, vcpus=4) == "normal"
    (tmp_path / "kvm_pvm").mkdir()
    assert kernel.default_profile(tmp_path) == "compat"
    assert kernel.default_profile(tmp_path, vcpus=1) == "compat"
    # An SMP kernel boots slower there: only a VM of more than one vCPU gets one.
    assert kernel.default_profile(tmp_path, vcpus=2) == "compat-smp"
    assert kernel.default_profile(tmp_path, vcpus=32) == "compat-smp"


def test_default_profile_matches_this_host() -> None:
    expected = "compat" if Path("/sys/module/kvm_pvm").exists() else "normal"
    assert kernel.default_profile() == expected


def test_auto_profile_picks_the_host_profile(guest_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "default_profile", lambda: "compat")
    assert kernel.cached_path().parent.name.startswith("compat-")
    monkeypatch.setattr(kernel, "default_profile", lambda: "normal")
    assert kernel.cached_path().parent.name.startswith("normal-")


def test_cached_path_layout(guest_copy: Path, tmp_path: Path) -> None:
    path = kernel.cached_path("normal")
    assert path.name == "vmlinux"
    assert path.parent.parent == tmp_path / "cache" / "kernels"
    profile, key = path.parent.name.split("-", 1)
    assert profile == "normal"
    assert len(key) == 16
    int(key, 16)


def test_cache_key_changes_when_a_fragment_changes(guest_copy: Path) -> None:
    normal, compat = kernel.cached_path("normal"), kernel.cached_path("compat")
    assert normal != compat
    assert kernel.cached_path("normal") == normal, "the key must be deterministic"

    with (guest_copy / "kernel" / "config" / "base.config").open("a") as fragment:
        fragment.write("CONFIG_IKCONFIG=y\n")
    assert kernel.cached_path("normal") != normal
    assert kernel.cached_path("compat") != compat


def test_cache_key_of_a_profile_covers_only_its_own_inputs(guest_copy: Path) -> None:
    normal, compat = kernel.cached_path("normal"), kernel.cached_path("compat")

    with (guest_copy / "kernel" / "config" / "compat.config").open("a") as fragment:
        fragment.write("CONFIG_IKCONFIG=y\n")
    after_fragment = kernel.cached_path("compat")
    assert after_fragment != compat
    assert kernel.cached_path("normal") == normal

    patch = next((guest_copy / "kernel" / "patches" / "compat").glob("*.patch"))
    patch.write_text(patch.read_text() + "\n")
    assert kernel.cached_path("compat") != after_fragment
    assert kernel.cached_path("normal") == normal


def test_a_profile_built_on_another_is_rebuilt_when_that_one_changes(guest_copy: Path) -> None:
    normal, compat, smp = (kernel.cached_path(p) for p in ("normal", "compat", "compat-smp"))
    assert len({normal.parent, compat.parent, smp.parent}) == 3

    patch = next((guest_copy / "kernel" / "patches" / "compat").glob("*.patch"))
    patch.write_text(patch.read_text() + "\n")
    assert kernel.cached_path("compat-smp") != smp
    smp = kernel.cached_path("compat-smp")

    with (guest_copy / "kernel" / "config" / "compat.config").open("a") as fragment:
        fragment.write("CONFIG_IKCONFIG=y\n")
    assert kernel.cached_path("compat-smp") != smp
    smp = kernel.cached_path("compat-smp")
    compat = kernel.cached_path("compat")

    # Its own fragment is its own: the profile it builds on does not change with it.
    with (guest_copy / "kernel" / "config" / "compat-smp.config").open("a") as fragment:
        fragment.write("CONFIG_IKCONFIG=y\n")
    assert kernel.cached_path("compat-smp") != smp
    assert kernel.cached_path("compat") == compat
    assert kernel.cached_path("normal") == normal


def _recipe(*args: str) -> list[str]:
    script = REPO_GUEST / "kernel" / "build.sh"
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, check=True
    ).stdout.split()


def test_the_recipe_and_the_package_name_the_same_profiles() -> None:
    assert tuple(_recipe("--profiles")) == kernel.PROFILES
    assert set(kernel.PROFILE_CPUS) == set(kernel.PROFILES)


def test_a_profile_merges_the_fragments_of_the_one_it_builds_on_first() -> None:
    compat_patches = sorted(
        f"patches/compat/{p.name}" for p in (REPO_GUEST / "kernel/patches/compat").glob("*.patch")
    )
    assert compat_patches
    assert _recipe("--inputs", "normal") == ["config/base.config"]
    assert _recipe("--inputs", "compat") == ["config/base.config", "config/compat.config", *compat_patches]
    assert _recipe("--inputs", "compat-smp") == [
        "config/base.config",
        "config/compat.config",
        "config/compat-smp.config",
        *compat_patches,
    ]


def test_cache_key_covers_the_build_script_and_the_source(guest_copy: Path, tmp_path: Path) -> None:
    before = kernel.cached_path("normal")
    script = guest_copy / "kernel" / "build.sh"
    script.write_text(script.read_text() + "\n# changed\n")
    after_script = kernel.cached_path("normal")
    assert after_script != before

    (tmp_path / "linux-source.tar.xz").write_bytes(b"another kernel source")
    assert kernel.cached_path("normal") != after_script


def test_cache_hit_is_returned_without_building(guest_copy: Path) -> None:
    path = kernel.cached_path("compat")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x7fELF stand-in")

    assert kernel.kernel_path("compat", build=False) == path
    started = time.monotonic()
    assert kernel.kernel_path("compat") == path
    assert time.monotonic() - started < 5

    # The script itself: last stdout line is the path, nothing else is printed on a hit.
    result = subprocess.run(
        ["bash", str(guest_copy / "kernel" / "build.sh"), "compat"],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ.copy(),
    )
    assert result.stdout.splitlines()[-1] == str(path)
    assert result.stderr == ""


def test_not_built_and_build_not_allowed(guest_copy: Path) -> None:
    with pytest.raises(KernelError) as info:
        kernel.kernel_path("normal", build=False)
    message = str(info.value)
    assert "\n" not in message
    assert "not built" in message
    assert "normal" in message


def test_missing_source_is_a_one_line_error(guest_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPERMACHINE_KERNEL_SOURCE", str(guest_copy / "no-such-source.tar.xz"))
    for profile in ("normal", "compat"):
        with pytest.raises(KernelError) as info:
            kernel.kernel_path(profile)
        message = str(info.value)
        assert "\n" not in message
        assert "no-such-source.tar.xz not found" in message
        assert "linux-source-6.12" in message


def test_unknown_profile(guest_copy: Path) -> None:
    with pytest.raises(KernelError, match="unknown kernel profile 'turbo'"):
        kernel.kernel_path("turbo")


def test_guest_dir_override_must_hold_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPERMACHINE_GUEST_DIR", str(tmp_path))
    with pytest.raises(KernelError, match=r"has no kernel/build\.sh"):
        kernel.kernel_path("normal")


def test_guest_dir_defaults_to_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUPERMACHINE_GUEST_DIR", raising=False)
    assert kernel.guest_dir() == REPO_GUEST
    assert kernel.build_script() == REPO_GUEST / "kernel" / "build.sh"


def test_build_script_rejects_bad_usage(guest_copy: Path) -> None:
    script = str(guest_copy / "kernel" / "build.sh")
    result = subprocess.run(["bash", script], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "usage:" in result.stderr
    result = subprocess.run(["bash", script, "turbo"], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "build.sh: error: unknown profile 'turbo' (expected one of: normal compat compat-smp)"
    ]


def test_fragments_are_checked_for_options_that_do_not_stick() -> None:
    """Every fragment line is either a comment, an assignment or an explicit "is not set"."""
    for fragment in (REPO_GUEST / "kernel" / "config").glob("*.config"):
        for number, line in enumerate(fragment.read_text().splitlines(), start=1):
            if not line.strip() or (line.startswith("#") and not line.startswith("# CONFIG_")):
                continue
            assert (line.startswith("CONFIG_") and "=" in line) or line.endswith(" is not set"), (
                f"{fragment.name}:{number}: {line!r}"
            )
