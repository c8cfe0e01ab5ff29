"""One end-to-end run on a real distribution root filesystem (Debian minbase from debootstrap)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from _support import Registry, run, skopeo_copy, unsquashfs_list
from supermachine.oci import ImageStore, build_squashfs, pull
from supermachine.paths import xdg_cache_home

SUITE, VARIANT = "bookworm", "minbase"


def _rootfs_tarball(work: Path) -> Path:
    """debootstrap once, then keep the root filesystem as a tarball in the user cache (per suite+variant)."""
    cache = xdg_cache_home() / "supermachine-tests"
    tarball = cache / f"debootstrap-{SUITE}-{VARIANT}.tar"
    if tarball.exists():
        return tarball
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed")
    mirror = os.environ.get("SUPERMACHINE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    target = work / "debootstrap"
    proc = subprocess.run(
        ["nice", "-n", "10", "debootstrap", f"--variant={VARIANT}", SUITE, str(target), mirror],
        capture_output=True,
        text=True,
        check=False,
        timeout=1500,
    )
    if proc.returncode != 0:
        reason = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
        print(f"debootstrap failed, skipping: {reason[0]}")
        pytest.skip(f"debootstrap could not build {SUITE}/{VARIANT} from {mirror}: {reason[0]}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = tarball.with_name(f".{tarball.name}.tmp-{os.getpid()}")
    run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(target), "-cf", str(tmp), "."])
    os.replace(tmp, tarball)
    return tarball


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="unpacking a distribution root filesystem needs root")
def test_debian_minbase_end_to_end(store: ImageStore, registry: Registry, tmp_path: Path) -> None:
    tarball = _rootfs_tarball(tmp_path)
    layout, bundle = tmp_path / "layout", tmp_path / "bundle"
    run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", f"{layout}:{SUITE}"])
    run(["umoci", "unpack", "--image", f"{layout}:{SUITE}", str(bundle)])
    run(
        [
            "tar",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "-C",
            str(bundle / "rootfs"),
            "-xpf",
            str(tarball),
        ]
    )
    run(["nice", "-n", "10", "umoci", "repack", "--image", f"{layout}:{SUITE}", str(bundle)])
    run(
        [
            "umoci",
            "config",
            "--image",
            f"{layout}:{SUITE}",
            "--config.cmd=/bin/bash",
            "--config.env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ]
    )
    ref = f"{registry.host}/debian/{VARIANT}:{SUITE}"
    skopeo_copy(f"oci:{layout}:{SUITE}", f"docker://{ref}")

    image = pull(ref)
    assert image.config.cmd == ("/bin/bash",)
    squashfs = build_squashfs(image, processors=1)
    listing = unsquashfs_list(squashfs)
    for path in ("/usr/bin/dpkg", "/usr/bin/apt-get", "/etc/debian_version", "/var/lib/dpkg/status"):
        assert path in listing, path
    assert listing["/bin"].startswith("lrwxrwxrwx")  # merged /usr
    assert listing["/usr/bin/passwd"].split()[:2] == ["-rwsr-xr-x", "0/0"]
    # Every file of the original tree is in the image, with the same size.
    out = run(["tar", "--numeric-owner", "-tvf", str(tarball)]).stdout
    expected = {}
    for line in out.splitlines():
        parts = line.split(maxsplit=5)
        name = parts[5].split(" -> ")[0].split(" link to ")[0]
        expected["/" + name.removeprefix("./").rstrip("/")] = (parts[0][0], parts[2])
    files = {p: v for p, v in expected.items() if v[0] == "-" and p != "/"}
    assert len(files) > 1000, "the tarball listing was not parsed"
    missing = [p for p in files if p not in listing]
    assert not missing, missing[:10]
    wrong_size = [p for p, (_, size) in files.items() if listing[p].split()[2] != size]
    assert not wrong_size, wrong_size[:10]
    extracted = tmp_path / "x"
    run(["unsquashfs", "-no-progress", "-d", str(extracted), str(squashfs), "/etc/debian_version"])
    assert (extracted / "etc/debian_version").read_text().startswith("12.")
