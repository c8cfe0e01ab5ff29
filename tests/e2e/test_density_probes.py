"""``supermachine probe mem-dedup`` and ``probe density`` on a real Linux guest, run as the CLI in a
child process (its memory figures are then its own, not this test process's).

mem-dedup restores its snapshots, so it is fast; density cold-boots 1 + N VMs (N = 2 here), tens of
seconds each on hosts that emulate guest kernel code; density of a Dockerfile builds it first (one
build VM), then restores N clones of the build's VM and cold-boots N VMs of the built image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from supermachine.vm import Vm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "oci"))
from _support import full_busybox_rootfs, private_cache, umoci_image

pytestmark = pytest.mark.slow

MiB = 1 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RAM_PAGES = 256 * MiB // 4096  # the session VM's 256 MiB


def run_cli(
    *args: str, tmpdir: Path | None = None, timeout: float = 900, cache: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed CLI in a child process; ``tmpdir`` becomes its ``$TMPDIR``, ``cache`` its
    supermachine cache."""
    env = dict(os.environ)
    if cache is not None:
        env["SUPERMACHINE_CACHE_DIR"] = str(cache)
    if tmpdir is not None:
        tmpdir.mkdir(exist_ok=True)
        env["TMPDIR"] = str(tmpdir)
    return subprocess.run(
        [sys.executable, "-m", "supermachine", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def snapshots(vm: Vm, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A full snapshot of the session VM, and a diff child of it taken from a restored clone."""
    store = tmp_path_factory.mktemp("mem-dedup-store")
    vm.exec(["sh", "-c", "echo golden > /tmp/golden"], check=True)
    vm.snapshot(store / "golden", base=None)
    with Vm.restore(store / "golden") as clone:
        clone.exec(["sh", "-c", "head -c 2000000 /dev/urandom > /tmp/child"], check=True)
        clone.snapshot(store / "child", base=store / "golden")
    return store / "golden", store / "child"


def test_mem_dedup_compares_full_ram_of_full_and_diff_snapshots(
    snapshots: tuple[Path, Path], rootfs: Path, tmp_path: Path
) -> None:
    golden, child = snapshots
    # The VM booted on a bare root filesystem: a restore in another process must be given it (the
    # path a snapshot records is never opened).
    args = ["probe", "mem-dedup", str(golden), str(child), "--rootfs", str(rootfs), "--json"]
    proc = run_cli(*args, tmpdir=tmp_path / "tmp")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows = report["rows"]
    assert [r["kind"] for r in rows] == ["full", "diff", "sibling"]
    assert [r["label"] for r in rows] == [str(golden), str(child), f"sibling of {golden}"]
    for row in rows:
        # Every row is the whole logical RAM, a diff included.
        assert row["pages"] == RAM_PAGES
        assert row["same_as_golden"] + row["differ_from_golden"] == row["pages"]
        for key in ("zero_pct", "differ_pct", "shared_pct"):
            assert 0 <= row[key] <= 100, (key, row)
        assert row["differ_pct"] + row["shared_pct"] == pytest.approx(100)
        # A guest booted on busybox leaves most of its RAM untouched.
        assert row["zero_pct"] > 30, row
    golden_row, child_row, sibling = rows
    assert golden_row["differ_from_golden"] == 0 and golden_row["shared_pct"] == 100
    # The child wrote 2 MB of random bytes (about 490 pages) into its tmpfs.
    assert 0.5 < child_row["differ_pct"] < 15, child_row
    assert child_row["base"] == "golden"
    assert 0 < child_row["stored_bytes"] < golden_row["stored_bytes"]
    # A sibling that ran one small command differs from the golden in a few pages only.
    assert 0 < sibling["differ_pct"] < 5, sibling
    assert sibling["stored_bytes"] is None
    assert report["total_pages"] == 3 * RAM_PAGES
    assert 0 < report["unique_pages"] < report["total_pages"]
    assert report["unique_pct"] + report["redundant_pct"] == pytest.approx(100)
    assert list((tmp_path / "tmp").iterdir()) == [], "the temporary full snapshots were left behind"


def test_mem_dedup_table_and_plot(snapshots: tuple[Path, Path], rootfs: Path, tmp_path: Path) -> None:
    golden, child = snapshots
    png = tmp_path / "mem-dedup.png"
    proc = run_cli("probe", "mem-dedup", str(golden), str(child), "--rootfs", str(rootfs), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    # Long paths fold inside their table cell, so look for the short parts.
    assert "(golden)" in proc.stdout
    assert "diff of golden" in proc.stdout and "sibling (not kept)" in proc.stdout
    assert "all snapshots: 196,608 pages" in proc.stdout
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in tmp_path.iterdir()] == ["mem-dedup.png"]  # no temp file beside it


def test_mem_dedup_bad_input_is_one_line(snapshots: tuple[Path, Path], tmp_path: Path) -> None:
    golden, _child = snapshots
    proc = run_cli("probe", "mem-dedup", str(golden), str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {tmp_path / 'metadata.json'}: missing (not a snapshot directory?)"
    assert proc.stdout == ""

    # Without the root filesystem a bare-rootfs snapshot cannot be restored elsewhere: one line.
    proc = run_cli("probe", "mem-dedup", str(golden), "--no-sibling")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "rootfs" in lines[0], proc.stderr

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(golden / "metadata.json", corrupt)
    (corrupt / "vmstate.bin").write_bytes((golden / "vmstate.bin").read_bytes()[:100])
    proc = run_cli("probe", "mem-dedup", str(corrupt))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "vmstate.bin" in lines[0], proc.stderr


def test_plot_without_matplotlib_names_the_extra(tmp_path: Path) -> None:
    # sys.modules[name] = None makes "import matplotlib" fail as if it were not installed.
    code = (
        "import sys; sys.modules['matplotlib'] = None; "
        "sys.argv = ['supermachine'] + sys.argv[1:]; "
        "from supermachine.cli import main; main()"
    )
    args = ["probe", "mem-dedup", str(tmp_path), "--plot", str(tmp_path / "x.png")]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --plot needs matplotlib: pip install 'supermachine[plot]'"


def assert_clones_share_what_boots_duplicate(report: dict[str, Any], read: int) -> None:
    """Each cold boot holds the ``read`` bytes in RAM of its own; the second clone shares the
    pages the first mapped from the snapshot: RSS counts them again, PSS does not. (PSS also moves
    when other processes on the host map or unmap the same libraries, by a few MiB at most: hence
    the margins.)"""
    restore, boot = report["restore"], report["boot"]
    for sample in boot["vms"]:
        assert sample["pss_added"] > read, sample
    second = restore["vms"][1]
    assert second["rss_added"] - second["pss_added"] > read, second
    assert second["pss_added"] < 0.25 * boot["mean_pss_added"], report
    assert restore["mean_pss_added"] < 0.75 * boot["mean_pss_added"], report


def test_density_restored_clones_share_what_cold_boots_duplicate(
    kvm: None, rootfs: Path, tmp_path: Path
) -> None:
    png = tmp_path / "density.png"
    args = ["--vms", "2", "--blob-mib", "16", "--memory-mib", "256", "--rootfs", str(rootfs)]
    proc = run_cli("probe", "density", *args, "--json", "--plot", str(png), tmpdir=tmp_path / "tmp")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    print(json.dumps(report, indent=2))
    assert report["vms"] == 2 and report["memory_mib"] == 256 and report["read_bytes"] == 16 * MiB
    blob = report["read_bytes"]
    assert report["reads"] == "a 16 MiB blob" and report["golden"]["source"] == "boot"
    restore, boot = report["restore"], report["boot"]
    for mode in (restore, boot):
        assert len(mode["vms"]) == 2
        for sample in mode["vms"]:
            assert sample["start_seconds"] > 0 and sample["read_seconds"] > 0
        assert mode["total_pss_added"] == sum(s["pss_added"] for s in mode["vms"])
    # Each cold boot reads the blob into RAM of its own; a clone reads the snapshot's page cache.
    assert_clones_share_what_boots_duplicate(report, blob)
    assert report["pss_ratio"] == pytest.approx(boot["mean_pss_added"] / restore["mean_pss_added"])
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert list((tmp_path / "tmp").iterdir()) == [], "the blob or the snapshot was left behind"


def test_density_rejects_bad_arguments(rootfs: Path) -> None:
    proc = run_cli("probe", "density", "--vms", "0", "--rootfs", str(rootfs))
    assert proc.returncode == 2
    assert "Invalid value for '--vms'" in proc.stderr
    proc = run_cli("probe", "density", "--vms", "1")
    assert proc.returncode == 1
    assert (
        proc.stderr.strip() == "error: no root filesystem for the VMs: give --rootfs SQUASHFS or --image REF"
    )
    proc = run_cli("probe", "density", "--rootfs", str(rootfs), "--blob-mib", "200")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: a 200 MiB blob does not stay in the page cache")


#: A RUN that makes a big file of random bytes (nothing shares its pages by accident) and a small
#: one, deletes a base image file and a file of its own, and a COPY: what the VMs read is every
#: regular file the build made and kept.
DENSITY_DOCKERFILE = """\
FROM {base}
COPY note.txt /srv/note.txt
RUN dd if=/dev/urandom of=/blob bs=1M count=4 2>/dev/null && echo small > /srv/small \\
 && echo gone > /srv/gone && rm /srv/gone /etc/motd
ENV DONE=1
"""


@pytest.fixture
def dockerfile_context(tmp_path: Path) -> tuple[Path, Path]:
    """A build context with its Dockerfile over a busybox base image in an OCI layout, and a
    private cache (sharing only the guest kernel and agent)."""
    work = tmp_path / "work"
    root = full_busybox_rootfs(work / "rootfs", "root:x:0:0::/root:/bin/sh\n", "root:x:0:\n", ("srv",))
    (root / "etc/motd").write_text("motd\n")
    layout = work / "layout"
    umoci_image(layout, "base", root, work, {"cmd": "sh"})
    context = tmp_path / "context"
    context.mkdir()
    (context / "note.txt").write_text("a note\n")
    (context / "Dockerfile").write_text(DENSITY_DOCKERFILE.format(base=f"oci:{layout}:base"))
    return context, private_cache(tmp_path / "cache")


# A build VM, 2 + 1 clones, 2 + 1 cold boots, then 1 + 1 of each again: about 15 minutes where
# kernels are emulated. The measurement itself is checked in CI by the root filesystem case above.
@pytest.mark.heavy
@pytest.mark.timeout(1800)
def test_density_of_a_dockerfile_clones_the_build_vm_and_boots_the_built_image(
    kvm: None, dockerfile_context: tuple[Path, Path], tmp_path: Path
) -> None:
    context, cache = dockerfile_context
    args = ["--vms", "2", "--memory-mib", "256", "--json", str(context)]
    proc = run_cli("probe", "density", *args, tmpdir=tmp_path / "tmp", cache=cache, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    print(json.dumps(report, indent=2))
    # The build's progress went to stderr, so stdout is the report alone.
    assert "STEP 3/4: RUN" in proc.stderr
    # The files the build made and kept: the blob, the small file and the copied note.
    assert report["reads"] == "3 files the build made"
    blob = 4 * MiB
    assert report["read_bytes"] == blob + len("small\n") + len("a note\n")
    assert report["golden"]["source"] == "build" and report["golden"]["seconds"] > 0
    assert report["memory_mib"] == 256
    # A cold boot reads the blob from its squashfs into a page cache of its own; a clone finds it
    # in the build VM's RAM (its overlay's tmpfs), mapped from the snapshot.
    assert_clones_share_what_boots_duplicate(report, blob)
    assert list((tmp_path / "tmp").iterdir()) == [], "the measurement left files behind"

    # Again, reading one named file: the build is all cache hits (no build VM) and its snapshot
    # still serves.
    args = [
        "--vms",
        "1",
        "--memory-mib",
        "256",
        "--json",
        "--read",
        "/srv/small",
        "-f",
        str(context / "Dockerfile"),
    ]
    proc = run_cli("probe", "density", *args, cache=cache, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    assert "Using cache" in proc.stderr and "booting a build VM" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["reads"] == "1 file named with --read" and report["read_bytes"] == len("small\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--read", "/x"], "error: --read, --build-arg, --target and --no-cache need a Dockerfile"),
        (["-f", "Dockerfile", "--image", "busybox"], "error: give a Dockerfile or --rootfs or --image"),
        (["-f", "Dockerfile", "--blob-mib", "8"], "error: --blob-mib does not apply to a Dockerfile"),
        (["-f", "Dockerfile", "--read", "etc/passwd"], "error: --read 'etc/passwd': expected an absolute"),
        (["-f", "Dockerfile", "--read", "/a/../b"], "error: --read '/a/../b': expected an absolute"),
    ],
)
def test_density_of_a_dockerfile_rejects_bad_arguments_in_one_line(
    args: list[str], message: str, tmp_path: Path
) -> None:
    proc = run_cli("probe", "density", *[a.replace("Dockerfile", str(tmp_path / "Dockerfile")) for a in args])
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert proc.stdout == ""


def test_density_of_a_dockerfile_whose_last_stage_changes_no_file_says_so(
    kvm: None, dockerfile_context: tuple[Path, Path], tmp_path: Path
) -> None:
    context, cache = dockerfile_context
    (context / "Dockerfile").write_text("FROM scratch\nENV A=1\n")
    proc = run_cli("probe", "density", "--vms", "1", str(context), cache=cache)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: the build has no snapshot of its VM"), proc.stderr
