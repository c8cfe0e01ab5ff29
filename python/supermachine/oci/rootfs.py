"""Root filesystems: apply an image's layers to a directory, and pack it into a squashfs image.

Layers are tar streams (uncompressed, gzip or zstd; detected from their first bytes, not from the
media type). Entries are applied in order with OCI whiteout semantics: ``.wh.<name>`` deletes
``<name>`` from lower layers and ``.wh..wh..opq`` empties its directory of lower-layer content.
Ownership, modes, xattrs, device nodes and hard links are reproduced (this needs root). A later
entry replaces an earlier one of the same name (a directory replaced by a file goes, contents and
all), as ``docker`` does.

Safety: layers are untrusted. Every operation on the tree is made relative to a directory file
descriptor reached from the root one component at a time with ``O_NOFOLLOW``; no host path that
passes through a symlink a layer created is ever used. Symlinks in an entry's parent directories
are resolved as a container would see them (absolute targets are relative to the image root);
one that leads outside the root is refused, and nothing is written through a symlink in the final
path component: existing entries are replaced, not followed. Hard links must name a regular file
in the tree. The uncompressed size, the number of entries and path lengths and depths are bounded
(:class:`LayerLimits`). The tree stays private (mode 0700) until every layer is in, so setuid files
and device nodes from the image are never reachable by other users while it is built.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import lzma
import os
import secrets
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from supermachine.errors import (
    CorruptBlobError,
    DigestMismatchError,
    LayerError,
    LayerLimitError,
    LayerTooLargeError,
    RootfsError,
    SupermachineError,
    UnsafeLayerError,
)
from supermachine.oci.image import Image
from supermachine.oci.store import BlobStore, file_lock, fsync_dir, hex_of
from supermachine.units import human_bytes, parse_size
from supermachine.untrusted_archives import UnsafeName, has_nul, name_parts, time_ns

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_MAX_SYMLINK_HOPS = 40


class _HashingReader:
    """A read-only stream that hashes what passes through it, and fails with ``overflow()`` once
    more than ``limit`` bytes have passed."""

    def __init__(
        self, raw: IO[bytes], limit: int | None = None, overflow: Callable[[], Exception] | None = None
    ) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.count = 0
        self.limit = limit
        self.overflow = overflow

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n if n >= 0 or self.limit is None else self.limit - self.count + 1)
        self.count += len(data)
        if self.limit is not None and self.count > self.limit:
            raise self.overflow() if self.overflow else LayerTooLargeError("too much data")
        self.hash.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class _Prefixed(io.RawIOBase):
    """A raw stream that first returns ``head`` and then the rest of ``raw``."""

    def __init__(self, raw: IO[bytes], head: bytes) -> None:
        self.raw = raw
        self.head = head

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self.head:
            n = min(len(view), len(self.head))
            view[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.raw.read(len(view))
        view[: len(data)] = data
        return len(data)


@contextlib.contextmanager
def open_layer(raw: IO[bytes], what: str = "layer") -> Iterator[IO[bytes]]:
    """The uncompressed tar stream of a layer, whatever its compression."""
    head = raw.read(6)
    peek = io.BufferedReader(_Prefixed(raw, head), 1 << 20)
    if head.startswith(b"\x1f\x8b"):
        with gzip.GzipFile(fileobj=peek, mode="rb") as gz:
            yield cast(IO[bytes], gz)
    elif head.startswith(b"\x28\xb5\x2f\xfd"):
        with zstandard.ZstdDecompressor().stream_reader(peek, read_across_frames=True) as zs:
            yield zs
    elif head.startswith(b"\xfd7zXZ\x00"):
        with lzma.LZMAFile(peek, "rb") as xz:
            yield xz
    elif head.startswith(b"BZh"):
        raise LayerError(f"{what} is bzip2-compressed, which is not supported")
    else:
        yield peek


# ---- bounds on what one layer may put on the disk (the single owner of every default) ------------
MAX_LAYER_BYTES_ENV = "SUPERMACHINE_MAX_LAYER_BYTES"
DEFAULT_EXPANSION_RATIO = 50  # a layer may expand to 50 times its compressed size ...
DEFAULT_FLOOR_BYTES = 1 << 30  # ... or to 1 GiB, whichever is more ...
DEFAULT_FREE_RESERVE_BYTES = 256 << 20  # ... and must leave this much free (at most 1/16 of the disk)
DEFAULT_MAX_ENTRIES = 1_000_000  # tar entries in one layer
DEFAULT_MAX_PATH_BYTES = 4096  # an entry name or link target (PATH_MAX)
DEFAULT_MAX_DEPTH = 256  # directory levels, as named and as resolved through symlinks
MAX_HEADER_BYTES = 1 << 20  # one pax or GNU long-name header (tarfile reads it into memory)


@dataclass(frozen=True)
class LayerLimits:
    """How much one layer may write. ``max_bytes`` replaces the ratio rule with a fixed cap; the
    free space of the target filesystem (minus a reserve) always caps it too."""

    max_bytes: int | None = None
    expansion_ratio: int = DEFAULT_EXPANSION_RATIO
    floor_bytes: int = DEFAULT_FLOOR_BYTES
    free_reserve_bytes: int = DEFAULT_FREE_RESERVE_BYTES
    max_entries: int = DEFAULT_MAX_ENTRIES
    max_path_bytes: int = DEFAULT_MAX_PATH_BYTES
    max_depth: int = DEFAULT_MAX_DEPTH

    @classmethod
    def from_env(cls) -> LayerLimits:
        """The defaults, with ``SUPERMACHINE_MAX_LAYER_BYTES`` (e.g. ``8G``) as a fixed cap if set."""
        text = os.environ.get(MAX_LAYER_BYTES_ENV, "").strip()
        return cls(max_bytes=parse_size(text, MAX_LAYER_BYTES_ENV)) if text else cls()

    def byte_cap(self, compressed_size: int, dir_fd: int) -> tuple[int, str]:
        """The most bytes a layer of ``compressed_size`` may expand to on the filesystem of
        ``dir_fd``, and why that is the cap (for the error message)."""
        if self.max_bytes is not None:
            cap, why = self.max_bytes, f"the cap set by {MAX_LAYER_BYTES_ENV}"
        else:
            cap = max(self.expansion_ratio * compressed_size, self.floor_bytes)
            why = (
                f"{self.expansion_ratio}x its compressed size of {human_bytes(compressed_size)}"
                f" or {human_bytes(self.floor_bytes)}, whichever is more;"
                f" set {MAX_LAYER_BYTES_ENV} to allow more"
            )
        fs = os.fstatvfs(dir_fd)
        free = fs.f_bavail * fs.f_frsize
        reserve = min(self.free_reserve_bytes, fs.f_blocks * fs.f_frsize // 16)
        if free - reserve < cap:
            cap = max(0, free - reserve)
            why = f"the free space ({human_bytes(free)} free, {human_bytes(reserve)} kept in reserve)"
        return cap, why


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses pax and GNU long-name headers larger than :data:`MAX_HEADER_BYTES` before tarfile
    reads them into memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _META_TYPES and self.size > MAX_HEADER_BYTES:
            raise LayerLimitError(
                f"has a {self.size}-byte extended header (more than {MAX_HEADER_BYTES} bytes)"
            )
        return super()._proc_member(tarfile_)  # type: ignore[misc,no-any-return]


_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE)
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _check_name(name: str, what: str, limits: LayerLimits, kind: str = "entry") -> list[str]:
    try:
        return name_parts(name, max_bytes=limits.max_path_bytes, max_depth=limits.max_depth)
    except UnsafeName as bad:
        error = LayerLimitError if bad.problem.is_limit else UnsafeLayerError
        raise error(f"{what}: {kind} {bad}") from None


_MAX_ID = 2**32 - 2
"""The largest uid or gid a file can have (``(uid_t) -1`` means "leave unchanged" to chown)."""


_NUMBER_LIMITS = {
    "uid": _MAX_ID,
    "gid": _MAX_ID,
    "mode": 0o177777,
    "devmajor": 2**32 - 1,
    "devminor": 2**32 - 1,
}
"""The largest value of each number field a file can have (mode: the 16 bits of a mode_t, so a
mode with its file-type bits passes; device numbers: the 32 bits ``makedev`` takes)."""


def _check_numbers(member: tarfile.TarInfo, what: str) -> None:
    """Refuse owners, modes, device numbers and times no file can have: extended headers carry
    them as any decimal text and base-256 header fields as any integer, and the system calls would
    refuse them with an exception rather than an error code (or take -1 as "unchanged")."""
    for field, limit in _NUMBER_LIMITS.items():
        value = getattr(member, field)
        if not 0 <= value <= limit:
            raise UnsafeLayerError(f"{what}: entry {member.name!r} has {field} {value} (at most {limit})")
    mtime = member.mtime
    if time_ns(mtime) is None:
        raise UnsafeLayerError(
            f"{what}: entry {member.name!r} has a modification time out of range ({mtime!r})"
        )


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove_at(dir_fd: int, name: str) -> None:
    """Delete ``name`` in ``dir_fd`` (a directory with everything in it); symlinks are never followed."""
    st = _lstat_at(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)  # the fd-based walk: it never follows a symlink
    else:
        os.unlink(name, dir_fd=dir_fd)


class _Tree:
    """The directory a root filesystem is built in, reached only through file descriptors.

    Directory mtimes are collected (by resolved path below the root) and set by :meth:`finish`,
    after the last layer, because creating entries changes them.
    """

    def __init__(self, root: Path) -> None:
        self.path = str(root)
        self.fd = os.open(root, _O_DIR)
        self.dir_times: dict[tuple[str, ...], int] = {}
        self.root_mode: int | None = None  # from a layer's "./" entry; applied by finish()

    def close(self) -> None:
        os.close(self.fd)

    def open_dir(self, names: tuple[str, ...]) -> int | None:
        """An fd of the directory ``names`` below the root, if every component is a real directory now."""
        fd = os.dup(self.fd)
        for name in names:
            try:
                child = os.open(name, _O_DIR, dir_fd=fd)
            except OSError:
                child = -1
            finally:
                os.close(fd)
            if child < 0:
                return None
            fd = child
        return fd

    def finish(self, default_root_mode: int | None) -> None:
        """Set the collected directory times (without following symlinks) and the root's mode."""
        for names, mtime_ns in sorted(self.dir_times.items(), key=lambda kv: len(kv[0]), reverse=True):
            fd = self.open_dir(names)
            if fd is None:
                continue  # replaced or deleted by a later entry
            try:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)
        mode = self.root_mode if self.root_mode is not None else default_root_mode
        if mode is not None:
            os.chmod(self.fd, mode)


@contextlib.contextmanager
def _open_tree(root: Path) -> Iterator[_Tree]:
    tree = _Tree(root)
    try:
        yield tree
    finally:
        tree.close()


class _DirWalk:
    """The directories of one resolution: a stack of fds below the root (closed by :meth:`close`)."""

    def __init__(self, tree: _Tree) -> None:
        self.tree = tree
        self.stack: list[tuple[str, int]] = []

    @property
    def fd(self) -> int:
        return self.stack[-1][1] if self.stack else self.tree.fd

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.stack)

    def push(self, name: str, fd: int) -> None:
        self.stack.append((name, fd))

    def pop(self) -> None:
        os.close(self.stack.pop()[1])

    def close(self) -> None:
        while self.stack:
            self.pop()


class _Applier:
    """Applies the tar entries of one layer to a :class:`_Tree`."""

    def __init__(self, tree: _Tree, what: str, limits: LayerLimits, byte_cap: tuple[int, str]) -> None:
        self.tree = tree
        self.what = what
        self.limits = limits
        self.byte_cap, self.cap_reason = byte_cap
        self.created: set[tuple[str, ...]] = set()  # resolved paths this layer has put in place
        self.written = 0  # bytes of file content written by this layer
        self.entries = 0
        self.privileged = os.geteuid() == 0

    def too_large(self) -> LayerTooLargeError:
        return LayerTooLargeError(
            f"{self.what} expands to more than {human_bytes(self.byte_cap)} ({self.cap_reason}); refused"
        )

    # -- path resolution -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _walk(self, parts: list[str], name: str, *, create: bool) -> Iterator[_DirWalk | None]:
        """The directory ``parts`` resolved below the root, following in-root symlinks as a
        container would. Missing directories are created if ``create``, else this yields ``None``."""
        walk = _DirWalk(self.tree)
        try:
            yield walk if self._descend(walk, parts, name, create=create) else None
        finally:
            walk.close()

    def _descend(self, walk: _DirWalk, parts: list[str], name: str, *, create: bool) -> bool:
        queue = list(reversed(parts))  # a stack: the next component is at the end
        hops = 0
        while queue:
            comp = queue.pop()
            if comp in ("", "."):
                continue
            if comp == "..":
                if not walk.stack:
                    raise UnsafeLayerError(
                        f"{self.what}: entry {name!r} resolves outside the root through a symlink"
                    )
                walk.pop()
                continue
            if len(walk.stack) >= self.limits.max_depth:
                raise LayerLimitError(
                    f"{self.what}: entry {name!r} resolves more than {self.limits.max_depth} levels deep"
                )
            try:
                walk.push(comp, os.open(comp, _O_DIR, dir_fd=walk.fd))
                continue
            except FileNotFoundError:
                if not create:
                    return False
                os.mkdir(comp, 0o755, dir_fd=walk.fd)
                walk.push(comp, os.open(comp, _O_DIR, dir_fd=walk.fd))
                self.created.add(walk.names)
                continue
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
            st = _lstat_at(walk.fd, comp)
            if st is None or not stat.S_ISLNK(st.st_mode):
                raise LayerError(
                    f"{self.what}: entry {name!r}: {'/'.join([*walk.names, comp])!r} is not a directory"
                )
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                raise UnsafeLayerError(f"{self.what}: entry {name!r}: too many levels of symlinks")
            target = os.readlink(comp, dir_fd=walk.fd)
            if target.startswith("/"):
                walk.close()  # absolute targets are relative to the image root
            queue.extend(reversed(target.split("/")))
        return True

    # -- entries ---------------------------------------------------------------------------------
    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise LayerLimitError(f"{self.what} has more than {self.limits.max_entries} entries")
        parts = _check_name(member.name, self.what, self.limits)
        _check_numbers(member, self.what)
        try:
            self._apply(tar, member, parts)
        except OSError as exc:
            raise LayerError(
                f"{self.what}: cannot write entry {member.name!r} under {self.tree.path}:"
                f" {exc.strerror or exc}"
            ) from None

    def _apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo, parts: list[str]) -> None:
        if not parts:  # the root directory itself
            if not member.isdir():
                raise LayerError(f"{self.what}: entry {member.name!r} names the root but is not a directory")
            self._metadata(self.tree.fd, ".", member, self.tree.fd, ())
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, member.name)
            return
        with self._walk(parts[:-1], member.name, create=True) as walk:
            assert walk is not None
            rel = (*walk.names, base)
            self._create(tar, member, walk.fd, base, rel)
            self.created.add(rel)

    def _create(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, pfd: int, base: str, rel: tuple[str, ...]
    ) -> None:
        existing = _lstat_at(pfd, base)
        keep_dir = member.isdir() and existing is not None and stat.S_ISDIR(existing.st_mode)
        if existing is not None and not keep_dir:
            _remove_at(pfd, base)  # a later entry replaces an earlier one, whatever either is
        if member.isdir():
            if not keep_dir:
                os.mkdir(base, 0o700, dir_fd=pfd)
            self._with_fd(os.open(base, _O_DIR, dir_fd=pfd), pfd, base, member, rel)
        elif member.isreg():
            self._write_file(tar, member, pfd, base, rel)
        elif member.issym():
            if len(member.linkname.encode("utf-8", "surrogateescape")) > self.limits.max_path_bytes:
                raise LayerLimitError(f"{self.what}: symlink {member.name!r} has an overlong target")
            if has_nul(member.linkname):
                raise UnsafeLayerError(f"{self.what}: symlink {member.name!r} has a target with a NUL byte")
            os.symlink(member.linkname, base, dir_fd=pfd)
            self._metadata(pfd, base, member, None, rel)
        elif member.islnk():
            self._hardlink(member, pfd, base)  # shares its target's inode and metadata
        elif member.ischr() or member.isblk() or member.isfifo():
            if not self._make_node(member, pfd, base):
                return
            self._metadata(pfd, base, member, None, rel)
        else:
            raise LayerError(f"{self.what}: entry {member.name!r} has unsupported tar type {member.type!r}")

    def _with_fd(self, fd: int, pfd: int, base: str, member: tarfile.TarInfo, rel: tuple[str, ...]) -> None:
        try:
            self._metadata(pfd, base, member, fd, rel)
        finally:
            os.close(fd)

    def _write_file(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, pfd: int, base: str, rel: tuple[str, ...]
    ) -> None:
        if self.written + member.size > self.byte_cap:
            raise self.too_large()
        src = tar.extractfile(member)
        assert src is not None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(base, flags, 0o600, dir_fd=pfd), "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
            out.flush()
            self.written += member.size
            self._metadata(pfd, base, member, out.fileno(), rel)

    def _make_node(self, member: tarfile.TarInfo, pfd: int, base: str) -> bool:
        if member.isfifo():
            os.mkfifo(base, 0o600, dir_fd=pfd)
            return True
        if not self.privileged:
            return False  # device nodes need root; skip them in unprivileged builds
        kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        os.mknod(base, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=pfd)
        return True

    def _hardlink(self, member: tarfile.TarInfo, pfd: int, base: str) -> None:
        parts = _check_name(member.linkname, self.what, self.limits, "hard link target")
        if not parts:
            raise UnsafeLayerError(f"{self.what}: hard link {member.name!r} points at the root directory")
        with self._walk(parts[:-1], member.linkname, create=False) as walk:
            target = _lstat_at(walk.fd, parts[-1]) if walk is not None else None
            if walk is None or target is None:
                raise LayerError(
                    f"{self.what}: hard link {member.name!r} points at missing {member.linkname!r}"
                )
            if not stat.S_ISREG(target.st_mode):
                raise LayerError(
                    f"{self.what}: hard link {member.name!r} points at {member.linkname!r},"
                    " which is not a regular file"
                )
            os.link(parts[-1], base, src_dir_fd=walk.fd, dst_dir_fd=pfd, follow_symlinks=False)

    def _whiteout(self, parts: list[str], name: str) -> None:
        base = parts[-1]
        if base[len(WHITEOUT_PREFIX) :] in ("", ".", ".."):
            raise UnsafeLayerError(f"{self.what}: whiteout {name!r} names no file")
        if base != OPAQUE_MARKER and base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other AUFS metadata (.wh..wh.plnk, ...): not content
        with self._walk(parts[:-1], name, create=False) as walk:
            if walk is None:
                return
            opaque = base == OPAQUE_MARKER
            victims = os.listdir(walk.fd) if opaque else [base[len(WHITEOUT_PREFIX) :]]
            for victim in victims:
                if (*walk.names, victim) not in self.created:  # whiteouts only hide lower layers
                    _remove_at(walk.fd, victim)

    # -- metadata --------------------------------------------------------------------------------
    def _metadata(
        self, pfd: int, base: str, member: tarfile.TarInfo, fd: int | None, rel: tuple[str, ...]
    ) -> None:
        """Owner, mode, xattrs and time of the entry just made: through ``fd`` when there is one,
        else relative to ``pfd`` without following ``base`` (symlinks, device nodes, fifos)."""
        if self.privileged:
            if fd is not None:
                os.fchown(fd, member.uid, member.gid)
            else:
                os.chown(base, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)
        mode = member.mode & 0o7777
        if not rel:
            self.tree.root_mode = mode  # the root stays private until the last layer is in
        elif fd is not None:
            os.fchmod(fd, mode)  # after chown, which clears setuid bits
        elif not member.issym():
            self._chmod_node(pfd, base, mode)
        self._xattrs(pfd, base, member, fd)
        mtime_ns = int(member.mtime * 1_000_000_000)  # in range: checked by _check_numbers
        if member.isdir():
            self.tree.dir_times[rel] = mtime_ns
        elif fd is not None:
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        else:
            os.utime(base, ns=(mtime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)

    @staticmethod
    def _chmod_node(pfd: int, base: str, mode: int) -> None:
        """chmod a device node or fifo without opening it (which could block or touch a device)."""
        fd = os.open(base, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                return
            os.chmod(f"/proc/self/fd/{fd}", mode)  # the inode behind the O_PATH fd, not a name
        finally:
            os.close(fd)

    def _xattrs(self, pfd: int, base: str, member: tarfile.TarInfo, fd: int | None) -> None:
        for key, value in member.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            if has_nul(key):
                raise UnsafeLayerError(
                    f"{self.what}: entry {member.name!r} has an xattr name with a NUL byte"
                )
            data = value.encode("utf-8", "surrogateescape")
            try:
                if fd is not None:
                    os.setxattr(fd, key[13:], data)
                else:  # the directory fd's own name, then base without following it
                    os.setxattr(f"/proc/self/fd/{pfd}/{base}", key[13:], data, follow_symlinks=False)
            except OSError as exc:
                if self.privileged and exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise LayerError(
                        f"{self.what}: cannot set xattr {key[13:]} on {member.name!r}: {exc.strerror}"
                    ) from None


_DECODE_ERRORS = (tarfile.TarError, EOFError, zstandard.ZstdError, lzma.LZMAError, gzip.BadGzipFile)


def _apply_to_tree(
    tree: _Tree,
    blob: IO[bytes],
    what: str,
    diff_id: str | None,
    limits: LayerLimits,
    compressed_size: int,
) -> None:
    applier = _Applier(tree, what, limits, limits.byte_cap(compressed_size, tree.fd))
    try:
        with open_layer(blob, what) as plain:
            counting = _HashingReader(plain, applier.byte_cap, applier.too_large)
            with tarfile.open(  # type: ignore[call-overload]
                fileobj=counting, mode="r|", errors="surrogateescape", tarinfo=_BoundedTarInfo
            ) as tar:
                while (member := tar.next()) is not None:
                    applier.apply(tar, member)
                    tar.members.clear()  # a stream needs no index; keeping one grows with the layer
            counting.drain()
    except LayerLimitError as exc:
        if str(exc).startswith(what):
            raise
        raise LayerLimitError(f"{what} {exc}") from None  # raised inside tarfile, without the layer name
    except _DECODE_ERRORS as exc:
        raise LayerError(f"{what} is not a valid tar stream: {' '.join(str(exc).split())}") from None
    except OSError as exc:
        raise LayerError(f"{what}: cannot read the layer: {exc.strerror or exc}") from None
    if diff_id is not None:
        actual = f"sha256:{counting.hash.hexdigest()}"
        if actual != diff_id:
            raise DigestMismatchError(
                f"{what}: uncompressed content has digest {actual}, the config says {diff_id}"
            )


def _blob_size(blob: IO[bytes]) -> int:
    try:
        return os.fstat(blob.fileno()).st_size
    except (OSError, AttributeError, io.UnsupportedOperation):
        return 0


def apply_layer(
    root: Path,
    blob: IO[bytes],
    *,
    what: str = "layer",
    diff_id: str | None = None,
    limits: LayerLimits | None = None,
) -> None:
    """Apply one layer (a possibly compressed tar stream) to the directory ``root``.

    If ``diff_id`` is given, the uncompressed stream must hash to it. ``limits`` default to
    :meth:`LayerLimits.from_env`. Directory times (and a mode the layer gives the root) are set
    when the layer is done.
    """
    with _open_tree(root) as tree:
        _apply_to_tree(tree, blob, what, diff_id, limits or LayerLimits.from_env(), _blob_size(blob))
        tree.finish(None)


def _apply_cached_layer(image: Image, index: int, tree: _Tree, limits: LayerLimits) -> None:
    """Apply layer ``index`` from the cache, checking the blob's own digest as it is read: a blob
    that no longer matches it is discarded (the next pull fetches it again)."""
    layer = image.layers[index]
    what = f"layer {index + 1}/{len(image.layers)} ({layer.digest})"
    diff_ids = image.config.diff_ids
    blobs = image.store.blobs
    with blobs.open(layer.digest) as f:
        raw = _HashingReader(f)
        try:
            _apply_to_tree(
                tree, cast(IO[bytes], raw), what, diff_ids[index] if diff_ids else None, limits, layer.size
            )
        except SupermachineError:
            raw.drain()
            if f"sha256:{raw.hash.hexdigest()}" != layer.digest:
                raise _corrupt(blobs, layer.digest, what) from None
            raise
        raw.drain()
        if f"sha256:{raw.hash.hexdigest()}" != layer.digest:
            raise _corrupt(blobs, layer.digest, what)


def _corrupt(blobs: BlobStore, digest: str, what: str) -> CorruptBlobError:
    blobs.discard_if_corrupt(digest)
    return CorruptBlobError(
        f"{what}: the cached blob does not match its digest (corrupt on disk); it has been discarded,"
        " pull the image again"
    )


def build_rootfs(image: Image, dest: Path, *, limits: LayerLimits | None = None) -> Path:
    """Apply every layer of ``image`` in order into the (new or empty) directory ``dest``.

    ``dest`` is mode 0700 until the last layer is in; then it gets the image's root mode (0755 by
    default). ``limits`` default to :meth:`LayerLimits.from_env`.
    """
    limits = limits or LayerLimits.from_env()
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise RootfsError(f"{dest} is not empty")
    os.chmod(dest, 0o700)
    with _open_tree(dest) as tree:
        for index in range(len(image.layers)):
            _apply_cached_layer(image, index, tree, limits)
        try:
            tree.finish(0o755)
        except OSError as exc:
            raise RootfsError(f"cannot set directory times in {dest}: {exc.strerror}") from None
    return dest


COMPRESSIONS = ("gzip", "xz", "zstd", "none")
"""Root filesystem compressions: what the guest kernels decompress, or none."""


def default_compression(sys_module: Path | None = None) -> str:
    """``gzip`` on hardware KVM, where decompressing in the guest is cheap and the file is half the
    size; ``none`` where guest kernel code is emulated, because there decompressing each block a
    command reads dominates its first run (``benches/test_bench_rootfs_compression.py``: a booted
    VM's first busybox command took 72 s on gzip against 27.5 s uncompressed)."""
    from supermachine import kernel

    return "none" if kernel.emulating_host(sys_module) else "gzip"


def compression_args(compression: str) -> list[str]:
    """``mksquashfs`` arguments for ``compression`` (one of :data:`COMPRESSIONS`)."""
    if compression not in COMPRESSIONS:
        expected = ", ".join(COMPRESSIONS)
        raise RootfsError(f"unknown root filesystem compression {compression!r}: expected one of {expected}")
    if compression == "none":
        return ["-noI", "-noD", "-noF", "-noX"]
    return ["-comp", compression]


def mksquashfs(
    tree: Path, out: Path, *, compression: str | None = None, processors: int | None = None
) -> None:
    """Run ``mksquashfs`` on ``tree`` (ownership, modes and xattrs kept) writing ``out``,
    ``compression`` one of :data:`COMPRESSIONS` (default: :func:`default_compression`)."""
    args = compression_args(compression or default_compression())
    exe = shutil.which("mksquashfs")
    if exe is None:
        raise RootfsError("mksquashfs not found; install squashfs-tools")
    cmd = [exe, str(tree), str(out), "-noappend", "-no-progress", "-quiet", *args]
    if processors:
        cmd += ["-processors", str(processors)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = " ".join((proc.stderr or proc.stdout).split())[-300:]
        raise RootfsError(f"mksquashfs failed with exit code {proc.returncode}: {detail}")


def build_squashfs(
    image: Image,
    *,
    compression: str | None = None,
    processors: int | None = None,
    force: bool = False,
    limits: LayerLimits | None = None,
) -> Path:
    """The read-only squashfs root filesystem of ``image``, built once and cached by config digest;
    ``compression`` as for :func:`mksquashfs`.

    The tree is built in a private (0700) directory under the cache's ``tmp/``, so nothing in it
    (setuid binaries, device nodes) is reachable by other users, and removed afterwards.
    """
    compression_args(compression or default_compression())  # a bad name fails before any work
    store = image.store
    out = store.rootfs_path(image.config_digest)
    with store.using(), file_lock(store.locks / f"rootfs-{hex_of(image.config_digest)}.lock"):
        if out.exists() and not force:
            return out
        token = secrets.token_hex(6)
        work = store.tmp_dir / f"rootfs-{hex_of(image.config_digest)[:12]}-{token}"
        tmp_out = out.with_name(f".{out.name}.tmp-{token}")
        try:
            _private_dir(work)
            out.parent.mkdir(parents=True, exist_ok=True)
            tree = build_rootfs(image, work / "tree", limits=limits)
            mksquashfs(tree, tmp_out, compression=compression, processors=processors)
            with open(tmp_out, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp_out, out)
            fsync_dir(out.parent)
        except OSError as exc:
            raise RootfsError(
                f"cannot build the root filesystem {out}: {exc.strerror or exc}"
                + (f" ({exc.filename})" if exc.filename else "")
            ) from None
        finally:
            tmp_out.unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)
    return out


def _private_dir(path: Path) -> None:
    """Create ``path`` (and its parent) with mode 0700, whatever the umask."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)
