"""Golden-base selection: which sibling snapshot a fresh snapshot's RAM file is stored against.

The golden of a snapshot is the newest *other* full snapshot in the same store that was baked from
the same image (config digest), with the same memory size, by the same supermachine version.
Candidates whose RAM file does not hold the memory their VMM recorded (the
memory identity in ``vmstate.bin``) are skipped with a warning: sharing extents with a corrupt file
would spread the damage.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from supermachine.errors import SnapshotError, SnapshotMetadataError
from supermachine.snapshots import metadata, publish, verify
from supermachine.snapshots.metadata import SnapshotMetadata

if TYPE_CHECKING:
    from supermachine import _core

log = logging.getLogger(__name__)

AUTO_DEDUP_ENV = "SUPERMACHINE_AUTO_DEDUP"
_FALSE = {"0", "false", "no", "off"}


def auto_dedup_enabled() -> bool:
    """Whether a bake stores its RAM file against a golden automatically.

    On unless ``SUPERMACHINE_AUTO_DEDUP`` is ``0`` (or ``false``, ``no``, ``off``).
    """
    return os.environ.get(AUTO_DEDUP_ENV, "1").strip().lower() not in _FALSE


@dataclass(frozen=True)
class Snapshot:
    """A snapshot directory in a store, with its metadata and the VMM's record of it."""

    path: Path
    meta: SnapshotMetadata
    mtime_ns: int
    """``st_mtime_ns`` of ``memory.bin`` (tie-break and fallback ordering)."""
    info: _core.SnapshotInfo | None = None
    """What its ``vmstate.bin`` records (``_core.snapshot_info``): RAM size, memory identity, base.
    ``None`` for a snapshot not written yet (a bake choosing its base): a full one."""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ram_path(self) -> Path:
        return self.path / metadata.MEMORY_FILE

    @property
    def is_diff(self) -> bool:
        return self.base is not None

    @property
    def base(self) -> str | None:
        """The base a diff was taken against, as its VM state records it (a sibling by its
        directory name, see :func:`.attach.base_name`), or ``None`` for a full snapshot."""
        from supermachine.snapshots import attach

        return None if self.info is None else attach.base_name(self.info)

    @property
    def ram_size(self) -> int:
        """Bytes of guest RAM (the size of ``memory.bin``), as the VM state records it."""
        return self.meta.memory_mib << 20 if self.info is None else self.info["memory_size"]

    def order_key(self) -> tuple[float, int, str]:
        """Newest last: created time (sub-second), then the RAM file's mtime in ns, then the name."""
        created = self.meta.created if self.meta.created > 0 else self.mtime_ns / 1e9
        return (created, self.mtime_ns, self.name)


@dataclass
class GoldenChoice:
    golden: Snapshot | None
    skipped: list[str] = field(default_factory=list)
    """One line per candidate that matched but was rejected (corrupt, unreadable)."""


def open_snapshot(snapshot_dir: str | os.PathLike[str]) -> Snapshot:
    """Load a snapshot directory: metadata, VM state record and RAM file stat. Raises
    :class:`SnapshotError` (one line)."""
    path = Path(snapshot_dir)
    meta = metadata.load(path)
    info = verify.snapshot_info(path)
    ram = path / metadata.MEMORY_FILE
    try:
        st = ram.stat()
    except OSError as exc:
        raise SnapshotError(f"{ram}: cannot stat RAM file: {exc.strerror or exc}") from None
    return Snapshot(path, meta, st.st_mtime_ns, info)


def list_snapshots(store_dir: str | os.PathLike[str]) -> tuple[list[Snapshot], list[str]]:
    """Every snapshot directory directly under ``store_dir`` (oldest first), and one line per
    directory that looks like a snapshot but cannot be opened: a broken snapshot is reported and
    skipped, never fatal to the store. Hidden entries (partial snapshots being written, locks)
    are not snapshots."""
    store = Path(store_dir)
    try:
        entries = sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise SnapshotError(f"{store}: cannot list snapshot store: {exc.strerror or exc}") from None
    found: list[Snapshot] = []
    problems: list[str] = []
    for entry in entries:
        has_meta = os.path.lexists(entry / metadata.METADATA_FILE)
        if not has_meta and not os.path.lexists(entry / metadata.MEMORY_FILE):
            continue
        if not has_meta and publish.is_debris(entry):
            problems.append(
                f"{entry}: incomplete snapshot left by an interrupted write; `supermachine prune` removes it"
            )
            continue
        try:
            found.append(open_snapshot(entry))
        except SnapshotError as exc:
            problems.append(str(exc))
    found.sort(key=Snapshot.order_key)
    return found, problems


def compatible(fresh: SnapshotMetadata, candidate: SnapshotMetadata) -> bool:
    """Same image content, memory size and baking version. (The RAM size of a snapshot is the
    VM's: a candidate whose VM state records another one fails its RAM check.)"""
    return (
        candidate.image.config_digest == fresh.image.config_digest
        and candidate.memory_mib == fresh.memory_mib
        and candidate.baked_by_version == fresh.baked_by_version
    )


def verify_ram(snapshot: Snapshot) -> str | None:
    """``None`` if the snapshot's RAM file holds the memory its VMM recorded (see
    :func:`.verify.check_ram`), else why not. A file verified before and unchanged since is not
    hashed again (see :mod:`.verify`)."""
    try:
        verify.check_ram(snapshot.path)
    except SnapshotError as exc:
        return str(exc)
    return None


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return a.resolve() == b.resolve()


def select_golden(
    store_dir: str | os.PathLike[str],
    fresh: str | os.PathLike[str] | Snapshot,
    *,
    verify: bool = True,
    snapshots: list[Snapshot] | None = None,
    verify_cache: dict[Path, str | None] | None = None,
) -> GoldenChoice:
    """The golden base for ``fresh`` among the snapshots of ``store_dir``, or ``None`` in
    :attr:`GoldenChoice.golden` if no sibling qualifies.

    Diff snapshots (those with a ``base``) are never goldens: their RAM file is not a full image.
    With ``verify`` each candidate's RAM file is checked against the memory identity in its
    ``vmstate.bin`` before it is chosen; mismatching candidates are skipped with a warning and the
    next newest is tried.
    ``verify_cache`` (RAM file path -> problem or ``None``) saves re-hashing over many calls.
    """
    fresh_snap = fresh if isinstance(fresh, Snapshot) else open_snapshot(fresh)
    if snapshots is None:
        snapshots, _problems = list_snapshots(store_dir)
    candidates = [
        s
        for s in snapshots
        if not s.is_diff and not _same_dir(s.path, fresh_snap.path) and compatible(fresh_snap.meta, s.meta)
    ]
    candidates.sort(key=Snapshot.order_key, reverse=True)
    choice = GoldenChoice(None)
    for candidate in candidates:
        problem = None
        if verify:
            if verify_cache is None:
                problem = verify_ram(candidate)
            else:
                if candidate.ram_path not in verify_cache:
                    verify_cache[candidate.ram_path] = verify_ram(candidate)
                problem = verify_cache[candidate.ram_path]
        if problem is None:
            choice.golden = candidate
            break
        line = f"skipping golden candidate {candidate.name}: {problem}"
        log.warning(line)
        choice.skipped.append(line)
    return choice


__all__ = [
    "AUTO_DEDUP_ENV",
    "GoldenChoice",
    "Snapshot",
    "SnapshotMetadataError",
    "auto_dedup_enabled",
    "compatible",
    "list_snapshots",
    "open_snapshot",
    "select_golden",
    "verify_ram",
]
