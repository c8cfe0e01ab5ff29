"""How much guest RAM snapshots of one image share, by their full logical RAM.

A diff snapshot's ``memory.bin`` holds only the pages that differ from its base, so comparing the
files on disk would compare a diff with a full image. Instead each snapshot is restored and written
again as a *full* snapshot into a temporary directory; those RAM files are compared page by page
(:mod:`.page_overlap`), the first snapshot being the golden. A "same-image sibling" is added: the
first snapshot restored a second time, a small command run in it, then snapshotted in full. Its
difference from the golden is what a diff of a freshly used clone would store.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from supermachine import pages
from supermachine.errors import InputError, SnapshotError
from supermachine.probes import page_overlap
from supermachine.probes.page_overlap import PageShares, UniquePages
from supermachine.snapshots import metadata

SIBLING_COMMAND: tuple[str, ...] = ("sh", "-c", "echo sibling > /tmp/x")
COMMAND_TIMEOUT = 120.0

RowKind = Literal["full", "diff", "sibling"]
StepCallback = Callable[[str], object]
"""Called as each step of the measurement starts, with what it does."""


@dataclass(frozen=True)
class Source:
    """A snapshot directory given to the probe, checked before any VM is restored."""

    path: Path
    """As given on the command line (it labels the row)."""
    base: str | None
    stored_bytes: int
    """Disk space ``memory.bin`` takes (allocated blocks: holes and a diff's absent pages are free)."""


@dataclass(frozen=True)
class SnapshotRow(PageShares):
    label: str
    kind: RowKind
    base: str | None
    stored_bytes: int | None
    """As :attr:`Source.stored_bytes`; ``None`` for the sibling, which is not kept."""
    restore_seconds: float
    pages: int
    zero_pages: int
    same_as_golden: int
    differ_from_golden: int

    def to_json(self) -> dict[str, object]:
        return {
            "label": self.label,
            "kind": self.kind,
            "base": self.base,
            "stored_bytes": self.stored_bytes,
            "restore_seconds": self.restore_seconds,
            **self.shares_json(),
        }


@dataclass(frozen=True)
class MemDedupReport(UniquePages):
    algo: str
    rows: list[SnapshotRow]
    total_pages: int
    unique_pages: int

    @property
    def golden(self) -> str:
        return self.rows[0].label

    def to_json(self) -> dict[str, object]:
        return {
            "algo": self.algo,
            "page_size": pages.PAGE_SIZE,
            "golden": self.golden,
            "rows": [row.to_json() for row in self.rows],
            **self.unique_json(),
        }


def open_source(directory: Path) -> Source:
    """Checks a snapshot directory (metadata, VM state, RAM file) without restoring it.
    Raises :class:`SnapshotError` (one line) for anything that is not a usable snapshot."""
    from supermachine.image import Image

    if not directory.is_dir():
        raise InputError(f"{directory} is not a directory (expected a snapshot directory)")
    image = Image.from_snapshot(directory)
    ram = directory / metadata.MEMORY_FILE
    try:
        stored = ram.stat().st_blocks * 512
    except OSError as exc:
        raise SnapshotError(f"{ram}: cannot stat RAM file: {exc.strerror or exc}") from None
    base = image.snapshot_base
    return Source(directory, base, stored)


def steps(snapshots: int, sibling: bool) -> int:
    """How many times :func:`measure` reports a step: one per restore, one for the comparison."""
    return snapshots + int(sibling) + 1


def measure(
    snapshot_dirs: Sequence[Path],
    *,
    algo: pages.HashAlgo = "xxh3",
    sibling: bool = True,
    threads: int | None = None,
    workdir: Path | None = None,
    step: StepCallback | None = None,
    rootfs: Path | None = None,
) -> MemDedupReport:
    """Restores each snapshot, writes its full RAM to a temporary directory (under ``workdir``,
    default ``$TMPDIR``), adds the sibling of the first unless ``sibling`` is false, and compares
    the RAM files with the first as the golden. The temporary files are removed in every case.

    ``rootfs`` is the root filesystem image of snapshots taken of VMs booted on a bare root
    filesystem (a restore never opens the path a snapshot records); snapshots of OCI images find
    theirs in the image cache."""
    if not snapshot_dirs:
        raise InputError("no snapshot directories given")
    sources = [open_source(Path(d)) for d in snapshot_dirs]  # fail before any slow work
    notify: StepCallback = step or (lambda _description: None)
    with tempfile.TemporaryDirectory(prefix="supermachine-mem-dedup-", dir=workdir) as tmp:
        rams: list[Path] = []
        seconds: list[float] = []
        for i, source in enumerate(sources):
            notify(f"restoring {source.path.name} and writing its full RAM")
            ram, restore_seconds = full_ram(source.path, Path(tmp) / str(i), rootfs=rootfs)
            rams.append(ram)
            seconds.append(restore_seconds)
        if sibling:
            notify(f"restoring a sibling of {sources[0].path.name}")
            ram, restore_seconds = full_ram(
                sources[0].path, Path(tmp) / "sibling", SIBLING_COMMAND, rootfs=rootfs
            )
            rams.append(ram)
            seconds.append(restore_seconds)
        notify("hashing and comparing pages")
        overlap = page_overlap.compare_images(rams, algo=algo, threads=threads)
    return _report(sources, seconds, overlap)


def full_ram(
    snapshot_dir: Path,
    target: Path,
    command: Sequence[str] | None = None,
    *,
    rootfs: Path | None = None,
) -> tuple[Path, float]:
    """Restores ``snapshot_dir`` (on ``rootfs`` if given), runs ``command`` in it if given, writes a
    full snapshot to ``target`` and stops the VM. Returns the full RAM file and the restore time."""
    from supermachine.vm import Vm

    with Vm.restore(snapshot_dir, rootfs=rootfs) as vm:
        if command is not None:
            vm.exec(list(command), timeout=COMMAND_TIMEOUT, check=True)
        # base=None: a full RAM image whatever goldens sit beside the target.
        vm.snapshot(target, base=None)
        restore_seconds = vm.restore_seconds or 0.0
    return target / metadata.MEMORY_FILE, restore_seconds


def _report(
    sources: Sequence[Source], seconds: Sequence[float], overlap: page_overlap.OverlapReport
) -> MemDedupReport:
    """One row per source in order, then the sibling's row if there is one."""
    rows: list[SnapshotRow] = []
    for i, image_row in enumerate(overlap.images):
        if i < len(sources):
            source = sources[i]
            label = os.fspath(source.path)
            kind: RowKind = "full" if source.base is None else "diff"
            base, stored = source.base, source.stored_bytes
        else:
            label, kind, base, stored = f"sibling of {os.fspath(sources[0].path)}", "sibling", None, None
        rows.append(
            SnapshotRow(
                label=label,
                kind=kind,
                base=base,
                stored_bytes=stored,
                restore_seconds=seconds[i],
                pages=image_row.pages,
                zero_pages=image_row.zero_pages,
                same_as_golden=image_row.same_as_golden,
                differ_from_golden=image_row.differ_from_golden,
            )
        )
    return MemDedupReport(overlap.algo, rows, overlap.total_pages, overlap.unique_pages)
