"""``supermachine probe ...``: density measurements, as tables or JSON."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from supermachine.errors import InputError

# For --fixed-size's default, shown in the help; this probe is light (none of what
# the other probes need: no numpy, no VM).
from supermachine.probes import chunk_dedup
from supermachine.units import human_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from supermachine.probes import density, mem_dedup
    from supermachine.vm import VmConfig

MiB = 1 << 20
PLOT_HELP = "Also draw the result into this PNG file (needs the 'plot' extra: matplotlib)."


@click.group()
def probe() -> None:
    """Measure what makes VMs dense: sub-layer redundancy of images, page overlap of RAM images,
    RAM shared between snapshots, host memory per restored or booted VM."""


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
    from supermachine import paths, ui
    from supermachine.cdc import ChunkParams

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
    from rich.table import Table

    from supermachine import ui

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
    from rich.table import Table

    from supermachine import ui
    from supermachine.probes import page_overlap

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


@probe.command("mem-dedup")
@click.argument(
    "snapshot_dirs", nargs=-1, required=True, metavar="SNAP_DIR...", type=click.Path(path_type=Path)
)
@click.option("--hash", "algo", type=click.Choice(["xxh3", "blake3"]), default="xxh3", show_default=True)
@click.option("--no-sibling", is_flag=True, help="Skip the same-image sibling (for images without sh).")
@click.option("--threads", type=click.IntRange(min=1), help="Hashing threads [default: one per core].")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png", help=PLOT_HELP)
@click.option(
    "--rootfs",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="SQUASHFS",
    help="Root filesystem of snapshots of VMs booted on a bare root filesystem (OCI images need none).",
)
def mem_dedup_cmd(
    snapshot_dirs: tuple[Path, ...],
    algo: str,
    no_sibling: bool,
    threads: int | None,
    as_json: bool,
    plot: Path | None,
    rootfs: Path | None,
) -> None:
    """RAM shared between VM snapshots, by their full logical RAM. The first SNAP_DIR is the golden.

    Each snapshot is restored and written again as a full snapshot into a temporary directory
    (under $TMPDIR, removed afterwards), so diff snapshots count by their whole RAM. A sibling is
    added: the first snapshot restored once more after running a small command in it. Per snapshot:
    zero pages, pages that differ from the golden (what a diff stores), pages shared with it.
    """
    from supermachine import ui
    from supermachine.probes import mem_dedup

    _check_plot(plot)
    with _steps(mem_dedup.steps(len(snapshot_dirs), not no_sibling)) as step:
        report = mem_dedup.measure(
            list(snapshot_dirs),
            algo="blake3" if algo == "blake3" else "xxh3",
            sibling=not no_sibling,
            threads=threads,
            step=step,
            rootfs=rootfs,
        )
    if plot is not None:
        _save_figure(_mem_dedup_figure(report), plot)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    _print_mem_dedup(report)
    if plot is not None:
        ui.stdout.print(f"plot written to {plot}")


def _print_mem_dedup(report: mem_dedup.MemDedupReport) -> None:
    from rich.table import Table

    from supermachine import ui

    table = Table(
        title=f"RAM of snapshots against golden {report.golden} ({report.algo}, 4 KiB pages, full RAM)",
        title_justify="left",
    )
    table.add_column("snapshot", overflow="fold")  # a long path folds rather than losing its end
    for col in ("stored as", "stored size", "pages", "zero", "differ (diff stores)"):
        table.add_column(col, justify="left" if col == "stored as" else "right")
    table.add_column("shared with golden", justify="right")
    table.add_column("restore", justify="right")
    for i, row in enumerate(report.rows):
        table.add_row(
            f"{row.label} (golden)" if i == 0 else row.label,
            _stored_as(row),
            "-" if row.stored_bytes is None else human_bytes(row.stored_bytes),
            f"{row.pages:,}",
            f"{row.zero_pct:.1f}%",
            f"{row.differ_pct:.1f}%",
            f"{row.shared_pct:.1f}%",
            f"{row.restore_seconds:.2f} s",
        )
    ui.stdout.print(table)
    ui.stdout.print(
        f"all snapshots: {report.total_pages:,} pages, {report.unique_pages:,} unique "
        f"({report.unique_pct:.1f}%), {report.redundant_pct:.1f}% redundant"
    )


def _stored_as(row: mem_dedup.SnapshotRow) -> str:
    if row.kind == "sibling":
        return "sibling (not kept)"
    return "full" if row.base is None else f"diff of {row.base}"


@probe.command("density")
@click.option("--vms", type=click.IntRange(min=1), default=4, show_default=True, help="VMs in each mode.")
@click.option("--rootfs", type=click.Path(path_type=Path), help="Root filesystem image (squashfs).")
@click.option("--image", "image_ref", metavar="REF", help="OCI image to run (pulled if needed).")
@click.option(
    "-f",
    "--file",
    "dockerfile",
    type=click.Path(path_type=Path),
    help="Build this Dockerfile and measure it [default with CONTEXT: CONTEXT/Dockerfile].",
)
@click.option(
    "--build-arg", "build_args", multiple=True, metavar="KEY[=VALUE]", help="A build argument. Repeatable."
)
@click.option("--target", metavar="STAGE", help="Build this stage of the Dockerfile.")
@click.option("--no-cache", is_flag=True, help="Run every build step, taking nothing from the build cache.")
@click.option(
    "--read",
    "read_paths",
    multiple=True,
    metavar="PATH",
    help="With a Dockerfile: a guest file each VM reads [default: the files the build made]. Repeatable.",
)
@click.option("--memory-mib", type=click.IntRange(min=64), default=256, show_default=True, help="Guest RAM.")
@click.option(
    "--blob-mib", type=click.IntRange(min=1), default=32, show_default=True, help="Blob each VM reads."
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png", help=PLOT_HELP)
@click.argument("context", required=False, type=click.Path(path_type=Path))
@click.pass_context
def density_cmd(
    ctx: click.Context,
    vms: int,
    rootfs: Path | None,
    image_ref: str | None,
    dockerfile: Path | None,
    build_args: tuple[str, ...],
    target: str | None,
    no_cache: bool,
    read_paths: tuple[str, ...],
    memory_mib: int,
    blob_mib: int,
    as_json: bool,
    plot: Path | None,
    context: Path | None,
) -> None:
    """Host memory per VM: clones restored from one snapshot (A) vs cold boots (B).

    Every VM gets the same file of random bytes as a read-only disk and reads it whole. A: one VM
    is booted, reads it and is snapshotted; VMS clones are restored from the snapshot and read it
    again (from the snapshot's page cache, shared copy-on-write). B: VMS VMs are booted and each
    reads it into its own RAM. Reports the RSS and PSS each VM adds to this process (the VMs run
    in it) and its start time. The image needs sh and dd.

    With a Dockerfile (-f FILE, or a build CONTEXT) the Dockerfile is built first, and the VMs
    read the files the build made instead of a blob: A restores its clones from the build's
    snapshot of its VM after the last step that changed files (the files are in that VM's RAM),
    B cold-boots the built image (the files are on its squashfs root).
    """
    from supermachine import ui
    from supermachine.probes import density
    from supermachine.vm import VmConfig

    _check_plot(plot)
    if dockerfile is not None or context is not None:
        report = _density_of_build(
            ctx,
            vms,
            rootfs,
            image_ref,
            dockerfile,
            context,
            build_args,
            target,
            no_cache,
            read_paths,
            memory_mib,
        )
    else:
        if read_paths or build_args or target or no_cache:
            raise InputError(
                "--read, --build-arg, --target and --no-cache need a Dockerfile (-f FILE or CONTEXT)"
            )
        config = _density_config(rootfs, image_ref, VmConfig(memory_mib=memory_mib))
        with _steps(density.steps(vms)) as step:
            report = density.measure(config, vms=vms, blob_mib=blob_mib, step=step)
    if plot is not None:
        _save_figure(_density_figure(report), plot)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    _print_density(report)
    if plot is not None:
        ui.stdout.print(f"plot written to {plot}")


def _density_of_build(
    ctx: click.Context,
    vms: int,
    rootfs: Path | None,
    image_ref: str | None,
    dockerfile: Path | None,
    context: Path | None,
    build_args: tuple[str, ...],
    target: str | None,
    no_cache: bool,
    read_paths: tuple[str, ...],
    memory_mib: int,
) -> density.DensityReport:
    from supermachine.build.builder import BuildOptions
    from supermachine.cli.build import BuildPrinter, build_args_of
    from supermachine.probes import density

    if rootfs is not None or image_ref is not None:
        raise InputError("give a Dockerfile or --rootfs or --image, not more than one")
    if ctx.get_parameter_source("blob_mib") is not click.core.ParameterSource.DEFAULT:
        raise InputError("--blob-mib does not apply to a Dockerfile: the VMs read the files the build made")
    if context is None:
        assert dockerfile is not None
        context = dockerfile.parent
    options = BuildOptions(
        context=context,
        dockerfile=dockerfile,
        build_args=build_args_of(build_args),
        target=target,
        no_cache=no_cache,
        memory_mib=memory_mib,
    )
    with _steps(density.steps(vms)) as step:
        return density.measure_build(
            options,
            vms=vms,
            read=read_paths,
            reporter=BuildPrinter(False, output_to_stderr=True),
            step=step,
        )


def _density_config(rootfs: Path | None, image_ref: str | None, base: VmConfig) -> VmConfig:
    """``base`` with the root filesystem (and, for an image, its Env, WorkingDir and User)."""
    if rootfs is not None and image_ref is not None:
        raise InputError("give either --rootfs or --image, not both")
    if rootfs is not None:
        return replace(base, rootfs=rootfs)
    if image_ref is None:
        raise InputError("no root filesystem for the VMs: give --rootfs SQUASHFS or --image REF")
    from supermachine import ui
    from supermachine.image import Image
    from supermachine.oci.progress import RichProgress

    with RichProgress() if ui.stderr.is_terminal else contextlib.nullcontext() as progress:
        image = Image.from_oci(image_ref, progress=progress)
    return image.vm_config(base)


def _print_density(report: density.DensityReport) -> None:
    from rich.table import Table

    from supermachine import ui

    a, b = report.restore, report.boot
    table = Table(
        title=(
            f"host memory added per VM, each reading {report.reads} ({human_bytes(report.read_bytes)}) "
            f"({report.memory_mib} MiB guests): A = clones restored from one snapshot, B = cold boots"
        ),
        title_justify="left",
    )
    table.add_column("VM", justify="right")
    for col in ("A start", "A RSS", "A PSS", "B start", "B RSS", "B PSS"):
        table.add_column(col, justify="right")
    for i, (sa, sb) in enumerate(zip(a.samples, b.samples, strict=True), start=1):
        table.add_row(str(i), *_sample_cells(sa), *_sample_cells(sb))
    table.add_row(
        "mean",
        *_mean_cells(a),
        *_mean_cells(b),
        style="bold",
    )
    ui.stdout.print(table)
    ratio = report.pss_ratio
    verdict = "n/a" if ratio is None else f"{ratio:.1f}x"
    ui.stdout.print(
        f"PSS per VM: A {_signed_bytes(a.mean_pss_added)}, B {_signed_bytes(b.mean_pss_added)}: "
        f"a cold-booted VM costs {verdict} the host memory of a restored clone"
    )
    if a.marginal_pss_added is not None and b.marginal_pss_added is not None:
        ui.stdout.print(
            f"each VM after the first: A {_signed_bytes(a.marginal_pss_added)}, "
            f"B {_signed_bytes(b.marginal_pss_added)} (the first clone maps the shared pages)"
        )
    ui.stdout.print(
        f"[dim]A's snapshot: {_golden_text(report.golden)} (not counted above). start = until the "
        "guest agent answers; PSS shares each page among the VMs mapping it, RSS counts it in "
        "each.[/dim]"
    )


def _golden_text(golden: density.Golden) -> str:
    if golden.source == "build":
        return f"the build's, after its last step that changed files (build: {golden.seconds:.1f} s)"
    return f"VM booted in {golden.seconds:.1f} s, snapshotted in {golden.snapshot_seconds or 0:.2f} s"


def _sample_cells(sample: density.VmSample) -> tuple[str, str, str]:
    return (
        f"{sample.start_seconds:.2f} s",
        _signed_bytes(sample.rss_added),
        _signed_bytes(sample.pss_added),
    )


def _mean_cells(result: density.ModeResult) -> tuple[str, str, str]:
    return (
        f"{result.mean_start_seconds:.2f} s",
        _signed_bytes(result.mean_rss_added),
        _signed_bytes(result.mean_pss_added),
    )


def _signed_bytes(n: float) -> str:
    """Memory growth can be negative (the process freed something meanwhile)."""
    return "-" + human_bytes(-n) if n < 0 else human_bytes(n)


# -- progress and plots -----------------------------------------------------------------------------


@contextlib.contextmanager
def _steps(total: int) -> Iterator[mem_dedup.StepCallback]:
    """A step counter on stderr whose description names the step under way."""
    from supermachine import ui

    with ui.count_progress("starting", total) as bar:
        task = bar.task_ids[0]
        started = 0

        def step(description: str) -> None:
            nonlocal started
            bar.update(task, description=description, completed=started)
            started += 1

        yield step


def _check_plot(plot: Path | None) -> None:
    """Fails before any slow work if ``--plot`` cannot be honoured."""
    if plot is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'supermachine[plot]'") from None
    if not plot.parent.is_dir():
        raise InputError(f"--plot: directory {plot.parent} does not exist")


def _new_figure(width: float, height: float) -> Figure:
    # The Agg canvas draws without a display, and without pyplot's global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_figure(figure: Figure, path: Path) -> None:
    """Writes a PNG atomically: a temp file beside ``path``, renamed over it once complete."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            figure.savefig(f, format="png", dpi=120)
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _mem_dedup_figure(report: mem_dedup.MemDedupReport) -> Figure:
    """Grouped horizontal bars per snapshot: zero, differing and shared pages in percent."""
    rows = report.rows
    figure = _new_figure(8, 2 + 0.7 * len(rows))
    ax = figure.add_subplot()
    height = 0.27
    series = (
        ("zero", [r.zero_pct for r in rows], "tab:gray"),
        ("differ from golden (a diff stores)", [r.differ_pct for r in rows], "tab:red"),
        ("shared with golden", [r.shared_pct for r in rows], "tab:green"),
    )
    for k, (label, values, color) in enumerate(series):
        positions = [i + (k - 1) * height for i in range(len(rows))]
        bars = ax.barh(positions, values, height, label=label, color=color)
        # Diffs are often a fraction of a percent: the numbers say what the bars cannot show.
        ax.bar_label(bars, fmt="%.1f%%", padding=3, fontsize="x-small")
    names = [("sibling" if r.kind == "sibling" else Path(r.label).name) for r in rows]
    if names[0] != "golden":
        names[0] += "\n(golden)"
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 112)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("% of guest RAM pages (full logical RAM of each snapshot)")
    ax.set_title(f"RAM pages against the golden; over all snapshots {report.unique_pct:.1f}% are unique")
    figure.legend(loc="outside lower center", ncols=3, fontsize="small")
    ax.grid(axis="x", alpha=0.3)
    return figure


def _density_figure(report: density.DensityReport) -> Figure:
    """Cumulative host memory added against the number of VMs, PSS solid and RSS dashed."""
    from matplotlib.ticker import MaxNLocator

    figure = _new_figure(8, 5)
    ax = figure.add_subplot()
    x = list(range(report.vms + 1))
    for result, label, color in (
        (report.restore, "A: restored clones", "tab:blue"),
        (report.boot, "B: cold boots", "tab:orange"),
    ):
        for what, style, marker in (("pss", "-", "o"), ("rss", "--", "s")):
            values = [v / MiB for v in result.cumulative("pss" if what == "pss" else "rss")]
            ax.plot(
                x,
                values,
                style,
                marker=marker,
                markerfacecolor=color if what == "pss" else "none",
                color=color,
                label=f"{label}, {what.upper()}",
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("VMs")
    ax.set_ylabel("host memory added, cumulative (MiB)")
    read = f"{report.reads} ({human_bytes(report.read_bytes)})"
    ax.set_title(f"Host memory per VM: {report.memory_mib} MiB guests, each reading {read}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return figure
