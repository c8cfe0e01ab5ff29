"""Image commands: ``pull``, ``images``, ``rmi`` and ``prune``.

The image machinery (registry client, store, rich) is imported inside the commands, so that
loading this module to parse a command line, or to show its help, costs next to nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from supermachine.errors import ImageReferenceError


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _age(ts: float) -> str:
    seconds = max(0, int(time.time() - ts))
    for unit, span in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= span:
            n = seconds // span
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def _split_ref(ref: str) -> tuple[str, str]:
    """(repository, tag-or-digest) for display; local sources are shown whole, an untagged build
    (stored under its config digest) as docker shows one."""
    from supermachine.oci.reference import Reference

    if ref.startswith("sha256:"):
        return "<none>", "<none>"
    try:
        parsed = Reference.parse(ref)
    except ImageReferenceError:
        return ref, "-"
    return Reference(parsed.registry, parsed.repository).familiar(), parsed.tag or (parsed.digest or "")[:19]


@click.command("pull")
@click.argument("ref")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]", help="Platform to pick from a multi-arch image.")
@click.option(
    "--insecure/--secure",
    default=None,
    help="Plain HTTP (default: only for localhost/loopback registries).",
)
@click.option("--rootfs", is_flag=True, help="Also build the squashfs root filesystem.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; print only the image id.")
def pull_command(ref: str, platform: str | None, insecure: bool | None, rootfs: bool, quiet: bool) -> None:
    """Download REF into the local cache.

    REF is a registry reference (alpine, ghcr.io/o/img:tag, name@sha256:...) or a local image:
    oci:DIR[:TAG], docker-archive:FILE, or a path to either.
    """
    from supermachine.oci import pull

    if quiet:
        image = pull(ref, platform=platform, insecure=insecure)
    else:
        from supermachine.oci import RichProgress

        with RichProgress() as progress:
            image = pull(ref, platform=platform, insecure=insecure, progress=progress)
    squashfs = None
    if rootfs:
        from supermachine.oci import build_squashfs

        squashfs = build_squashfs(image)
    if quiet:
        click.echo(image.record.image_id)
        return
    click.echo(f"Pulled {image.ref}")
    click.echo(f"Digest: {image.record.manifest_digest}")
    click.echo(f"Image ID: {image.record.image_id}  ({image.record.platform}, {_size(image.record.size)})")
    if squashfs is not None:
        click.echo(f"Root filesystem: {squashfs}")


@click.command("images")
@click.option("-q", "--quiet", is_flag=True, help="Print image ids only.")
def images_command(quiet: bool) -> None:
    """List the images in the local cache."""
    from rich.console import Console
    from rich.table import Table

    from supermachine.oci import ImageStore

    store = ImageStore()
    records = store.images()
    if quiet:
        for record in records:
            click.echo(record.image_id)
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("REPOSITORY", "TAG", "IMAGE ID", "PLATFORM", "SIZE", "PULLED", "ROOTFS"):
        table.add_column(column, no_wrap=column != "REPOSITORY")
    for record in records:
        repo, tag = _split_ref(record.ref)
        built = "yes" if store.rootfs_path(record.config_digest).exists() else "-"
        table.add_row(
            repo, tag, record.image_id, record.platform, _size(record.size), _age(record.pulled_at), built
        )
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@click.command("rmi")
@click.argument("refs", nargs=-1, required=True)
def rmi_command(refs: tuple[str, ...]) -> None:
    """Remove images (by ref or image id) and the cached data only they used."""
    from supermachine.oci import ImageStore

    store = ImageStore()
    for ref in refs:
        record, freed = store.remove(ref)
        click.echo(f"Untagged: {record.ref}")
        click.echo(
            f"Deleted: {freed.blobs} blobs, {freed.rootfs_images} root filesystems,"
            f" {_size(freed.bytes_freed)}"
        )


@click.command("prune")
def prune_command() -> None:
    """Delete cached blobs and root filesystems that no image uses, and what interrupted pulls and
    builds left behind (partial downloads, temporary files and build trees).

    In the build cache it deletes the steps whose layer went with that, and the build VM
    snapshots no remaining step can restore (a later rebuild of those steps boots a VM instead).

    In the snapshot store it deletes what interrupted snapshot writes left (partial snapshots, lock
    files) and verification records of RAM files that changed or are gone; snapshots being written
    right now are left alone.
    """
    from supermachine import snapshots
    from supermachine.oci import ImageStore
    from supermachine.snapshots import publish

    result = ImageStore().prune()
    click.echo(
        f"Deleted {result.blobs} blobs and {result.rootfs_images} root filesystems,"
        f" {result.partial_files} partial or temporary files and {result.temp_trees} build trees;"
        f" {_size(result.bytes_freed)} freed"
    )
    if result.build_steps or result.build_snapshots:
        click.echo(
            f"Deleted {result.build_steps} build cache steps and {result.build_snapshots}"
            " build VM snapshots whose images are gone"
        )
    debris = publish.prune_store(snapshots.store_dir())
    if debris.partial or debris.incomplete or debris.locks:
        click.echo(
            f"Deleted {debris.partial + debris.incomplete} incomplete snapshots"
            f" and {debris.locks} stale lock files from the snapshot store"
        )


@click.command("push")
@click.argument("image")
@click.argument("destination", required=False)
@click.option(
    "--insecure/--secure",
    default=None,
    help="Plain HTTP (default: only for localhost/loopback registries).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; print only the manifest digest.")
def push_command(image: str, destination: str | None, insecure: bool | None, quiet: bool) -> None:
    """Upload a stored IMAGE to a registry, as DESTINATION (a registry reference; default: IMAGE's
    own name). Blobs the registry has already are not sent again.

    DESTINATION may also be oci:DIR[:TAG], a new OCI image layout directory.
    """
    from supermachine.oci import RichProgress, load_image
    from supermachine.oci.push import push, write_oci_layout

    stored = load_image(image)
    target = destination or stored.ref
    if target.startswith("oci:"):
        directory, _, tag = target.removeprefix("oci:").partition(":")
        write_oci_layout(stored, Path(directory), name=tag or None)
        click.echo(f"Wrote {directory}" if not quiet else stored.record.manifest_digest)
        return
    if quiet:
        digest = push(stored, target, insecure=insecure)
    else:
        with RichProgress() as progress:
            digest = push(stored, target, insecure=insecure, progress=progress)
    click.echo(digest if quiet else f"Pushed {target}\nDigest: {digest}")


def register(group: click.Group) -> None:
    """Attach the image commands to the top-level group."""
    for command in (pull_command, push_command, images_command, rmi_command, prune_command):
        group.add_command(command)
