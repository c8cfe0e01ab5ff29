"""Publishing snapshot directories atomically, one writer per name.

A snapshot named ``NAME`` in directory ``P`` (usually the store) is written into the hidden sibling
``P/.NAME.snapshot-partial`` and renamed to ``P/NAME`` as the very last step, so nobody ever sees a
half-written snapshot under its name, whenever its writer dies. The writer holds an ``flock`` on
``P/.NAME.snapshot-lock`` from before it boots the VM until after the rename: a second writer of
the same name fails at once instead of after a boot, and a partial directory whose lock is free was
left by a writer that died. The next writer of that name removes it, and
:func:`prune_store` (``supermachine prune``) removes every such leftover in the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from supermachine.errors import SnapshotBusyError, SnapshotError
from supermachine.snapshots import metadata

LOCK_SUFFIX = ".snapshot-lock"
PARTIAL_SUFFIX = ".snapshot-partial"
MAX_NAME_LENGTH = 200
"""Longest snapshot directory name: its partial and lock siblings must fit in 255 bytes."""
_LOCK_ATTEMPTS = 8
_MAX_DEBRIS_ENTRIES = 16
_DEBRIS_NAMES = re.compile(
    r"(memory\.bin|vmstate\.bin"  # the VMM's files, renamed into place before the metadata
    r"|\.(memory|vmstate)\.bin\.tmp-\d+"  # the VMM's temporary files
    r"|\.metadata\.json\..+\.tmp"  # a metadata temporary file
    r"|\.memory\.bin\.\d+\.dedup-tmp)"  # a dedup temporary file
)
"""Files an interrupted snapshot writer (of any supermachine version) can leave in a directory."""

_registry_lock = threading.Lock()
_held: dict[str, tuple[int, int]] = {}
"""Name locks this process holds: absolute target path -> (owning thread, re-entry depth)."""


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def partial_path(target: Path) -> Path:
    return target.parent / f".{target.name}{PARTIAL_SUFFIX}"


def check_name(name: str) -> str:
    """``name`` if it can name a snapshot directory: one visible path component of at most
    :data:`MAX_NAME_LENGTH` bytes. Raises :class:`SnapshotError` otherwise."""
    if not name or "/" in name or "\0" in name or name.startswith("."):
        raise SnapshotError(f"{name!r} cannot name a snapshot: one path component, not starting with '.'")
    if len(os.fsencode(name)) > MAX_NAME_LENGTH:
        raise SnapshotError(f"snapshot name is longer than {MAX_NAME_LENGTH} bytes: {name[:40]!r}...")
    return name


def _busy(target: Path) -> SnapshotBusyError:
    return SnapshotBusyError(
        f"{target}: another process is writing a snapshot of this name (it holds {lock_path(target)})"
    )


@contextlib.contextmanager
def name_lock(target: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the write lock of the snapshot name ``target`` (a directory path; its parent is created
    if missing), or raise :class:`SnapshotBusyError` at once if another process or thread holds it.
    Re-entrant within one thread, so a command can take it before booting and the bake again."""
    path = Path(os.path.abspath(target))
    check_name(path.name)
    key = str(path)
    me = threading.get_ident()
    with _registry_lock:
        owner = _held.get(key)
        if owner is not None and owner[0] != me:
            raise _busy(path)
        if owner is not None:
            _held[key] = (me, owner[1] + 1)
    if owner is not None:
        try:
            yield
        finally:
            with _registry_lock:
                _held[key] = (me, _held[key][1] - 1)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SnapshotError(f"{path.parent}: cannot create the directory: {exc.strerror or exc}") from None
    fd = _acquire(lock_path(path))
    if fd is None:
        raise _busy(path)
    with _registry_lock:
        _held[key] = (me, 1)
    try:
        yield
    finally:
        with _registry_lock:
            del _held[key]
        _release(fd, lock_path(path))


def _acquire(path: Path) -> int | None:
    """An exclusive ``flock`` on the lock file ``path`` (created if missing), or ``None`` if
    another holder has it. The previous holder unlinks the file when it lets go, so the lock is
    ours only if ``path`` still names the file we locked."""
    for _attempt in range(_LOCK_ATTEMPTS):
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise SnapshotError(f"{path}: cannot open the lock file: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SnapshotError(f"{path}: the lock file is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            with contextlib.suppress(FileNotFoundError):
                now = os.stat(path, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise SnapshotError(f"{path}: cannot take the lock (the lock file keeps being replaced)")


def _release(fd: int, path: Path) -> None:
    """Unlink the lock file while still holding it (so it does not pile up), then let go."""
    try:
        with contextlib.suppress(OSError):
            now, mine = os.stat(path, follow_symlinks=False), os.fstat(fd)
            if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(path)
    finally:
        os.close(fd)


def is_debris(directory: Path) -> bool:
    """Whether ``directory`` holds nothing but what an interrupted snapshot writer leaves: no
    ``metadata.json`` and only regular files named like the VMM's and supermachine's files."""
    try:
        with os.scandir(directory) as entries:
            for count, entry in enumerate(entries):
                if count >= _MAX_DEBRIS_ENTRIES or not entry.is_file(follow_symlinks=False):
                    return False
                if not _DEBRIS_NAMES.fullmatch(entry.name):
                    return False
    except OSError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def prepare(target: Path) -> Path:
    """Under :func:`name_lock`: check that ``target`` can receive a snapshot, remove what a dead
    writer of that name left, and return a fresh, empty partial directory to write into."""
    check_name(target.name)
    if os.path.lexists(target / metadata.METADATA_FILE):
        raise SnapshotError(f"{target} already holds a snapshot; remove it or choose another name")
    partial = partial_path(target)
    try:
        if os.path.lexists(target):
            if target.is_symlink() or not target.is_dir():
                raise SnapshotError(f"{target} exists and is not a directory")
            if any(target.iterdir()):
                if not is_debris(target):
                    raise SnapshotError(f"{target} is not empty and holds no snapshot; choose another name")
                shutil.rmtree(target)  # an interrupted write of an older supermachine version
        if os.path.lexists(partial):
            _remove(partial)
        partial.mkdir()
    except OSError as exc:
        raise SnapshotError(f"{target}: cannot prepare the snapshot: {exc.strerror or exc}") from None
    return partial


def publish(partial: Path, target: Path) -> None:
    """Rename the complete snapshot in ``partial`` to ``target`` (which must be missing or an
    empty directory) and make the rename durable."""
    try:
        os.rename(partial, target)
    except OSError as exc:
        raise SnapshotError(f"{target}: cannot publish the snapshot: {exc.strerror or exc}") from None
    metadata.fsync_dir(target.parent)


def discard(partial: Path) -> None:
    """Remove a partial directory after a failed write (best effort: the next writer of the name
    or :func:`prune_store` removes whatever is left)."""
    with contextlib.suppress(OSError):
        _remove(partial)


@dataclass
class PruneResult:
    partial: int = 0
    """Partial directories of dead writers removed."""
    incomplete: int = 0
    """Visible directories an interrupted write of an older version left, removed."""
    locks: int = 0
    """Lock files of dead writers removed."""
    records: int = 0
    """Verification records of RAM files that are gone or changed, removed."""


def prune_store(store: str | os.PathLike[str]) -> PruneResult:
    """Remove what interrupted snapshot writers left in ``store``; snapshots being written (their
    name lock is held) are left alone."""
    from supermachine.snapshots import verify

    result = PruneResult(records=verify.prune_records())
    directory = Path(store)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return result
    except OSError as exc:
        raise SnapshotError(f"{directory}: cannot list snapshot store: {exc.strerror or exc}") from None
    for name in names:
        with contextlib.suppress(SnapshotBusyError):
            _prune_entry(directory, name, result)
    return result


def _prune_entry(store: Path, name: str, result: PruneResult) -> None:
    path = store / name
    for suffix in (PARTIAL_SUFFIX, LOCK_SUFFIX):
        if name.startswith(".") and name.endswith(suffix) and len(name) > len(suffix) + 1:
            target = store / name[1 : -len(suffix)]
            with contextlib.suppress(SnapshotError):
                check_name(target.name)
                with name_lock(target):
                    if suffix == PARTIAL_SUFFIX and os.path.lexists(path):
                        _remove(path)
                        result.partial += 1
                    elif suffix == LOCK_SUFFIX:
                        result.locks += 1  # released below: the release unlinks it
            return
    if name.startswith(".") or not path.is_dir() or path.is_symlink():
        return
    if os.path.lexists(path / metadata.METADATA_FILE) or not is_debris(path):
        return
    with name_lock(path):
        if is_debris(path) and not os.path.lexists(path / metadata.METADATA_FILE):
            shutil.rmtree(path)
            result.incomplete += 1


__all__ = [
    "LOCK_SUFFIX",
    "MAX_NAME_LENGTH",
    "PARTIAL_SUFFIX",
    "PruneResult",
    "check_name",
    "discard",
    "is_debris",
    "name_lock",
    "prepare",
    "prune_store",
    "publish",
]
