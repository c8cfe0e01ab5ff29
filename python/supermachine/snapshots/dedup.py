"""On-disk dedup of snapshot RAM files with reflinks (XFS, btrfs).

A snapshot's ``memory.bin`` is stored against its golden (see :mod:`.golden`): the golden's RAM file
is cloned with ``ioctl(FICLONE)`` into a temp file beside the original, which then shares every
extent with the golden; only the pages that differ are written over it. The result is fsynced,
checked to hold the same content as the original and renamed over it: for a snapshot, the original
and the copy must both hash to the memory identity its ``vmstate.bin`` records (which names every
non-zero page of a full snapshot's RAM file, so equal identities mean equal files); for a plain
file, to the same blake3. Any failure leaves the original untouched and removes the temp file; a
run killed half-way leaves a temp file that the next run removes (under the store lock) before
doing anything else.

Space saved is measured from ``statvfs`` before and after: ``du`` cannot see shared extents.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from supermachine import _core, pages
from supermachine.errors import SnapshotError
from supermachine.snapshots import golden as golden_mod
from supermachine.snapshots import metadata

FICLONE = 0x40049409
"""``_IOW(0x94, 9, int)``: share all of the source file's extents with the destination."""
LOCK_FILE = ".dedup.lock"
TEMP_SUFFIX = ".dedup-tmp"
PAUSE_ENV = "_SUPERMACHINE_DEDUP_PAUSE_AT"
"""Test hook: name of a stage (``cloned``, ``writing``, ``written``, ``synced``, ``verified``,
``renamed``) at which dedup announces itself on stderr and sleeps, so a test can kill it there."""
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_COWEXTSIZE = 0x00010000
_FSXATTR = struct.Struct("=IIIII8x")
NO_REFLINK_MESSAGE = "filesystem does not support reflinks"
_NO_REFLINK_ERRNOS = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS, errno.EXDEV}
_MAX_RUN = 16 << 20

Status = Literal["deduped", "would-dedup", "no-golden", "no-reflink", "skipped", "failed"]


@dataclass
class DedupResult:
    snapshot: str
    golden: str | None
    status: Status
    message: str = ""
    ram_size: int = 0
    pages: int = 0
    differ_pages: int = 0
    bytes_written: int = 0
    """Bytes of differing pages written over the clone (would be written, for a dry run)."""
    bytes_saved: int = 0
    """Free space gained on the filesystem (``statvfs``); for a dry run, the estimate."""
    holes_punched: int = 0
    """Differing pages that are zero in the original, deallocated instead of written."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StoreReport:
    store: str
    dry_run: bool
    results: list[DedupResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """One line per snapshot directory that could not be opened, or golden candidate skipped."""
    stale_temps_removed: int = 0
    bytes_saved: int = 0
    """Free space gained over the whole run (``statvfs``); for a dry run, the sum of estimates."""

    @property
    def ok(self) -> bool:
        return not any(r.status in ("failed", "no-reflink") for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "dry_run": self.dry_run,
            "bytes_saved": self.bytes_saved,
            "stale_temps_removed": self.stale_temps_removed,
            "problems": self.problems,
            "results": [r.to_json() for r in self.results],
        }


def _pause(stage: str) -> None:
    if os.environ.get(PAUSE_ENV) == stage:
        sys.stderr.write(f"dedup: paused at {stage}\n")
        sys.stderr.flush()
        time.sleep(3600)


def free_bytes(path: str | os.PathLike[str], *, settle: float = 1.0) -> int:
    """Free bytes of the filesystem holding ``path``, after flushing it so delayed allocations are
    accounted, and once it stops changing (XFS frees an unlinked file's extents in the background,
    shortly after the unlink): up to ``settle`` seconds."""
    deadline = time.monotonic() + settle
    _syncfs(path)
    last = _statvfs_free(path)
    stable = 0
    while stable < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
        _syncfs(path)
        now = _statvfs_free(path)
        stable = stable + 1 if now == last else 0
        last = now
    return last


def _statvfs_free(path: str | os.PathLike[str]) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def _syncfs(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def differing_pages(a: pages.PageDigests, b: pages.PageDigests) -> list[int]:
    """Indexes of the pages whose digests differ at the same offset (same page count required)."""
    if a.page_count != b.page_count or a.algo != b.algo:
        raise ValueError("page digests of different lengths or algorithms")
    return [i for i in range(a.page_count) if a.digest(i) != b.digest(i)]


def page_runs(indexes: list[int], max_pages: int = _MAX_RUN // pages.PAGE_SIZE) -> Iterator[tuple[int, int]]:
    """Coalesce sorted page indexes into ``(first, count)`` runs of at most ``max_pages``."""
    start = count = 0
    for i in indexes:
        if count and i == start + count and count < max_pages:
            count += 1
            continue
        if count:
            yield start, count
        start, count = i, 1
    if count:
        yield start, count


def temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}{TEMP_SUFFIX}")


def remove_stale_temps(directory: str | os.PathLike[str]) -> int:
    """Remove temp files left by killed dedup runs in ``directory``. Call only under the store lock."""
    removed = 0
    for entry in Path(directory).glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed += 1
    return removed


@contextlib.contextmanager
def store_lock(store_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive lock on a snapshot store for dedup (waits for another dedup to finish)."""
    path = Path(store_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot open lock file: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _small_cow_extents(fd: int) -> None:
    """Ask XFS to copy-on-write shared extents one page at a time. Its default CoW extent size hint
    (32 blocks) reserves 128 KiB per scattered page written, held for up to half an hour, which
    would hide most of the space dedup saves. Other filesystems refuse or ignore this; that's fine."""
    try:
        raw = bytearray(fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(_FSXATTR.size)))
        xflags, extsize, nextents, projid, _cow = _FSXATTR.unpack(raw)
        attr = _FSXATTR.pack(xflags | FS_XFLAG_COWEXTSIZE, extsize, nextents, projid, pages.PAGE_SIZE)
        fcntl.ioctl(fd, FS_IOC_FSSETXATTR, attr)
    except OSError:
        pass


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _punch_hole(fd: int, offset: int, size: int) -> bool:
    """Deallocate a byte range (it then reads as zeros); ``False`` if the filesystem cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    return bool(libc.fallocate(fd, mode, offset, size) == 0)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _read_exact(fd: int, size: int, offset: int) -> bytes:
    chunks = []
    while size:
        data = os.pread(fd, size, offset)
        if not data:
            raise OSError(errno.EIO, f"unexpected end of file at offset {offset}")
        chunks.append(data)
        size -= len(data)
        offset += len(data)
    return b"".join(chunks)


def dedup_file(
    target: str | os.PathLike[str],
    golden: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    memory_id: str | None = None,
) -> DedupResult:
    """Store ``target`` as a reflink clone of ``golden`` plus its differing pages.

    Never raises for an expected failure: the result's status says what happened (``deduped``,
    ``would-dedup`` for a dry run, ``no-reflink``, ``failed``) and ``target`` is untouched unless
    the status is ``deduped``, in which case its content is byte-identical to before. Callers that
    share a store with other dedup runs should hold :func:`store_lock`.

    ``memory_id``: ``target`` is the ``memory.bin`` of a full snapshot whose ``vmstate.bin``
    records this memory identity (``_core.snapshot_info(dir)["memory_id"]``); the original and
    the copy must both hash to it. Without it they must have the same blake3.
    """
    target, golden = Path(target), Path(golden)
    result = DedupResult(str(target), str(golden), "failed")
    try:
        tst, gst = target.stat(), golden.stat()
    except OSError as exc:
        result.message = f"cannot stat {exc.filename}: {exc.strerror}"
        return result
    result.ram_size = tst.st_size
    if not (stat.S_ISREG(tst.st_mode) and stat.S_ISREG(gst.st_mode)):
        result.message = "RAM file or golden is not a regular file"
        return result
    if tst.st_size != gst.st_size:
        result.message = f"size mismatch: {tst.st_size} bytes vs golden's {gst.st_size}"
        return result
    if (tst.st_dev, tst.st_ino) == (gst.st_dev, gst.st_ino):
        result.message = "RAM file and golden are the same file"
        return result
    if tst.st_dev != gst.st_dev:
        result.status = "no-reflink"
        result.message = f"{NO_REFLINK_MESSAGE} across filesystems (golden is on another one)"
        return result

    try:
        target_digests = pages.digest_pages(target)
        diff = differing_pages(target_digests, pages.digest_pages(golden))
    except (OSError, ValueError) as exc:
        result.message = f"cannot hash pages: {exc}"
        return result
    result.pages = (tst.st_size + pages.PAGE_SIZE - 1) // pages.PAGE_SIZE
    result.differ_pages = len(diff)
    # Differing pages that are zero in the original become holes (snapshots are written sparse).
    zero = [i for i in diff if target_digests.is_zero_page(i)]
    runs = list(page_runs([i for i in diff if not target_digests.is_zero_page(i)]))
    zero_runs = list(page_runs(zero))
    to_write = sum(
        min(count * pages.PAGE_SIZE, tst.st_size - first * pages.PAGE_SIZE) for first, count in runs
    )

    directory = target.parent
    tmp = temp_path(target)
    before = 0 if dry_run else free_bytes(directory)
    fd = -1
    renamed = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(golden, "rb") as g:
            try:
                fcntl.ioctl(fd, FICLONE, g.fileno())
            except OSError as exc:
                if exc.errno in _NO_REFLINK_ERRNOS:
                    result.status = "no-reflink"
                    result.message = f"{NO_REFLINK_MESSAGE} ({os.strerror(exc.errno or 0)})"
                    return result
                raise
        _small_cow_extents(fd)
        _pause("cloned")
        if dry_run:
            result.status = "would-dedup"
            result.bytes_written = to_write
            result.bytes_saved = tst.st_size - to_write
            result.message = "dry run: reflinks work; nothing changed"
            return result

        src = os.open(target, os.O_RDONLY)
        try:
            for n, (first, count) in enumerate(runs):
                offset = first * pages.PAGE_SIZE
                size = min(count * pages.PAGE_SIZE, tst.st_size - offset)
                _write_all(fd, _read_exact(src, size, offset), offset)
                result.bytes_written += size
                if n == 0:
                    _pause("writing")
            for first, count in zero_runs:
                offset = first * pages.PAGE_SIZE
                size = min(count * pages.PAGE_SIZE, tst.st_size - offset)
                if _punch_hole(fd, offset, size):
                    result.holes_punched += count
                else:
                    _write_all(fd, bytes(size), offset)
                    result.bytes_written += size
        finally:
            os.close(src)
        _pause("written")
        os.fchmod(fd, stat.S_IMODE(tst.st_mode))
        if os.geteuid() == 0:
            os.fchown(fd, tst.st_uid, tst.st_gid)
        os.utime(fd, ns=(tst.st_atime_ns, tst.st_mtime_ns))
        os.fsync(fd)
        os.close(fd)
        fd = -1
        _pause("synced")

        if os.stat(tmp).st_size != tst.st_size:
            result.message = "size mismatch after writing the differing pages"
            return result
        if memory_id is not None:
            original_hash = _memory_id(target.parent, target)
            if original_hash != memory_id:
                result.message = "RAM file does not match the memory identity in its vmstate.bin (corrupt?)"
                return result
            copy_hash = _memory_id(target.parent, tmp)
        else:
            original_hash, copy_hash = metadata.blake3_file(target), metadata.blake3_file(tmp)
        if copy_hash != original_hash:
            result.message = "verification failed: the deduped copy differs from the original"
            return result
        _pause("verified")
        now = target.stat()
        if (now.st_ino, now.st_size, now.st_mtime_ns) != (tst.st_ino, tst.st_size, tst.st_mtime_ns):
            result.message = "RAM file changed while it was being deduped"
            return result
        os.replace(tmp, target)
        renamed = True
        metadata.fsync_dir(directory)
        _pause("renamed")
    except ValueError as exc:
        result.status = "failed"
        result.message = str(exc)
        return result
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        result.status = "failed"
        result.message = f"I/O error{where}: {exc.strerror or exc}"
        return result
    finally:
        if fd >= 0:
            os.close(fd)
        if not renamed:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    result.status = "deduped"
    result.bytes_saved = free_bytes(directory) - before
    return result


def _memory_id(snapshot_dir: Path, ram: Path) -> str:
    """The memory identity (as the VMM computes it, with the page bitmap and base of the
    snapshot's ``vmstate.bin``) of the file ``ram``. ``ValueError`` (one line) if it cannot."""
    fd = metadata.open_regular(ram)
    try:
        return _core.hash_snapshot_memory(snapshot_dir, fd)
    finally:
        os.close(fd)


def dedup_snapshot(
    snapshot: golden_mod.Snapshot,
    store_dir: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    snapshots: list[golden_mod.Snapshot] | None = None,
    verify_cache: dict[Path, str | None] | None = None,
    done: set[frozenset[str]] | None = None,
) -> tuple[DedupResult, list[str]]:
    """Dedup one snapshot against its golden in ``store_dir``; also the skipped-candidate lines.

    ``done`` holds the pairs of snapshot names already deduped against each other (in either
    direction); a pair found there is skipped, and a newly deduped pair is added."""
    if snapshot.is_diff:
        reason = "diff snapshot: its RAM file is not a full image"
        return DedupResult(snapshot.name, None, "skipped", reason, snapshot.ram_size), []
    choice = golden_mod.select_golden(store_dir, snapshot, snapshots=snapshots, verify_cache=verify_cache)
    if choice.golden is None:
        result = DedupResult(snapshot.name, None, "no-golden", "no compatible sibling snapshot")
        result.ram_size = snapshot.ram_size
        return result, choice.skipped
    pair = frozenset((snapshot.name, choice.golden.name))
    if done is not None and pair in done:
        reason = f"already shares pages with {choice.golden.name} (deduped the other way)"
        return DedupResult(snapshot.name, choice.golden.name, "skipped", reason, snapshot.ram_size), []
    memory_id = None if snapshot.info is None else snapshot.info["memory_id"]
    result = dedup_file(snapshot.ram_path, choice.golden.ram_path, dry_run=dry_run, memory_id=memory_id)
    result.snapshot = snapshot.name
    result.golden = choice.golden.name
    if done is not None and result.status in ("deduped", "would-dedup"):
        done.add(pair)
    return result, choice.skipped


def dedup_store(
    store_dir: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    progress: Callable[[str], object] | None = None,
) -> StoreReport:
    """Dedup every full snapshot of a store against its golden, under the store lock.

    A pair already deduped in this run (A against B, then B's golden is A) is not done twice.
    """
    store = Path(store_dir)
    if not store.is_dir():
        raise SnapshotError(f"{store}: no such snapshot store")
    report = StoreReport(str(store), dry_run)
    with store_lock(store):
        snapshots, report.problems = golden_mod.list_snapshots(store)
        if not dry_run:
            for entry in store.iterdir():
                if entry.is_dir():
                    report.stale_temps_removed += remove_stale_temps(entry)
        before = 0 if dry_run else free_bytes(store)
        verify_cache: dict[Path, str | None] = {}
        done: set[frozenset[str]] = set()
        for snap in snapshots:
            if progress is not None:
                progress(snap.name)
            result, skipped = dedup_snapshot(
                snap, store, dry_run=dry_run, snapshots=snapshots, verify_cache=verify_cache, done=done
            )
            for line in skipped:
                if line not in report.problems:
                    report.problems.append(line)
            report.results.append(result)
        if dry_run:
            report.bytes_saved = sum(r.bytes_saved for r in report.results)
        else:
            report.bytes_saved = free_bytes(store) - before
    return report


def auto_dedup(snapshot_dir: str | os.PathLike[str]) -> DedupResult | None:
    """Bake-time hook: store a fresh snapshot against its golden among its siblings, unless
    ``SUPERMACHINE_AUTO_DEDUP=0``. Returns ``None`` when disabled; never raises for a filesystem
    without reflinks (the result says ``no-reflink``)."""
    if not golden_mod.auto_dedup_enabled():
        return None
    snapshot = golden_mod.open_snapshot(snapshot_dir)
    store = snapshot.path.parent
    with store_lock(store):
        remove_stale_temps(snapshot.path)
        result, _skipped = dedup_snapshot(snapshot, store)
    return result
