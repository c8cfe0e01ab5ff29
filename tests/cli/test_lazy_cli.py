"""The command line starts fast: a command's module, and what it imports, load only when that
command runs, while the listing in ``supermachine --help`` still shows every command."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from supermachine.cli import COMMANDS, LazyGroup

sys.path.insert(0, str(Path(__file__).parents[1] / "oci"))
from _support import Entry, LayoutWriter, make_layer, missing_tools, skopeo_copy, start_registry

HEAVY = (
    "http.client",
    "ssl",
    "rich",
    "numpy",
    "supermachine.oci",
    "supermachine.agent",
    "supermachine.vm",
    "supermachine._core",
    "supermachine.ui",
    "supermachine.image",
    "supermachine.build",
    "supermachine.snapshots",
    "supermachine.volumes",
    "supermachine.probes.density",
    "supermachine.probes.mem_dedup",
    "supermachine.probes.page_overlap",
)
"""Packages that a help text does not need; all but the Rust extension take tens of milliseconds."""

CORE = ("supermachine._core",)

_REPORT_MODULES = """
import json, sys
from supermachine.cli import main
sys.argv = ["supermachine", *sys.argv[1:]]
try:
    main()
finally:
    print(json.dumps(sorted(sys.modules)))
"""


def _supermachine(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    """The real entry point in a fresh interpreter; its last line of stdout lists the modules
    that were imported."""
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parents[2] / "python"),
        "SUPERMACHINE_CACHE_DIR": str(cache),
    }
    return subprocess.run(
        [sys.executable, "-c", _REPORT_MODULES, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "allowed"),
    [
        ((), ()),
        (("pull",), ()),
        # run's options show the VMM's defaults, from the Rust extension (a sub-millisecond load).
        (("run",), CORE),
        (("boot",), CORE),
        # commit, diff and snapshot share run's VM options.
        (("commit",), CORE),
        (("diff",), CORE),
        (("snapshot",), CORE),
        (("snapshots",), CORE),
        (("dedup",), CORE),
        (("build",), ()),
        (("doctor",), CORE),
        # chunk-dedup's --fixed-size shows its probe's default; the probe loads the extension.
        (("probe",), CORE),
        (("probe", "chunk-dedup"), CORE),
        (("probe", "page-overlap"), CORE),
        (("probe", "mem-dedup"), CORE),
        (("probe", "density"), CORE),
        (("volume",), ()),
        (("volume", "create"), ()),
        (("volume", "ls"), ()),
        (("volume", "inspect"), ()),
        (("volume", "rm"), ()),
    ],
)
def test_help_imports_nothing_heavy(args: tuple[str, ...], allowed: tuple[str, ...], tmp_path: Path) -> None:
    proc = _supermachine(*args, "--help", cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _imported(proc, *HEAVY) <= set(allowed)


def _imported(proc: subprocess.CompletedProcess[str], *packages: str) -> set[str]:
    """Which of ``packages`` the process behind ``proc`` (see ``_supermachine``) imported."""
    imported = json.loads(proc.stdout.splitlines()[-1])
    return {package for package in packages for m in imported if m == package or m.startswith(f"{package}.")}


def test_a_quiet_pull_loads_neither_the_progress_display_nor_the_rootfs_builder(tmp_path: Path) -> None:
    layout = LayoutWriter(tmp_path / "layout")
    layout.tag(layout.image([(make_layer([Entry("hello", data=b"hi")]), "gzip")]), "v1")
    unneeded = ("rich", "supermachine.oci.rootfs")
    quiet = _supermachine("pull", "-q", f"oci:{layout.path}:v1", cache=tmp_path / "cache")
    assert quiet.returncode == 0, quiet.stderr
    image_id = quiet.stdout.splitlines()[0]
    assert len(image_id) == 12 and int(image_id, 16) >= 0, quiet.stdout
    assert _imported(quiet, *unneeded) == set()
    # Without -q the progress display loads; with --rootfs the builder does.
    loud = _supermachine("pull", "--rootfs", f"oci:{layout.path}:v1", cache=tmp_path / "cache")
    assert loud.returncode == 0, loud.stderr
    assert _imported(loud, *unneeded) == set(unneeded)


def test_a_quiet_pull_from_a_registry_loads_only_what_it_uses(tmp_path: Path) -> None:
    """Start-up is most of a small pull: no third-party HTTP client, and none of what only local
    images, credential helpers or pruning need."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")
    layout = LayoutWriter(tmp_path / "layout")
    layout.tag(layout.image([(make_layer([Entry("hello", data=b"hi")]), "gzip")]), "v1")
    registry = start_registry(tmp_path / "registry")
    try:
        ref = f"{registry.host}/x/hello:v1"
        skopeo_copy(f"oci:{layout.path}:v1", f"docker://{ref}")
        proc = _supermachine("pull", "-q", ref, cache=tmp_path / "cache")
    finally:
        registry.stop()
    assert proc.returncode == 0, proc.stderr
    unneeded = ("requests", "urllib3", "platformdirs", "tarfile", "subprocess", "shutil", "rich")
    assert _imported(proc, *unneeded) == set()
    assert _imported(proc, "http.client") == {"http.client"}


def test_lazily_loaded_commands_fail_with_one_line(tmp_path: Path) -> None:
    proc = _supermachine("pull", f"oci:{tmp_path / 'nowhere'}", cache=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.strip().count("\n") == 0


def test_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    proc = _supermachine("pul", cache=tmp_path)
    assert proc.returncode == 2
    assert "No such command 'pul'" in proc.stderr


def _real(name: str) -> click.Command:
    entry = COMMANDS[name]
    command = getattr(importlib.import_module(f"supermachine.cli.{entry.module}"), entry.attribute)
    assert isinstance(command, click.Command)
    return command


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_entry_names_its_command(name: str) -> None:
    assert _real(name).name == name


@pytest.mark.parametrize("width", [60, 80, 120, 400])
def test_listing_matches_the_commands_own_help(width: int) -> None:
    """The summaries in the table, shortened by click, read as the commands' docstrings would."""

    def listing(group: click.Group) -> str:
        formatter = click.HelpFormatter(width=width)
        group.format_commands(click.Context(group), formatter)
        return formatter.getvalue()

    eager = click.Group("supermachine", commands=[_real(name) for name in COMMANDS])
    assert listing(LazyGroup("supermachine")) == listing(eager)
