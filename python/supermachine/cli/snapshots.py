"""``supermachine dedup``: store snapshot RAM files against their goldens with reflinks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.table import Table

from supermachine import ui
from supermachine.snapshots import dedup as dedup_mod
from supermachine.snapshots import store_dir
from supermachine.units import human_bytes, percent


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


def register(group: click.Group) -> None:
    group.add_command(dedup_cmd)


if __name__ == "__main__":  # pragma: no cover - `python -m supermachine.cli.snapshots`
    from supermachine.cli import cli, main

    register(cli)
    main()
