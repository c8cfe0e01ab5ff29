"""Snapshot commands: ``snapshot IMAGE`` bakes one, ``snapshots`` lists a store, ``dedup`` stores
RAM files against their goldens with reflinks. ``run snapshot:DIR`` (in :mod:`.vm`) restores one."""

from __future__ import annotations

import datetime
import json
import re
import sys
import time
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from supermachine.cli.vm import network_from_options, parse_env, vm_options
from supermachine.errors import CommandFailedError, InputError, SnapshotError

if TYPE_CHECKING:
    from supermachine.snapshots import dedup as dedup_mod
    from supermachine.snapshots import golden
    from supermachine.vm import VmConfig


def _default_name(image: str) -> str:
    """``<last path part of the reference>-<UTC time>``, safe as a directory name."""
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", image.rstrip("/").rsplit("/", 1)[-1]).strip("-.") or "snapshot"
    return f"{tail}-{datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%S.%fZ')}"


@click.command("snapshot", context_settings={"allow_interspersed_args": False})
@vm_options
@click.option("--name", help="Directory name in the store [default: IMAGE's name and the time].")
@click.option(
    "--output", type=click.Path(path_type=Path, file_okay=False), help="Write here instead of the store."
)
@click.option(
    "--base",
    default="auto",
    show_default=True,
    metavar="auto|none|DIR",
    help="Store as a diff against the golden sibling (auto), in full (none), or against DIR.",
)
@click.option("--insecure/--secure", default=None, help="Plain HTTP (default: only for loopback registries).")
@click.argument("image")
@click.argument("warm", nargs=-1)
def snapshot_cmd(
    image: str,
    warm: tuple[str, ...],
    name: str | None,
    output: Path | None,
    base: str,
    insecure: bool | None,
    memory_mib: int,
    vcpus: int,
    env_pairs: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    timeout: float | None,
    kernel: Path | None,
    show_console: bool,
    network_mode: str,
    allow: tuple[str, ...],
    deny: tuple[str, ...],
    published: tuple[str, ...],
    add_hosts: tuple[str, ...],
    dns_server: str | None,
) -> None:
    """Boot IMAGE, run the WARM command in it (if given; it must succeed), and snapshot the VM.

    `supermachine run snapshot:DIR -- CMD` (or `Image.from_snapshot(DIR)`) then starts from that
    point in milliseconds. A clone's first command runs as fast as a warm one when WARM already
    used the same files (the interpreter, the imports): what WARM read stays in the guest's page
    cache in the snapshot. In the store, the snapshot is kept as a diff against its golden (the
    newest full snapshot of the same image and memory size) unless --base none or
    SUPERMACHINE_AUTO_DEDUP=0.
    """
    from supermachine.snapshots import publish, store_dir
    from supermachine.vm import VmConfig

    if warm[:1] == ("--",):
        warm = warm[1:]
    if output is not None and name is not None:
        raise click.BadParameter("give --name or --output, not both")
    target = output if output is not None else store_dir() / publish.check_name(name or _default_name(image))
    config = VmConfig(
        memory_mib=memory_mib,
        vcpus=vcpus,
        kernel=kernel,
        env=parse_env(env_pairs),
        workdir=workdir,
        user=user,
        network=network_from_options(network_mode, allow, deny, published, add_hosts, dns_server) or "egress",
    )
    # Held from before the pull and the boot until the snapshot is in place: a second writer of
    # this name fails now, not after booting a VM.
    with publish.name_lock(target):
        _pull_boot_and_bake(
            image,
            warm,
            target,
            config,
            base=None if base == "none" else base,
            insecure=insecure,
            timeout=timeout,
            show_console=show_console,
        )


def _pull_boot_and_bake(
    image: str,
    warm: tuple[str, ...],
    target: Path,
    config: VmConfig,
    *,
    base: str | None,
    insecure: bool | None,
    timeout: float | None,
    show_console: bool,
) -> None:
    from supermachine import ui
    from supermachine.image import Image
    from supermachine.oci.progress import RichProgress
    from supermachine.snapshots import metadata
    from supermachine.units import human_bytes

    if (target / metadata.METADATA_FILE).exists():
        raise InputError(f"{target} already holds a snapshot")
    with RichProgress() if ui.stderr.is_terminal else nullcontext() as progress:
        img = Image.from_oci(image, insecure=insecure, progress=progress)
    status = ui.stderr.status("booting the microVM", spinner="dots")
    with status if ui.stderr.is_terminal else nullcontext():
        vm = img.start(config)
    with vm:
        if warm:
            # What the warm-up starts in the background (a server, a cache filler) is part of the
            # state being snapshotted, so it outlives the command.
            result = vm.exec(list(warm), timeout=timeout, keep_background=True)
            sys.stdout.buffer.write(result.stdout)
            sys.stderr.buffer.write(result.stderr)
            if result.returncode != 0:
                raise CommandFailedError(
                    f"the warm-up command failed with exit status {result.returncode}; no snapshot taken"
                )
        if show_console:
            ui.stderr.print(vm.console_log, markup=False, highlight=False)
        started = time.monotonic()
        baked = vm.snapshot(target, base=base, stop=True)
    took = time.monotonic() - started
    meta = baked.snapshot_meta
    assert meta is not None
    kind = "full" if (base_name := baked.snapshot_base) is None else f"diff against {base_name}"
    ui.stdout.print(
        f"{target}: {kind}, {meta.memory_mib} MiB RAM, {human_bytes(_allocated(target))} on disk,"
        f" {took:.2f} s"
    )


def _allocated(directory: Path) -> int:
    """Bytes allocated to a snapshot's files (``du``; shared extents count in full)."""
    from supermachine.snapshots import metadata

    total = 0
    for name in (metadata.MEMORY_FILE, metadata.VMSTATE_FILE, metadata.METADATA_FILE):
        with suppress(OSError):
            total += (directory / name).lstat().st_blocks * 512
    return total


@click.command("snapshots")
@click.argument("store", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
def snapshots_cmd(store: Path | None, as_json: bool) -> None:
    """List the snapshots in STORE (default: supermachine's snapshot store), oldest first.

    A directory that is not a readable snapshot gets one warning line on stderr and the exit status
    is 1; the others are still listed.
    """
    from supermachine import ui
    from supermachine.snapshots import golden, store_dir

    directory = store if store is not None else store_dir()
    if not directory.is_dir():
        if store is not None:
            raise SnapshotError(f"{directory}: no such snapshot store")
        found: list[golden.Snapshot] = []
        problems: list[str] = []
    else:
        found, problems = golden.list_snapshots(directory)
    for line in problems:
        ui.warn(line)
    _print_listing(directory, found, as_json)
    if problems:
        sys.exit(1)  # like ls: the rest was listed, but not everything could be read


def _print_listing(directory: Path, found: list[golden.Snapshot], as_json: bool) -> None:
    from rich.table import Table

    from supermachine import ui
    from supermachine.units import human_bytes

    rows: list[dict[str, Any]] = [
        {
            "name": s.name,
            "image": s.meta.image.ref,
            "memory_mib": s.meta.memory_mib,
            "base": s.base,
            "created": s.meta.created,
            "allocated_bytes": _allocated(s.path),
        }
        for s in found
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"snapshots in {directory}", title_justify="left")
    for col in ("name", "image", "RAM", "base", "created", "on disk"):
        table.add_column(col, justify="right" if col in ("RAM", "on disk") else "left")
    for r in rows:
        created = datetime.datetime.fromtimestamp(r["created"]).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(
            r["name"],
            r["image"],
            f"{r['memory_mib']} MiB",
            r["base"] or "(full)",
            created,
            human_bytes(r["allocated_bytes"]),
        )
    ui.stdout.print(table)


@click.command("dedup")
@click.argument("store", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--dry-run", is_flag=True, help="Find goldens and differing pages; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
def dedup_cmd(store: Path | None, dry_run: bool, as_json: bool) -> None:
    """Share the RAM pages of snapshots in STORE with their golden snapshot.

    Each snapshot's memory.bin is replaced by a reflink clone of its golden (the newest sibling of
    the same image, memory size and supermachine version) with only the differing pages written,
    after checking the result is byte-identical. Needs a filesystem with reflinks (XFS, btrfs).
    STORE defaults to the snapshot store in supermachine's cache.
    """
    from supermachine import ui
    from supermachine.snapshots import dedup as dedup_mod
    from supermachine.snapshots import store_dir

    directory = store if store is not None else store_dir()
    report = dedup_mod.dedup_store(directory, dry_run=dry_run)
    for line in report.problems:
        ui.warn(line)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        _print_report(report)
    if not report.ok:
        sys.exit(1)


def _print_report(report: dedup_mod.StoreReport) -> None:
    from rich.table import Table

    from supermachine import ui
    from supermachine.units import human_bytes, percent

    out = ui.stdout
    verb = "would save" if report.dry_run else "saved"
    table = Table(title=f"snapshot dedup in {report.store}", title_justify="left")
    for col in ("snapshot", "golden", "status", "RAM", "differing pages", "written", verb):
        table.add_column(col, justify="left" if col in ("snapshot", "golden", "status") else "right")
    for r in report.results:
        active = r.status in ("deduped", "would-dedup")
        table.add_row(
            r.snapshot,
            r.golden or "-",
            r.status,
            human_bytes(r.ram_size),
            f"{r.differ_pages:,} ({percent(r.differ_pages, r.pages):.1f}%)" if active else "-",
            human_bytes(r.bytes_written) if active else "-",
            human_bytes(max(r.bytes_saved, 0)) if active else "-",
        )
    out.print(table)
    for r in report.results:
        if r.message and r.status in ("failed", "no-reflink", "skipped"):
            out.print(f"{r.snapshot}: {r.status}: {r.message}")
    if report.stale_temps_removed:
        out.print(f"removed {report.stale_temps_removed} temp file(s) left by an interrupted run")
    measured = "estimated" if report.dry_run else "measured by statvfs"
    out.print(f"total {verb}: {human_bytes(max(report.bytes_saved, 0))} ({measured})")


if __name__ == "__main__":  # pragma: no cover - `python -m supermachine.cli.snapshots`
    from supermachine.cli import main

    main()
