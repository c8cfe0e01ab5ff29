"""``supermachine volume create|ls|inspect|rm``: named volumes (:mod:`supermachine.volumes`)."""

from __future__ import annotations

import datetime
import json

import click


@click.group("volume")
def volume() -> None:
    """Named volumes: ext4 disks that keep data across VMs (`run -v NAME:/DIR`)."""


@volume.command("create")
@click.option("--size", default="1G", show_default=True, help="Size of the volume (K, M, G or T).")
@click.argument("name")
def create_cmd(name: str, size: str) -> None:
    """Make the empty volume NAME."""
    from supermachine import volumes

    made = volumes.create(name, size)
    click.echo(made.name)


@volume.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Only the names.")
def ls_cmd(quiet: bool) -> None:
    """List the volumes."""
    from rich.table import Table

    from supermachine import ui, volumes
    from supermachine.units import human_bytes

    found = volumes.list_volumes()
    if quiet:
        for v in found:
            click.echo(v.name)
        return
    table = Table(box=None, pad_edge=False)
    for col in ("NAME", "SIZE", "ON DISK", "CREATED", "IN USE"):
        table.add_column(col, justify="right" if col in ("SIZE", "ON DISK") else "left")
    for v in found:
        table.add_row(
            v.name,
            human_bytes(v.size),
            human_bytes(v.path.stat().st_blocks * 512),
            _when(v.created),
            "yes" if volumes.in_use(v) else "no",
        )
    ui.stdout.print(table)


@volume.command("inspect")
@click.argument("names", nargs=-1, required=True)
def inspect_cmd(names: tuple[str, ...]) -> None:
    """Show volumes as JSON: name, disk image, size, creation time, whether a VM uses them."""
    from supermachine import volumes

    out = []
    for name in names:
        v = volumes.get(name)
        out.append({**v.to_json(), "on_disk": v.path.stat().st_blocks * 512, "in_use": volumes.in_use(v)})
    click.echo(json.dumps(out, indent=2))


@volume.command("rm")
@click.argument("names", nargs=-1, required=True)
def rm_cmd(names: tuple[str, ...]) -> None:
    """Delete volumes and their data (refused while a VM uses one)."""
    from supermachine import volumes

    for name in names:
        volumes.remove(name)
        click.echo(name)


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
