"""Copying files and directory trees between the host and a VM (``vm.copy_in``, ``vm.copy_out``).

Into the guest, a host path is sent as a tar stream that the agent unpacks (``put_archive``); the
host reads only what the caller named, and never follows a link inside it.

Out of the guest, the agent sends a tar stream of a guest path (``get_archive``). The guest is
untrusted, so the stream is unpacked here by :func:`unpack_guest_archive` with rules of its own,
not by ``tarfile``'s extraction:

* every entry is resolved beneath the destination one component at a time through directory file
  descriptors opened with ``O_NOFOLLOW``, so no link (made by this archive or already there) is
  ever followed, and no name may be absolute or hold ``..``;
* only directories, regular files, symbolic links and hard links to files of the same archive are
  made; device nodes and FIFOs are skipped. A symbolic link is made as it is (``docker cp`` keeps
  them too): it is inert text, never followed here, and an entry that would go through it is
  refused;
* modes keep the permission bits only (no set-id or sticky bits), and directories stay writable
  by their owner; owners are not applied: what is copied out belongs to the caller;
* entries, depth, name length and bytes are bounded, and a failure leaves what was unpacked so far
  (as ``docker cp`` does), never anything outside the destination.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from supermachine.errors import CopyError, InputError
from supermachine.untrusted_archives import UnsafeName, has_nul, name_parts, time_ns

#: Default seconds of one copy, either way.
COPY_TIMEOUT = 3600.0
#: Default limit of the bytes of one ``copy_out`` archive.
MAX_COPY_BYTES = 64 << 30
#: Most entries one ``copy_out`` unpacks.
MAX_COPY_ENTRIES = 1_000_000
#: Deepest entry (path components) ``copy_out`` unpacks, and longest name in bytes.
MAX_COPY_DEPTH = 256
MAX_COPY_NAME = 4096

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_BLOCK = 1 << 20


@dataclass(frozen=True)
class CopyResult:
    """What :func:`unpack_guest_archive` did."""

    entries: int
    """Entries made (directories, files, links)."""
    bytes: int
    """Bytes of file content written."""
    skipped: int
    """Device nodes and FIFOs left out."""


# -- into the guest ---------------------------------------------------------------------------------


def _as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


@contextlib.contextmanager
def host_archive(source: Path, *, keep_owner: bool = False) -> Iterator[BinaryIO]:
    """A tar stream of the host path ``source`` (a file, link or directory tree), named after its
    last component, written by a thread as it is read. Links are stored, not followed; sockets
    are left out. Owners become root unless ``keep_owner``."""
    try:
        st = os.lstat(source)
    except OSError as exc:
        raise InputError(f"cannot copy {source}: {exc.strerror}") from None
    if stat.S_ISSOCK(st.st_mode):
        raise InputError(f"cannot copy {source}: it is a socket")
    name = Path(os.path.abspath(source)).name or "."
    read_fd, write_fd = os.pipe()
    reader, writer = os.fdopen(read_fd, "rb"), os.fdopen(write_fd, "wb")
    failure: list[BaseException] = []

    def write() -> None:
        try:
            with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                tar.add(source, arcname=name, filter=None if keep_owner else _as_root)
        except BrokenPipeError:
            pass  # the reader went away first: its own error says why
        except BaseException as exc:  # reported to the reader's side once it is done
            failure.append(exc)
        finally:
            with contextlib.suppress(OSError):
                writer.close()

    thread = threading.Thread(target=write, name="supermachine-copy-in", daemon=True)
    thread.start()
    try:
        yield reader
    finally:
        reader.close()  # a writer blocked on a full pipe gets EPIPE and ends
        thread.join()
    if failure:
        error = failure[0]
        detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise CopyError(f"cannot read {source} to copy it: {detail}")


# -- out of the guest -------------------------------------------------------------------------------


def _components(name: str) -> list[str]:
    """The path components of an entry name, refused if it could leave the destination."""
    try:
        return name_parts(name, max_bytes=MAX_COPY_NAME, max_depth=MAX_COPY_DEPTH)
    except UnsafeName as bad:
        raise CopyError(f"the guest's archive holds an entry named {bad.shown}, which {bad.reason}") from None


class _Destination:
    """The destination directory, reached only through descriptors."""

    def __init__(self, root: Path) -> None:
        try:
            self.fd = os.open(root, _O_DIR)
        except OSError as exc:
            raise InputError(f"cannot copy into {root}: {exc.strerror}") from None
        self.root = root
        self.files: set[tuple[str, ...]] = set()  # regular files this archive made
        self.dir_times: dict[tuple[str, ...], int] = {}

    def close(self) -> None:
        os.close(self.fd)

    def open_dir(self, parts: list[str] | tuple[str, ...], *, create: bool) -> int:
        """A descriptor of the directory ``parts`` below the root, each component a real
        directory (made, mode 0755, when missing and ``create``)."""
        fd = os.dup(self.fd)
        try:
            for part in parts:
                try:
                    child = os.open(part, _O_DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    child = os.open(part, _O_DIR, dir_fd=fd)
                os.close(fd)
                fd = child
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CopyError(f"{'/'.join(parts)} in {self.root} is not a directory") from None
            raise
        return fd

    def clear(self, parent: int, name: str) -> None:
        """Removes a non-directory at ``name`` (an entry replaces it, as ``tar`` does)."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise CopyError(f"{name} in {self.root} is a directory; the guest's archive has a file there")
        os.unlink(name, dir_fd=parent)


def _write_file(fd: int, source: IO[bytes], size: int) -> int:
    left = size
    while left:
        data = source.read(min(_BLOCK, left))
        if not data:
            raise CopyError("the guest's archive ends inside a file")
        _write_all(fd, data)
        left -= len(data)
    return size


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def unpack_guest_archive(
    stream: IO[bytes],
    dest: Path,
    *,
    max_entries: int = MAX_COPY_ENTRIES,
    progress: Callable[[int], object] | None = None,
) -> CopyResult:
    """Unpacks the tar ``stream`` from a guest into the existing directory ``dest`` under the rules
    of the module docstring. ``progress`` is called with the bytes of each file written."""
    target = _Destination(dest)
    entries = written = skipped = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                parts = _components(member.name)
                if not parts:  # the top "." of an archive of /
                    continue
                entries += 1
                if entries > max_entries:
                    raise CopyError(f"the guest's archive holds more than {max_entries} entries")
                if member.ischr() or member.isblk() or member.isfifo():
                    skipped += 1
                    continue
                parent = target.open_dir(parts[:-1], create=True)
                try:
                    written += _unpack_entry(target, parent, parts, member, tar)
                finally:
                    os.close(parent)
                if progress is not None and member.isreg():
                    progress(member.size)
        for names, mtime_ns in sorted(target.dir_times.items(), key=lambda kv: len(kv[0]), reverse=True):
            with contextlib.suppress(OSError, CopyError):
                fd = target.open_dir(names, create=False)
                try:
                    os.utime(fd, ns=(mtime_ns, mtime_ns))
                finally:
                    os.close(fd)
    except tarfile.TarError as exc:
        raise CopyError(f"the guest sent a broken archive: {exc}") from None
    except OSError as exc:
        raise CopyError(f"cannot write into {dest}: {exc.strerror or exc}") from None
    finally:
        target.close()
    return CopyResult(entries - skipped, written, skipped)


def _unpack_entry(
    target: _Destination, parent: int, parts: list[str], member: tarfile.TarInfo, tar: tarfile.TarFile
) -> int:
    """Makes one entry in the directory ``parent``; returns the file bytes written."""
    name = parts[-1]
    mode = member.mode & 0o777
    mtime_ns = time_ns(max(0, member.mtime))
    if mtime_ns is None:
        raise CopyError(
            f"the guest's archive holds an entry named {member.name!r} with a modification time"
            f" out of range ({member.mtime!r})"
        )
    if member.isdir():
        try:
            fd = os.open(name, _O_DIR, dir_fd=parent)
        except FileNotFoundError:
            os.mkdir(name, 0o700, dir_fd=parent)
            fd = os.open(name, _O_DIR, dir_fd=parent)
        except OSError:
            target.clear(parent, name)  # a file or link where the directory goes
            os.mkdir(name, 0o700, dir_fd=parent)
            fd = os.open(name, _O_DIR, dir_fd=parent)
        try:
            os.fchmod(fd, mode | 0o700)  # writable while it fills; the owner can fix it after
        finally:
            os.close(fd)
        target.dir_times[tuple(parts)] = mtime_ns
        return 0
    target.clear(parent, name)
    target.files.discard(tuple(parts))
    if member.issym():
        if not member.linkname or has_nul(member.linkname) or len(member.linkname) > MAX_COPY_NAME:
            raise CopyError(f"the guest's archive holds a link {'/'.join(parts)} with a bad target")
        os.symlink(member.linkname, name, dir_fd=parent)
        with contextlib.suppress(OSError):
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=parent, follow_symlinks=False)
        return 0
    if member.islnk():
        link_parts = tuple(_components(member.linkname))
        if link_parts not in target.files:
            raise CopyError(
                f"the guest's archive holds a hard link {'/'.join(parts)} to {member.linkname!r},"
                " which is no file it made"
            )
        source_dir = target.open_dir(link_parts[:-1], create=False)
        try:
            os.link(link_parts[-1], name, src_dir_fd=source_dir, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(source_dir)
        target.files.add(tuple(parts))
        return 0
    if not member.isreg():
        raise CopyError(f"the guest's archive holds {'/'.join(parts)} of an unknown type")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=parent)
    try:
        data = tar.extractfile(member)
        size = 0 if data is None else _write_file(fd, data, member.size)
        os.fchmod(fd, mode)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    finally:
        os.close(fd)
    target.files.add(tuple(parts))
    return size
