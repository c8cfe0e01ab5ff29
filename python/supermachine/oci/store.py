"""The local image cache: a content-addressed blob store plus an index of pulled images.

Layout under :func:`supermachine.paths.cache_dir`::

    blobs/sha256/<hex>          verified blobs (manifests, configs, layers), shared by all images
    blobs/sha256/<hex>.partial  a download in progress (resumable), guarded by locks/<hex>.lock
    images.json                 ref -> manifest digest, config digest, layers (written atomically)
    rootfs/<config hex>.squashfs
    tmp/                        (0700) root filesystem trees being built; private to the owner
    locks/                      flock(2) files

A blob only ever appears under its digest name by rename after its content was verified and
fsynced, so a killed process leaves at most a ``.partial`` file. Content that rots on disk later
is caught when it is read (manifests, configs), pulled again (every blob) or applied (layers):
the blob is discarded and fetched again rather than trusted.

Concurrency: every writer of a blob holds that blob's lock, so two pulls of the same image share the
work instead of corrupting each other. Pulls and builds hold the store lock shared; ``prune`` and
``rmi`` hold it exclusively, so nothing is deleted while another process may still need it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal

from supermachine import paths
from supermachine.errors import (
    CacheWriteError,
    CorruptBlobError,
    DigestMismatchError,
    ImageNotFoundError,
    ImageReferenceError,
    InputError,
)
from supermachine.oci.reference import Reference, validate_digest

_HEX = re.compile(r"[a-f0-9]{64}")
INDEX_VERSION = 1
_log = logging.getLogger(__name__)

CachedState = Literal["missing", "valid", "discarded"]


def _write_error(exc: OSError, what: str, path: Path) -> CacheWriteError:
    """One line naming what was being written, where, and why it failed (e.g. a full disk)."""
    return CacheWriteError(f"cannot write {what} to {path}: {exc.strerror or exc}")


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.urandom(6).hex()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold an flock(2) on ``path`` (created if needed) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def hex_of(digest: str) -> str:
    return validate_digest(digest).split(":", 1)[1]


class BlobWriter:
    """Streams one blob into ``<hex>.partial``, hashing as it goes; :meth:`commit` verifies and renames.

    An existing partial file is kept (``resume=True``) so a download can continue with an HTTP Range
    request from :attr:`offset`. Create it through :meth:`BlobStore.writer` while holding the blob lock.
    """

    def __init__(self, store: BlobStore, digest: str, size: int | None, *, resume: bool, what: str) -> None:
        self.digest = digest
        self.size = size
        self.what = what
        self.final = store.path(digest)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self._hash = hashlib.sha256()
        try:
            self._file: BinaryIO = open(self.partial, "r+b" if resume and self.partial.exists() else "w+b")  # noqa: SIM115
        except OSError as exc:
            raise _write_error(exc, f"{what} {digest}", self.partial) from None
        if resume:
            self._file.seek(0)
            while chunk := self._file.read(1 << 20):
                self._hash.update(chunk)
            if size is not None and self._file.tell() > size:
                self.restart()
        self.offset = self._file.tell()

    def restart(self) -> None:
        """Throw away what was written (the server ignored a Range request)."""
        self._file.seek(0)
        self._file.truncate()
        self._hash = hashlib.sha256()
        self.offset = 0

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        if self.size is not None and self.offset + len(chunk) > self.size:
            self.discard()
            raise DigestMismatchError(
                f"{self.what} {self.digest}: got more than the expected {self.size} bytes; download discarded"
            )
        try:
            self._file.write(chunk)
        except OSError as exc:
            self.discard()  # a full disk: free what this download took instead of keeping it to resume
            raise _write_error(exc, f"{self.what} {self.digest}", self.partial) from None
        self._hash.update(chunk)
        self.offset += len(chunk)

    def commit(self) -> Path:
        """Check size and digest, make the blob durable and visible under its digest."""
        actual = f"sha256:{self._hash.hexdigest()}"
        if self.size is not None and self.offset != self.size:
            self.discard()
            raise DigestMismatchError(
                f"{self.what} {self.digest}: got {self.offset} bytes, expected {self.size}; discarded"
            )
        if actual != self.digest:
            self.discard()
            raise DigestMismatchError(
                f"{self.what} {self.digest}: content has digest {actual}; download discarded"
            )
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.partial, self.final)
            fsync_dir(self.final.parent)
        except OSError as exc:
            self.discard()
            raise _write_error(exc, f"{self.what} {self.digest}", self.final) from None
        return self.final

    def close(self) -> None:
        """Stop writing but keep the partial file for a later resume."""
        if not self._file.closed:
            # A failed flush (full disk) still closes the file; what did not reach it is fetched
            # again on resume, or the partial is discarded.
            with contextlib.suppress(OSError):
                self._file.close()

    def discard(self) -> None:
        """Stop writing and delete the partial file."""
        self.close()
        self.partial.unlink(missing_ok=True)


class BlobStore:
    """Content-addressed storage of verified blobs: ``<root>/sha256/<hex>``."""

    def __init__(self, root: Path, locks: Path) -> None:
        self.root = root
        self.dir = root / "sha256"
        self.locks = locks

    def path(self, digest: str) -> Path:
        return self.dir / hex_of(digest)

    def has(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def open(self, digest: str) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise InputError(f"blob {digest} is not in the cache; pull the image again") from None

    def read_bytes(self, digest: str) -> bytes:
        """A small blob (manifest, config), checked against its digest: one that rotted on disk is
        discarded and reported rather than trusted."""
        with self.open(digest) as f:
            data = f.read()
        if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
            self.discard_if_corrupt(digest)
            raise CorruptBlobError(
                f"cached blob {digest} does not match its digest (corrupt on disk); it has been"
                " discarded, pull the image again"
            )
        return data

    def verify(self, digest: str) -> bool:
        """Whether the stored blob (if any) still hashes to its digest."""
        h = hashlib.sha256()
        try:
            with open(self.path(digest), "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except FileNotFoundError:
            return False
        return f"sha256:{h.hexdigest()}" == digest

    def cached(self, digest: str, size: int | None = None) -> CachedState:
        """Whether ``digest`` is stored intact: a stored copy whose content no longer matches the
        digest is deleted (``"discarded"``) so that it is fetched again. One that matches but not
        the ``size`` a descriptor claims is kept (other images may use it) and reported missing, so
        the download's own size check names the problem. The caller holds :meth:`lock`."""
        if not self.path(digest).exists():
            return "missing"
        if not self.verify(digest):
            self._discard(digest)
            return "discarded"
        return "valid" if self.has(digest, size) else "missing"

    def discard_if_corrupt(self, digest: str) -> bool:
        """Delete the stored blob if it no longer matches its digest; True if it was deleted."""
        with self.lock(digest):
            if not self.path(digest).exists() or self.verify(digest):
                return False
            self._discard(digest)
            return True

    def _discard(self, digest: str) -> None:
        _log.warning("discarded cached blob %s: its content does not match its digest", digest)
        self.path(digest).unlink(missing_ok=True)
        fsync_dir(self.dir)

    @contextlib.contextmanager
    def lock(self, digest: str) -> Iterator[None]:
        """Exclusive per-blob lock: one writer per digest across threads and processes."""
        with file_lock(self.locks / f"{hex_of(digest)}.lock"):
            yield

    def writer(self, digest: str, size: int | None, *, resume: bool = True, what: str = "blob") -> BlobWriter:
        """A :class:`BlobWriter` for ``digest``; the caller must hold :meth:`lock`."""
        validate_digest(digest)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_error(exc, f"{what} {digest}", self.dir) from None
        return BlobWriter(self, digest, size, resume=resume, what=what)

    def put_stream(self, digest: str, size: int | None, stream: IO[bytes], what: str = "blob") -> Path:
        """Copy ``stream`` into the store as ``digest`` (verified); a no-op if it is already there."""
        with self.lock(digest):
            if self.cached(digest, size) == "valid":
                return self.path(digest)
            w = self.writer(digest, size, resume=False, what=what)
            try:
                while chunk := stream.read(1 << 20):
                    w.write(chunk)
                return w.commit()
            except BaseException:
                w.discard()
                raise

    def put_bytes(self, data: bytes, digest: str | None = None, what: str = "blob") -> str:
        """Store ``data``; verify it against ``digest`` if given. Returns the digest."""
        actual = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if digest is not None and digest != actual:
            raise DigestMismatchError(f"{what} {digest}: content has digest {actual}")
        with self.lock(actual):
            if self.cached(actual, len(data)) != "valid":
                w = self.writer(actual, len(data), resume=False, what=what)
                try:
                    w.write(data)
                    w.commit()
                except BaseException:
                    w.discard()
                    raise
        return actual

    def digests(self) -> Iterator[str]:
        """Every complete blob in the store."""
        if not self.dir.is_dir():
            return
        for entry in os.scandir(self.dir):
            if _HEX.fullmatch(entry.name):
                yield f"sha256:{entry.name}"


@dataclass(frozen=True)
class ImageRecord:
    """One pulled (or imported) image, as stored in ``images.json``."""

    ref: str
    manifest_digest: str
    config_digest: str
    layers: tuple[str, ...]
    size: int
    platform: str
    source: str = "registry"
    pulled_at: float = field(default_factory=time.time)
    index_digest: str | None = None

    @property
    def image_id(self) -> str:
        """Short id (first 12 hex digits of the config digest), as ``docker images`` shows it."""
        return hex_of(self.config_digest)[:12]

    def blobs(self) -> set[str]:
        """Every blob this image needs kept."""
        out = {self.manifest_digest, self.config_digest, *self.layers}
        if self.index_digest:
            out.add(self.index_digest)
        return out

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageRecord:
        return cls(
            ref=str(data["ref"]),
            manifest_digest=str(data["manifest_digest"]),
            config_digest=str(data["config_digest"]),
            layers=tuple(str(d) for d in data.get("layers", ())),
            size=int(data.get("size", 0)),
            platform=str(data.get("platform", "")),
            source=str(data.get("source", "registry")),
            pulled_at=float(data.get("pulled_at", 0.0)),
            index_digest=data.get("index_digest"),
        )


@dataclass(frozen=True)
class PruneResult:
    """What :meth:`ImageStore.prune` removed."""

    blobs: int
    rootfs_images: int
    bytes_freed: int
    partial_files: int = 0  # interrupted downloads and temporary files of interrupted writes
    temp_trees: int = 0  # root filesystem trees left by interrupted builds
    build_steps: int = 0  # build cache steps whose layer is gone
    build_snapshots: int = 0  # build VM snapshots no remaining step can restore


class ImageStore:
    """The image cache: blobs, the image index, and built root filesystems."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else paths.cache_dir()
        self.locks = self.root / "locks"
        self.blobs = BlobStore(self.root / "blobs" if root is not None else paths.blob_dir(), self.locks)
        self.index_path = self.root / "images.json"
        self.rootfs_dir = self.root / "rootfs"
        self.tmp_dir = self.root / "tmp"

    # ---- locking -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def using(self) -> Iterator[ImageStore]:
        """Hold the store lock shared: blobs this process adds or reads are not pruned meanwhile."""
        with file_lock(self.locks / "store.lock", shared=True):
            yield self

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[ImageStore]:
        """Hold the store lock exclusively (waits for running pulls and builds)."""
        with file_lock(self.locks / "store.lock"):
            yield self

    # ---- the image index -----------------------------------------------------------------------
    def _read_index(self) -> dict[str, ImageRecord]:
        try:
            raw = self.index_path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(raw)
            return {ref: ImageRecord.from_json(rec) for ref, rec in data["images"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(
                f"image index {self.index_path} is corrupt ({exc}); delete it and pull again"
            ) from None

    def _write_index(self, images: dict[str, ImageRecord]) -> None:
        doc = {
            "version": INDEX_VERSION,
            "images": {ref: rec.to_json() for ref, rec in sorted(images.items())},
        }
        atomic_write_bytes(self.index_path, json.dumps(doc, indent=2).encode() + b"\n")

    def images(self) -> list[ImageRecord]:
        """All stored images, newest first."""
        return sorted(self._read_index().values(), key=lambda r: r.pulled_at, reverse=True)

    def add(self, record: ImageRecord) -> None:
        """Record (or replace) an image under its ref."""
        with file_lock(self.locks / "images.lock"):
            images = self._read_index()
            images[record.ref] = record
            self._write_index(images)

    def resolve(self, text: str) -> ImageRecord:
        """Find a stored image by ref (any spelling), ``sha256:`` config digest or id prefix."""
        images = self._read_index()
        if text in images:
            return images[text]
        with contextlib.suppress(ImageReferenceError):
            canonical = str(Reference.parse(text))
            if canonical in images:
                return images[canonical]
        from supermachine.oci.sources import canonical_source  # local: sources imports store

        with contextlib.suppress(ImageReferenceError, InputError):
            key = canonical_source(text)
            if key in images:
                return images[key]
        wanted = text.removeprefix("sha256:").lower()
        if len(wanted) >= 4 and all(c in "0123456789abcdef" for c in wanted):
            matches = [r for r in images.values() if hex_of(r.config_digest).startswith(wanted)]
            if len({r.config_digest for r in matches}) == 1:
                return matches[0]
            if matches:
                raise ImageNotFoundError(f"image id {text!r} is ambiguous ({len(matches)} images match)")
        raise ImageNotFoundError(f"no stored image matches {text!r} (see 'supermachine images')")

    def remove(self, text: str) -> tuple[ImageRecord, PruneResult]:
        """Forget one image and delete whatever only it used."""
        with self.exclusive():
            with file_lock(self.locks / "images.lock"):
                record = self.resolve(text)
                images = self._read_index()
                del images[record.ref]
                self._write_index(images)
            return record, self._prune_locked()

    # ---- root filesystems ----------------------------------------------------------------------
    def rootfs_path(self, config_digest: str) -> Path:
        return self.rootfs_dir / f"{hex_of(config_digest)}.squashfs"

    def _rootfs_used_by_snapshots(self) -> set[str]:
        """Names of built root filesystems that snapshots in the store beside this cache boot from:
        a snapshot outlives the image it was baked from, and restoring it needs the same disk."""
        from supermachine.snapshots import golden

        store = self.root / "snapshots"
        if not store.is_dir():
            return set()
        found, _problems = golden.list_snapshots(store)
        used = set()
        for snap in found:
            rootfs = snap.meta.run.rootfs if snap.meta.run is not None else None
            if rootfs is not None and Path(rootfs).parent == self.rootfs_dir:
                used.add(Path(rootfs).name)
        return used

    # ---- garbage collection --------------------------------------------------------------------
    def prune(self) -> PruneResult:
        """Delete blobs and root filesystems no stored image or snapshot refers to, the build
        cache's steps and build VM snapshots that became useless with them
        (:meth:`BuildCache.prune <supermachine.build.cache.BuildCache.prune>`), and stale
        temporary files."""
        with self.exclusive():
            return self._prune_locked()

    def _prune_locked(self) -> PruneResult:
        images = self._read_index().values()
        keep_blobs = set().union(*(r.blobs() for r in images)) if images else set()
        keep_rootfs = {f"{hex_of(r.config_digest)}.squashfs" for r in images}
        keep_rootfs |= self._rootfs_used_by_snapshots()
        freed = removed_blobs = removed_rootfs = partial = trees = 0
        # With the store lock held exclusively no pull or build is running: every partial download,
        # temporary file and build tree is left over from one that was killed.
        for entry in scan_entries(self.blobs.dir):
            is_blob = _HEX.fullmatch(entry.name) is not None
            if is_blob and f"sha256:{entry.name}" in keep_blobs:
                continue
            freed += remove_entry(entry)
            removed_blobs += is_blob
            partial += not is_blob
        # The build cache's steps name layers (some just removed) and snapshots of build VMs that
        # run on root filesystems here: its dead steps and snapshots go, the rest keep their disks.
        from supermachine.build.cache import BuildCache

        build = BuildCache(self.blobs, self.root / "build").prune()
        freed += build.bytes_freed
        partial += build.other
        keep_rootfs |= {path.name for path in build.rootfs_in_use if path.parent == self.rootfs_dir}
        for entry in scan_entries(self.rootfs_dir):
            if entry.name in keep_rootfs:
                continue
            freed += remove_entry(entry)
            is_image = entry.name.endswith(".squashfs") and not entry.name.startswith(".")
            removed_rootfs += is_image
            partial += not is_image
        for entry in scan_entries(self.tmp_dir):
            freed += remove_entry(entry)
            trees += 1
        for entry in scan_entries(self.root):
            if entry.name.startswith(f".{self.index_path.name}.tmp-"):
                freed += remove_entry(entry)
                partial += 1
        if self.locks.is_dir():  # per-blob lock files; nobody holds one while we hold the store lock
            for entry in os.scandir(self.locks):
                if entry.name.endswith(".lock") and _HEX.fullmatch(entry.name[:-5]):
                    os.unlink(entry.path)
        return PruneResult(
            removed_blobs, removed_rootfs, freed, partial, trees, build.entries, build.snapshots
        )


def scan_entries(directory: Path) -> list[os.DirEntry[str]]:
    """The entries of ``directory`` (none if it does not exist)."""
    try:
        with os.scandir(directory) as it:
            return list(it)
    except FileNotFoundError:
        return []


def remove_entry(entry: os.DirEntry[str]) -> int:
    """Delete a file or a whole directory tree (never following symlinks); the bytes it held."""
    if not entry.is_dir(follow_symlinks=False):
        size = entry.stat(follow_symlinks=False).st_size
        os.unlink(entry.path)
        return size
    size = 0
    for top, dirs, files in os.walk(entry.path):  # does not descend into symlinked directories
        for name in (*dirs, *files):
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(top, name))
                size += 0 if stat.S_ISDIR(st.st_mode) else st.st_size
    import shutil  # only pruning needs it: not imported by every pull

    shutil.rmtree(entry.path, ignore_errors=True)
    return size
