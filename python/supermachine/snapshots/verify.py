"""Checking a snapshot's RAM file against the memory identity its VMM recorded, once per version.

The identity is the one the VMM computed while it wrote the pages and recorded in ``vmstate.bin``
(a 256-bit BLAKE3 digest, see ``rust/src/snapshot/memory.rs``); ``_core.hash_snapshot_memory``
computes it again from the file, the same way. ``metadata.json`` records no identity of its own.

Hashing ``memory.bin`` costs time linear in the RAM size; a restore should not. So a successful
check is recorded as the exact stat stamps of the files it covered: device, inode, size, mtime and
ctime in nanoseconds of ``memory.bin`` and of the ``vmstate.bin`` beside it (a diff's identity
covers the pages its bitmap there names). A later check that finds the same stamps skips the hash.
Any write, truncation, replacement or rename of a file changes its ctime, which no user can set, so
a record never vouches for content it did not see.

Records live in supermachine's cache, never in the snapshot directory: whoever can write a snapshot
directory could forge a record there. They are an optimisation: a missing, unreadable or damaged
record only means the file is hashed again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from supermachine import paths
from supermachine.errors import SnapshotError, SnapshotMetadataError
from supermachine.snapshots import metadata
from supermachine.snapshots.metadata import SnapshotMetadata

if TYPE_CHECKING:
    from supermachine import _core

log = logging.getLogger(__name__)

RECORDS_DIR = "verified-ram"
"""Directory under the cache holding one record per verified RAM file (device and inode)."""
RECORD_VERSION = 2
"""Records of version 1 held a blake3 of the file from ``metadata.json``; they are not read."""
MAX_RECORD_BYTES = 4096
MAX_BASE_CHAIN = 16
"""Most bases under one diff snapshot (the VMM refuses deeper chains as well)."""
STAMP_SETTLE_NS = 20_000_000
"""How long after a file's last change its stamp can vouch for its content: the kernel stamps
changes with a coarse clock (one tick, up to 10 ms), so a write in the same tick as the change
before it leaves the stamp as it was. A stamp taken sooner is never recorded (a check waits up to
this long for the file to settle before it hashes)."""


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of a file without reading it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @property
    def whole_seconds(self) -> bool:
        """Both times fall on whole seconds: likely a filesystem with coarse timestamps, where a
        stamp cannot tell two versions of a file apart within a second."""
        return self.mtime_ns % 1_000_000_000 == 0 and self.ctime_ns % 1_000_000_000 == 0


def records_dir() -> Path:
    return paths.cache_dir() / RECORDS_DIR


def _record_path(stamp: FileStamp) -> Path:
    return records_dir() / f"{stamp.dev:x}-{stamp.ino:x}.json"


def recorded_digest(stamp: FileStamp, state: FileStamp) -> str | None:
    """The memory identity recorded for exactly this version of ``memory.bin`` beside this
    version of its snapshot's ``vmstate.bin``, or ``None``."""
    path = _record_path(stamp)
    try:
        data = metadata.parse_json(metadata.read_capped(path, MAX_RECORD_BYTES), str(path))
    except SnapshotMetadataError:
        return None
    if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
        return None
    if data.get("stamp") != asdict(stamp) or data.get("state_stamp") != asdict(state):
        return None
    memory_id = data.get("memory_id")
    return memory_id if isinstance(memory_id, str) else None


def record(stamp: FileStamp, memory_id: str, path: str | os.PathLike[str], state: FileStamp) -> None:
    """Remember that the version ``stamp`` of ``memory.bin`` (at ``path``), beside the version
    ``state`` of its ``vmstate.bin``, holds the memory whose identity is ``memory_id``. Written
    atomically; a failure is logged and otherwise ignored (the next check hashes again)."""
    if stamp.whole_seconds or state.whole_seconds:
        return
    directory = records_dir()
    entry = {
        "version": RECORD_VERSION,
        "stamp": asdict(stamp),
        "state_stamp": asdict(state),
        "memory_id": memory_id,
        "path": os.fspath(path),
    }
    payload = json.dumps(entry).encode()
    tmp = None
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".record-", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, _record_path(stamp))
        tmp = None
    except OSError as exc:
        log.warning("cannot record the verification of %s: %s", path, exc.strerror or exc)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _settled_stamp(fd: int) -> tuple[FileStamp, bool]:
    """The file's stamp, and whether it is settled: taken when the file's last change was at least
    :data:`STAMP_SETTLE_NS` old, so any later write changes it. Waits at most that long."""
    for _attempt in range(2):
        taken_at = time.time_ns()
        stamp = FileStamp.of(os.fstat(fd))
        wait_ns = stamp.ctime_ns + STAMP_SETTLE_NS - taken_at
        if wait_ns <= 0:
            return stamp, True
        if wait_ns > STAMP_SETTLE_NS:
            break  # changed "in the future": the clock was set back; trust no stamp of it
        time.sleep(wait_ns / 1e9)
    return stamp, False


@contextlib.contextmanager
def _open_ram(ram: Path) -> Iterator[int]:
    """The RAM file opened read-only (a regular file only), its read errors as one
    :class:`SnapshotError` line naming it; closed on exit."""
    try:
        fd = metadata.open_regular(ram)
    except OSError as exc:
        raise SnapshotError(f"{ram}: cannot read RAM file: {exc.strerror or exc}") from None
    try:
        yield fd
    except OSError as exc:
        raise SnapshotError(f"{ram}: cannot read RAM file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def snapshot_info(directory: Path) -> _core.SnapshotInfo:
    """The VMM's record of a snapshot (its checked ``vmstate.bin``), problems as one
    :class:`SnapshotError` line."""
    from supermachine import _core

    try:
        return _core.snapshot_info(str(directory))
    except (OSError, ValueError) as exc:
        raise SnapshotError(str(exc)) from None


def check_ram(
    snapshot_dir: str | os.PathLike[str],
    meta: SnapshotMetadata | None = None,
    base: str | os.PathLike[str] | None = None,
) -> None:
    """Raise :class:`SnapshotError` (one line) unless the RAM file of the snapshot in
    ``snapshot_dir`` and, for a diff, of every base under it hold the memory their VMM recorded
    (the ``memory_id`` in each ``vmstate.bin``, see :func:`check_memory`), and each base is the
    one its diff was taken against (the identity the diff's ``vmstate.bin`` records for it).

    ``base`` is the caller's choice of the first base; every other base is the sibling its diff's
    ``vmstate.bin`` names (``../NAME``: never an absolute path, deeper, or a symlink, see
    :func:`attach.recorded_base`). ``meta`` is not consulted: ``metadata.json`` records no RAM
    identity of its own."""
    from supermachine.snapshots import attach

    del meta
    directory = Path(snapshot_dir)
    info = snapshot_info(directory)
    for level in range(MAX_BASE_CHAIN + 1):
        check_memory(directory, info["memory_id"])
        recorded = info["base"]
        if recorded is None:
            return
        if level == 0 and base is not None:
            base_dir = Path(base)
        else:
            base_dir = attach.recorded_base(directory, recorded["path"])
        base_info = snapshot_info(base_dir)
        if base_info["memory_id"] != recorded["memory_id"]:
            raise SnapshotError(
                f"{base_dir}: this base's RAM is not the one {directory} was taken against"
                " (the base changed since)"
            )
        directory, info = base_dir, base_info
    raise SnapshotError(f"{snapshot_dir}: the chain of bases is deeper than {MAX_BASE_CHAIN} snapshots")


def _state_stamp(directory: Path) -> FileStamp:
    """The stamp of a snapshot's ``vmstate.bin``: a diff's identity covers only the pages its
    bitmap there names, so a record of ``memory.bin`` vouches only together with that file."""
    try:
        fd = metadata.open_regular(directory / metadata.VMSTATE_FILE)
    except OSError as exc:
        raise SnapshotError(
            f"{directory / metadata.VMSTATE_FILE}: cannot read: {exc.strerror or exc}"
        ) from None
    try:
        return FileStamp.of(os.fstat(fd))
    finally:
        os.close(fd)


def check_memory(snapshot_dir: str | os.PathLike[str], memory_id: str) -> None:
    """Raise :class:`SnapshotError` (one line naming the file) unless the ``memory.bin`` of the
    snapshot in ``snapshot_dir`` holds the memory whose identity its VMM recorded as
    ``memory_id`` (``_core.snapshot_info(dir)["memory_id"]``). Hashes (in Rust, the way the VMM
    does) only if no record vouches for the file and its ``vmstate.bin`` as they are now, and
    records a successful hash."""
    from supermachine import _core

    directory = Path(snapshot_dir)
    ram = directory / metadata.MEMORY_FILE
    state = _state_stamp(directory)
    with _open_ram(ram) as fd:
        if recorded_digest(FileStamp.of(os.fstat(fd)), state) == memory_id:
            return
        before, settled = _settled_stamp(fd)
        try:
            found = _core.hash_snapshot_memory(directory, fd)
        except ValueError as exc:
            raise SnapshotError(str(exc)) from None
        if FileStamp.of(os.fstat(fd)) != before:
            raise SnapshotError(f"{ram}: changed while it was being hashed")
    if found != memory_id:
        raise SnapshotError(
            f"{ram}: content does not match the memory identity in its {metadata.VMSTATE_FILE} (corrupt?)"
        )
    if settled and _state_stamp(directory) == state:
        record(before, found, ram, state)


def record_written(snapshot_dir: str | os.PathLike[str], memory_id: str) -> None:
    """Remember that the snapshot the VMM just wrote into ``snapshot_dir`` holds the memory whose
    identity it reported (``memory_id``, computed while it wrote the pages), so its first restore
    does not hash it again. Records nothing if the files changed too recently to tell."""
    directory = Path(snapshot_dir)
    ram = directory / metadata.MEMORY_FILE
    try:
        state = _state_stamp(directory)
        with _open_ram(ram) as fd:
            stamp, settled = _settled_stamp(fd)
    except SnapshotError as exc:
        log.warning("cannot record the snapshot %s: %s", directory, exc)
        return
    if settled and _state_stamp(directory) == state:
        record(stamp, memory_id, ram, state)


def prune_records() -> int:
    """Remove records whose file no longer exists as recorded; returns how many."""
    removed = 0
    directory = records_dir()
    if not directory.is_dir():
        return 0
    for entry in directory.iterdir():
        if entry.name.startswith(".record-") or _stale(entry):
            with contextlib.suppress(OSError):
                entry.unlink()
                removed += 1
    return removed


def _stale(entry: Path) -> bool:
    try:
        data = metadata.parse_json(metadata.read_capped(entry, MAX_RECORD_BYTES), str(entry))
        if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
            return True
        if not isinstance(data.get("path"), str):
            return True
        st = os.stat(data["path"], follow_symlinks=False)
    except (SnapshotMetadataError, OSError, ValueError):
        return True
    return bool(data.get("stamp") != asdict(FileStamp.of(st)))


__all__ = [
    "FileStamp",
    "check_memory",
    "check_ram",
    "prune_records",
    "record",
    "record_written",
    "records_dir",
    "snapshot_info",
]
