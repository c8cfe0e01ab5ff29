"""Packaged guest artefacts: which source wins, unpacking into the cache by content, and damage.

A package directory laid out as the wheel build script lays it out (a manifest and zstd files)
stands in for an installed wheel; tests/packaging/test_wheel.py does the same with the real wheel.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import zstandard
from supermachine import artefacts, initramfs, kernel
from supermachine.errors import AgentBuildError, KernelError

CONTENT = {
    "vmlinux-normal": b"normal kernel " * 5000,
    "vmlinux-compat": b"compat kernel " * 5000,
    "vmlinux-compat-smp": b"compat-smp kernel " * 5000,
    "supermachine-agent": b"\x7fELF agent " * 3000,
}


def write_package(root: Path, content: dict[str, bytes] = CONTENT) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, data in content.items():
        (root / f"{name}.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
        sha = hashlib.sha256(data).hexdigest()
        entries[name] = {"file": f"{name}.zst", "sha256": sha, "size": len(data), "recipe": f"key-{name}"}
    (root / "manifest.json").write_text(
        json.dumps({"version": artefacts.MANIFEST_VERSION, "artefacts": entries})
    )
    return root


@pytest.fixture
def packaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed-wheel layout: no checkout, no override, packaged artefacts, an empty cache."""
    package = write_package(tmp_path / "package")
    monkeypatch.setattr(artefacts, "packaged_dir", lambda: package)
    monkeypatch.setattr(artefacts, "checkout_guest_dir", lambda: None)
    monkeypatch.delenv("SUPERMACHINE_GUEST_DIR", raising=False)
    monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(tmp_path / "cache"))
    artefacts._verified.clear()
    return package


def test_the_checkout_wins_over_packaged_copies_and_the_override_over_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SUPERMACHINE_GUEST_DIR", raising=False)
    checkout = Path(__file__).resolve().parents[2] / "guest"
    assert artefacts.guest_source() == ("checkout", checkout)
    monkeypatch.setenv("SUPERMACHINE_GUEST_DIR", str(tmp_path))
    assert artefacts.guest_source() == ("override", tmp_path)


def test_an_installed_wheel_uses_its_packaged_copies(packaged: Path) -> None:
    assert artefacts.guest_source() == ("packaged", packaged)
    for profile in kernel.PROFILES:
        path = kernel.kernel_path(profile, build=False)
        assert path.read_bytes() == CONTENT[f"vmlinux-{profile}"]
        assert path == kernel.cached_path(profile)
    agent = initramfs.agent_path(build=False)
    assert agent.read_bytes() == CONTENT["supermachine-agent"]
    # The initramfs is made from the packaged agent, as from a built one.
    cpio = initramfs.initramfs_path(build=False).read_bytes()
    assert cpio == initramfs.newc_archive(initramfs.initramfs_entries(CONTENT["supermachine-agent"]))


def test_unpacked_once_into_the_cache_under_the_content_hash(packaged: Path, tmp_path: Path) -> None:
    path = artefacts.unpacked("vmlinux-compat")
    sha = hashlib.sha256(CONTENT["vmlinux-compat"]).hexdigest()
    assert path == tmp_path / "cache" / "packaged" / sha[:32] / "vmlinux-compat"
    before = path.stat()
    artefacts._verified.clear()  # as a new process: checks the cached copy, does not rewrite it
    assert artefacts.unpacked("vmlinux-compat") == path
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in path.parent.iterdir()) == ["vmlinux-compat"]


def test_a_damaged_cache_entry_is_unpacked_again(packaged: Path) -> None:
    path = artefacts.unpacked("vmlinux-normal")
    path.write_bytes(b"truncated")
    artefacts._verified.clear()
    assert artefacts.unpacked("vmlinux-normal").read_bytes() == CONTENT["vmlinux-normal"]


@pytest.mark.parametrize("damage", ["flipped byte", "other content", "missing"])
def test_a_damaged_packaged_kernel_is_one_line_naming_the_file(packaged: Path, damage: str) -> None:
    file = packaged / "vmlinux-compat.zst"
    if damage == "flipped byte":
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
    elif damage == "other content":
        file.write_bytes(zstandard.ZstdCompressor().compress(b"not the kernel"))
    else:
        file.unlink()
    with pytest.raises(KernelError) as caught:
        kernel.kernel_path("compat")
    message = str(caught.value)
    assert str(file) in message and "\n" not in message
    assert ("missing" if damage == "missing" else "corrupt") in message
    # Nothing half-written is left in the cache, and the other profile is unaffected.
    cache = artefacts.unpacked_path("vmlinux-compat").parent
    assert not cache.exists() or not any(cache.iterdir())
    assert kernel.kernel_path("normal").read_bytes() == CONTENT["vmlinux-normal"]


def test_a_damaged_packaged_agent_is_an_agent_error(packaged: Path) -> None:
    (packaged / "supermachine-agent.zst").write_bytes(b"garbage")
    with pytest.raises(AgentBuildError, match=r"supermachine-agent\.zst is corrupt"):
        initramfs.initramfs_path()


def test_a_bad_manifest_is_one_line(packaged: Path) -> None:
    (packaged / "manifest.json").write_text(json.dumps({"version": 1, "artefacts": {"x": {"file": "../x"}}}))
    with pytest.raises(KernelError, match=r"manifest.json is not a valid manifest"):
        kernel.kernel_path("normal")


def test_without_checkout_or_packaged_copies_the_error_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(artefacts, "packaged_dir", lambda: tmp_path / "none")
    monkeypatch.setattr(artefacts, "checkout_guest_dir", lambda: None)
    monkeypatch.delenv("SUPERMACHINE_GUEST_DIR", raising=False)
    assert artefacts.guest_source() is None
    with pytest.raises(KernelError, match="make wheel"):
        kernel.kernel_path()
    with pytest.raises(AgentBuildError, match="make wheel"):
        initramfs.agent_path()


def test_unpacking_writes_no_file_other_users_can_change(packaged: Path) -> None:
    path = artefacts.unpacked("vmlinux-normal")
    assert os.stat(path).st_mode & 0o022 == 0


def test_doctor_names_the_source_and_identity_of_each_artefact(
    packaged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supermachine.cli import doctor

    worker = tmp_path / "vmm"
    worker.write_bytes(b"#!/bin/sh\n")
    worker.chmod(0o755)
    monkeypatch.setenv("SUPERMACHINE_VMM", str(worker))
    report = doctor.artefact_sources()
    for profile in kernel.PROFILES:
        entry = report[f"kernel-{profile}"]
        assert entry["source"] == "packaged"
        assert entry["sha256"] == hashlib.sha256(CONTENT[f"vmlinux-{profile}"]).hexdigest()
        assert entry["recipe_key"] == f"key-vmlinux-{profile}"
        assert entry["used_here"] is (profile in {kernel.default_profile(vcpus=n) for n in (1, 2)})
    assert report["agent"]["sha256"] == hashlib.sha256(CONTENT["supermachine-agent"]).hexdigest()
    assert report["worker"] == {
        "source": "override",
        "path": str(worker),
        "ready": True,
        "sha256": hashlib.sha256(b"#!/bin/sh\n").hexdigest(),
    }
    # Reporting never unpacks anything.
    assert not (tmp_path / "cache").exists()


def test_doctor_in_a_checkout_reports_the_recipes_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from supermachine.cli import doctor

    monkeypatch.delenv("SUPERMACHINE_GUEST_DIR", raising=False)
    report = doctor.artefact_sources()
    for profile in kernel.PROFILES:
        entry = report[f"kernel-{profile}"]
        path = kernel.cached_path(profile)
        assert (entry["source"], entry["path"], entry["recipe_key"]) == (
            "checkout",
            str(path),
            path.parent.name,
        )
        assert entry["ready"] is path.is_file()
    assert report["agent"]["recipe_key"] == initramfs.cached_agent_path().parent.name
