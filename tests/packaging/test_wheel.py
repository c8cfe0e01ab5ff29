"""The built wheel on its own: installed into a fresh virtualenv outside the checkout, with no
``guest/`` reachable and no C compiler on ``PATH``, it runs a VM (one cold boot, then a snapshot
and a restore), and its kernels and agent are the bytes the recipes build.

Needs the wheel: ``make wheel-test`` builds it and passes its path in ``SUPERMACHINE_WHEEL``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

CHECKOUT = Path(__file__).resolve().parents[2]
WHEEL = os.environ.get("SUPERMACHINE_WHEEL")
pytestmark = pytest.mark.skipif(not WHEEL, reason="needs a built wheel: run `make wheel-test`")

GUEST_FILES = (
    "manifest.json",
    "vmlinux-normal.zst",
    "vmlinux-compat.zst",
    "vmlinux-compat-smp.zst",
    "supermachine-agent.zst",
)
# What the installed package may run on the host: the squashfs builder and the network backend
# (passt, one per VM with a network), nothing else.
HOST_TOOLS = ("mksquashfs", "passt")


@dataclass
class Installed:
    venv: Path
    package: Path
    work: Path
    env: dict[str, str]

    def supermachine(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin" / "supermachine"), *args],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def wheel_path() -> Path:
    assert WHEEL is not None
    return Path(WHEEL).resolve()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def recipe_output(*args: str) -> Path:
    out = subprocess.run(["bash", *args], capture_output=True, text=True, check=True).stdout
    return Path(out.split()[-1])


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("wheel")
    assert CHECKOUT not in root.parents
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel_path())],
        check=True,
        timeout=900,
    )
    package = Path(
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import supermachine, os; print(os.path.dirname(supermachine.__file__))",
            ],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    assert CHECKOUT not in package.parents
    tools = root / "path"
    tools.mkdir()
    for tool in HOST_TOOLS:
        found = shutil.which(tool)
        assert found, f"{tool} is not installed (scripts/apt-packages.txt)"
        (tools / tool).symlink_to(found)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SUPERMACHINE_", "PYTHON", "VIRTUAL_ENV", "CARGO", "RUSTUP"))
    }
    env |= {"PATH": str(tools), "HOME": str(root / "home"), "SUPERMACHINE_CACHE_DIR": str(root / "cache")}
    work = root / "work"
    work.mkdir()
    yield Installed(venv, package, work, env)


def test_the_wheel_carries_kernels_agent_and_worker_with_its_metadata() -> None:
    with zipfile.ZipFile(wheel_path()) as wheel:
        names = set(wheel.namelist())
        for name in GUEST_FILES:
            assert f"supermachine/guest/{name}" in names
        worker = wheel.getinfo("supermachine/bin/supermachine-vmm")
        assert (worker.external_attr >> 16) & 0o111, "the worker is not executable"
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/WHEEL"))
        tags = wheel.read(f"{dist_info}/WHEEL").decode()
        metadata = wheel.read(f"{dist_info}/METADATA").decode()
    assert "-manylinux_2_34_x86_64" in tags, tags
    assert "Requires-Python: >=3.10" in metadata
    assert "Apache" in metadata
    print(f"wheel {wheel_path().name}: {wheel_path().stat().st_size / 2**20:.1f} MiB")


def test_packaged_kernels_and_agent_are_the_recipes_builds() -> None:
    with zipfile.ZipFile(wheel_path()) as wheel:
        manifest = json.loads(wheel.read("supermachine/guest/manifest.json"))["artefacts"]
        packaged = {
            name: zstandard.ZstdDecompressor()
            .decompressobj()
            .decompress(wheel.read(f"supermachine/guest/{entry['file']}"))
            for name, entry in manifest.items()
        }
    kernel_recipe = str(CHECKOUT / "guest/kernel/build.sh")
    built = {
        f"vmlinux-{profile}": recipe_output(kernel_recipe, "--print-path", profile)
        for profile in ("normal", "compat", "compat-smp")
    }
    built["supermachine-agent"] = recipe_output(str(CHECKOUT / "guest/agent/build.sh"), "--print-path")
    assert set(packaged) == set(built)
    for name, path in built.items():
        data = path.read_bytes()
        assert packaged[name] == data, f"{name} differs from {path}"
        assert manifest[name]["sha256"] == sha256(data)
        assert manifest[name]["recipe"] == path.parent.name


def _busybox_layout(dest: Path) -> str:
    """The demo image: busybox on one layer, made with umoci as scripts/demo.sh makes it."""
    layout, bundle = dest / "layout", dest / "bundle"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:v1"], check=True)
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], check=True, capture_output=True
    )
    (bundle / "rootfs" / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", bundle / "rootfs" / "bin" / "busybox")
    for applet in ("sh", "echo", "cat"):
        (bundle / "rootfs" / "bin" / applet).symlink_to("busybox")
    subprocess.run(["umoci", "repack", "--image", f"{layout}:v1", str(bundle)], check=True)
    subprocess.run(["umoci", "config", "--image", f"{layout}:v1", "--config.cmd", "/bin/sh"], check=True)
    return f"oci:{layout}:v1"


def test_runs_a_vm_without_checkout_or_compiler(installed: Installed) -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("KVM is not usable here")
    for tool in ("cc", "gcc", "cargo", "bash", "make"):
        assert shutil.which(tool, path=installed.env["PATH"]) is None
    image = _busybox_layout(installed.work.parent / "image")

    doctor = installed.supermachine("doctor", "--json", timeout=120)
    report = json.loads(doctor.stdout)["artefacts"]
    manifest = json.loads((installed.package / "guest" / "manifest.json").read_text())["artefacts"]
    for name in ("kernel-normal", "kernel-compat", "kernel-compat-smp", "agent", "worker"):
        assert report[name]["source"] == "packaged", (name, report[name])
    assert report["kernel-compat"]["sha256"] == manifest["vmlinux-compat"]["sha256"]
    assert report["agent"]["sha256"] == manifest["supermachine-agent"]["sha256"]
    worker = installed.package / "bin" / "supermachine-vmm"
    assert report["worker"] == {
        "source": "packaged",
        "path": str(worker),
        "ready": True,
        "sha256": sha256(worker.read_bytes()),
    }

    # The one cold boot: run the image, leave state behind, snapshot it.
    baked = installed.supermachine(
        "snapshot", "--name", "warm", "--memory", "256", image, "--", "sh", "-c", "echo warmed > /tmp/state"
    )
    assert baked.returncode == 0, baked.stderr
    # Restores: `supermachine run` of the snapshot, which needs no kernel build either.
    hi = installed.supermachine("run", "snapshot:warm", "--", "echo", "hi", timeout=300)
    assert (hi.returncode, hi.stdout) == (0, "hi\n"), hi.stderr
    state = installed.supermachine("run", "snapshot:warm", "--", "cat", "/tmp/state", timeout=300)
    assert (state.returncode, state.stdout) == (0, "warmed\n"), state.stderr
    # What booted came from the wheel, unpacked into the cache under its content hash.
    meta = json.loads(next((installed.work.parent / "cache").rglob("warm/metadata.json")).read_text())
    kernel = json.dumps(meta)
    assert "/packaged/" in kernel and str(CHECKOUT) not in kernel


def test_a_corrupted_packaged_kernel_fails_with_one_line_naming_it(installed: Installed) -> None:
    profile = "compat" if Path("/sys/module/kvm_pvm").exists() else "normal"
    packaged = installed.package / "guest" / f"vmlinux-{profile}.zst"
    original = packaged.read_bytes()
    env = installed.env
    installed.env = {**env, "SUPERMACHINE_CACHE_DIR": str(installed.work.parent / "fresh-cache")}
    try:
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0xFF
        packaged.write_bytes(bytes(damaged))
        rootfs = installed.work / "empty.sqfs"
        rootfs.write_bytes(b"\0" * 4096)
        proc = installed.supermachine("boot", "--rootfs", str(rootfs), "--", "/bin/true", timeout=120)
    finally:
        packaged.write_bytes(original)
        installed.env = env
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(packaged) in lines[0] and "corrupt" in lines[0]
