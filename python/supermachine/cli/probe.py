"""``supermachine probe ...``: density measurements, as tables or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from supermachine import paths, ui
from supermachine.cdc import ChunkParams
from supermachine.errors import InputError
from supermachine.probes import chunk_dedup, page_overlap
from supermachine.units import human_bytes


@click.group()
def probe() -> None:
    """Measure what makes VMs dense: sub-layer redundancy of images, page overlap of RAM images."""


@probe.command("chunk-dedup")
@click.argument("blob_dir", required=False, type=click.Path(path_type=Path))
@click.option("--min-size", default=2048, show_default=True, help="FastCDC minimum chunk size (bytes).")
@click.option("--avg-size", default=16384, show_default=True, help="FastCDC average chunk size (bytes).")
@click.option("--max-size", default=65536, show_default=True, help="FastCDC maximum chunk size (bytes).")
@click.option(
    "--fixed-size", default=chunk_dedup.FIXED_CHUNK_SIZE, show_default=True, help="Fixed chunk size (bytes)."
)
@click.option("--zstd-level", default=3, show_default=True, help="Level for per-chunk zstd recompression.")
@click.option("--threads", type=click.IntRange(min=1), help="Worker threads [default: one per core].")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")
def chunk_dedup_cmd(
    blob_dir: Path | None,
    min_size: int,
    avg_size: int,
    max_size: int,
    fixed_size: int,
    zstd_level: int,
    threads: int | None,
    as_json: bool,
) -> None:
    """Sub-layer redundancy of the OCI layer blobs under BLOB_DIR.

    BLOB_DIR defaults to supermachine's own layer cache. gzip, zstd and plain tar layers are
    decompressed and chunked content-defined (FastCDC) and fixed-size; corrupt layers are
    reported and skipped; non-layer blobs (configs, manifests) are ignored.
    """
    directory = blob_dir if blob_dir is not None else paths.blob_dir()
    if blob_dir is None and not directory.exists():
        raise InputError(f"no layer cache at {directory} yet: pull an image first, or pass BLOB_DIR")
    try:
        params = ChunkParams(min_size, avg_size, max_size)
        blobs = chunk_dedup.find_blobs(directory)
        with ui.byte_progress("chunking layers", chunk_dedup.total_size(blobs)) as bar:
            task = bar.task_ids[0]
            report = chunk_dedup.scan(
                directory,
                params,
                fixed_size=fixed_size,
                zstd_level=zstd_level,
                threads=threads,
                progress=lambda n: bar.advance(task, n),
                blobs=blobs,
            )
    except ValueError as exc:  # parameter validation in the core
        raise click.BadParameter(str(exc)) from None
    for reason in report.skipped:
        ui.warn(f"skipped {reason}")
    if not report.layers:
        raise InputError(f"no readable layer blobs under {directory}")
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    _print_chunk_dedup(report)


def _print_chunk_dedup(report: chunk_dedup.ChunkDedupReport) -> None:
    out = ui.stdout
    out.print(f"[bold]Sub-layer redundancy[/bold] of {report.blob_dir}")
    summary = Table.grid(padding=(0, 2))
    summary.add_row("layers processed", str(len(report.layers)))
    if report.skipped:
        summary.add_row("layers skipped (unreadable)", str(len(report.skipped)))
    summary.add_row("non-layer blobs ignored", str(report.non_layer_blobs))
    summary.add_row("compressed on disk", human_bytes(report.compressed_bytes))
    summary.add_row("uncompressed", human_bytes(report.uncompressed_bytes))
    out.print(summary)
    table = Table(title="chunking schemes", title_justify="left")
    for col in ("scheme", "chunks", "avg chunk", "unique chunks", "unique bytes", "unique share"):
        table.add_column(col, justify="left" if col == "scheme" else "right")
    table.add_column("redundancy", justify="right")
    table.add_column("unique, zstd per chunk", justify="right")
    table.add_column("vs compressed layers", justify="right")
    for s in report.schemes:
        ratio = s.unique_zstd_bytes / report.compressed_bytes if report.compressed_bytes else 0.0
        table.add_row(
            s.name,
            f"{s.chunks:,}",
            human_bytes(s.avg_chunk_size),
            f"{s.unique_chunks:,}",
            human_bytes(s.unique_bytes),
            f"{s.unique_share:.1f}%",
            f"{s.redundancy:.1f}%",
            human_bytes(s.unique_zstd_bytes),
            f"{ratio:.2f}x",
        )
    out.print(table)
    out.print(
        "[dim]redundancy = share of uncompressed bytes a chunk store need not keep; "
        "'vs compressed layers' < 1 means a zstd chunk store is smaller than the layer blobs.[/dim]"
    )


@probe.command("page-overlap")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--hash", "algo", type=click.Choice(["xxh3", "blake3"]), default="xxh3", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="Worker threads [default: one per core].")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")
def page_overlap_cmd(files: tuple[Path, ...], algo: str, threads: int | None, as_json: bool) -> None:
    """Page overlap of raw guest-RAM images. The first FILE is the golden.

    Per image: zero pages, pages that differ from the golden at the same offset (what a diff
    snapshot stores) and pages equal to it (shared copy-on-write); over all images: unique pages.
    """
    with ui.count_progress("hashing pages", len(files)) as bar:
        task = bar.task_ids[0]
        report = page_overlap.compare_images(
            list(files),
            algo="blake3" if algo == "blake3" else "xxh3",
            threads=threads,
            progress=lambda _path: bar.advance(task),
        )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    out = ui.stdout
    table = Table(
        title=f"page overlap against golden {report.golden} ({algo}, 4 KiB pages)", title_justify="left"
    )
    for col in ("image", "size", "pages", "zero", "differ (diff stores)", "shared with golden"):
        table.add_column(col, justify="left" if col == "image" else "right")
    for i, row in enumerate(report.images):
        name = f"{row.path} (golden)" if i == 0 else row.path
        table.add_row(
            name,
            human_bytes(row.bytes),
            f"{row.pages:,}",
            f"{row.zero_pct:.1f}%",
            f"{row.differ_pct:.1f}%",
            f"{row.shared_pct:.1f}%",
        )
    out.print(table)
    out.print(
        f"all images: {report.total_pages:,} pages, {report.unique_pages:,} unique "
        f"({report.unique_pct:.1f}%), {report.redundant_pct:.1f}% redundant"
    )


def register(group: click.Group) -> None:
    group.add_command(probe)
