"""What a VM changed in its root file system, and that change set written as an OCI layer.

A VM's root is its image's read-only squashfs under a tmpfs overlay, so the overlay's upper
directory is exactly what the VM changed. The guest agent walks it (the ``changes`` request in
``guest/agent/PROTOCOL.md``); this module turns the walk into :class:`Change` rows
(:meth:`Vm.changes <supermachine.vm.Vm.changes>`) or a layer tar (:meth:`Vm.export_layer
<supermachine.vm.Vm.export_layer>`): deleted paths become ``.wh.NAME`` files, directories that
replaced an image directory get a ``.wh..wh..opq`` marker, and modes, owners, times, extended
attributes, hard and symbolic links are kept.

The guest wrote the stream, so nothing in it is trusted: every path is checked to be a relative
path inside the tree whose parent came earlier, every count and size is bounded, file contents
must be exactly as long as announced, and a violation stops the export with
:class:`~supermachine.errors.ProtocolError`. The layer is written to a temporary file and only
renamed into place once complete.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import secrets
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, Protocol, cast

from supermachine.agent import FieldValue
from supermachine.errors import ExportError, ProtocolError
from supermachine.oci.manifest import OCI_LAYER_GZIP, OCI_LAYER_TAR
from supermachine.oci.rootfs import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_PATH_BYTES,
    OPAQUE_MARKER,
    WHITEOUT_PREFIX,
)

__all__ = ["EXPORT_TIMEOUT", "Change", "ChangeKind", "EntryType", "Layer", "list_changes", "write_layer"]

#: Default seconds for listing or exporting a VM's changes (a guest whose kernel is emulated reads
#: its files slowly).
EXPORT_TIMEOUT = 600.0
#: Most extended attributes on one entry, and most bytes of them together.
MAX_XATTRS = 128
MAX_XATTR_BYTES = 1 << 20
#: Largest name component (NAME_MAX).
MAX_NAME_BYTES = 255
#: Highest device major or minor number a tar header can hold (7 octal digits).
MAX_DEVICE_NUMBER = 0o7777777
#: Extended attribute namespaces a layer may carry (``trusted.overlay.*`` is the overlay's own).
_XATTR_NAMESPACES = (b"user.", b"security.", b"trusted.")
_OVERLAY_XATTRS = b"trusted.overlay."

ChangeKind = Literal["added", "modified", "deleted"]
EntryType = Literal["file", "dir", "symlink", "hardlink", "whiteout", "char", "block", "fifo"]
_TYPES: tuple[EntryType, ...] = ("file", "dir", "symlink", "hardlink", "whiteout", "char", "block", "fifo")
_TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
_LETTER = {"added": "A", "modified": "C", "deleted": "D"}

# Entry fields (PROTOCOL.md, ``changes``).
_PATH, _TYPE, _MODE, _UID, _GID, _SIZE, _MTIME_NS, _LINK = 1, 2, 3, 4, 5, 6, 7, 8
_MAJOR, _MINOR, _XATTRS, _OPAQUE, _IN_IMAGE, _HIDDEN = 9, 10, 11, 12, 13, 14


@dataclass(frozen=True)
class Change:
    """One path the VM changed: ``str(change)`` is ``docker diff``'s ``A /path`` form."""

    path: str
    """Absolute path in the guest."""
    kind: ChangeKind
    """``added`` (not in the image), ``modified`` (in the image, replaced or changed) or
    ``deleted``."""
    type: EntryType | None
    """What the path is now (``None`` when deleted)."""
    size: int = 0
    """Bytes of a regular file."""

    def __str__(self) -> str:
        return f"{_LETTER[self.kind]} {self.path}"


@dataclass(frozen=True)
class Layer:
    """A layer written by :func:`write_layer`."""

    digest: str
    """``sha256:`` of the blob as written (compressed or not): the layer's descriptor digest."""
    diff_id: str
    """``sha256:`` of the uncompressed tar: the image config's ``rootfs.diff_ids`` entry."""
    size: int
    media_type: str
    entries: int
    """Changes in the layer (whiteout and opaque markers included)."""
    path: Path | None = None
    """Where it was written, when given a path."""
    mark: int | None = None
    """The guest agent's mark of this export (asked for with ``keep_mark``): what a later export
    passes as ``since`` to hold only what changed after this one."""


@dataclass
class _Entry:
    parts: tuple[str, ...]
    type: EntryType
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    link: str = ""
    major: int = 0
    minor: int = 0
    xattrs: dict[str, bytes] | None = None
    opaque: bool = False
    in_image: bool = False
    hidden: bool = False

    @property
    def path(self) -> str:
        return "/".join(self.parts)


def _violation(message: str) -> ProtocolError:
    return ProtocolError(f"the guest sent a bad change set: {message}")


def _uint(fields: dict[int, FieldValue], tag: int, name: str, limit: int) -> int:
    value = fields.get(tag, 0)
    if not isinstance(value, int):
        raise _violation(f"field {name} is not an integer")
    if value > limit:
        raise _violation(f"{name} {value} is above {limit}")
    return value


def _raw(fields: dict[int, FieldValue], tag: int, name: str) -> bytes:
    value = fields.get(tag, b"")
    if not isinstance(value, bytes):
        raise _violation(f"field {name} is not bytes")
    return value


class _Validator:
    """Checks each entry against the ones before it: a tree, walked parents first, within bounds."""

    def __init__(self, *, with_data: bool, max_entries: int, max_bytes: int) -> None:
        self.with_data = with_data
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.seen: dict[tuple[str, ...], EntryType] = {}
        self.count = 0
        self.bytes = 0

    def _parts(self, raw: bytes) -> tuple[str, ...]:
        if not raw or len(raw) > DEFAULT_MAX_PATH_BYTES or b"\0" in raw:
            raise _violation(f"path {raw[:80]!r} is empty, too long or holds a NUL")
        names = raw.split(b"/")
        if len(names) > DEFAULT_MAX_DEPTH:
            raise _violation(f"path {raw[:80]!r} is more than {DEFAULT_MAX_DEPTH} levels deep")
        for name in names:
            if name in (b"", b".", b"..") or len(name) > MAX_NAME_BYTES:
                raise _violation(f"path {raw[:80]!r} is not a plain relative path")
        return tuple(os.fsdecode(n) for n in names)

    def _xattrs(self, fields: dict[int, FieldValue]) -> dict[str, bytes] | None:
        items = fields.get(_XATTRS)
        if items is None:
            return None
        if not isinstance(items, list) or len(items) > MAX_XATTRS:
            raise _violation(f"extended attributes are not a list of at most {MAX_XATTRS}")
        if sum(len(i) for i in items) > MAX_XATTR_BYTES:
            raise _violation(f"extended attributes exceed {MAX_XATTR_BYTES} bytes")
        out: dict[str, bytes] = {}
        for item in items:
            name, sep, value = item.partition(b"\0")
            if (
                not sep
                or not name.startswith(_XATTR_NAMESPACES)
                or name.startswith(_OVERLAY_XATTRS)
                or len(name) > MAX_NAME_BYTES
            ):
                raise _violation(f"extended attribute {name[:80]!r} is not allowed in a layer")
            out[os.fsdecode(name)] = value
        return out

    def entry(self, fields: dict[int, FieldValue]) -> _Entry:
        self.count += 1
        if self.count > self.max_entries:
            raise _violation(f"more than {self.max_entries} entries")
        parts = self._parts(_raw(fields, _PATH, "path"))
        code = _uint(fields, _TYPE, "type", len(_TYPES) - 1)
        entry = _Entry(parts, _TYPES[code])
        if parts in self.seen:
            raise _violation(f"{entry.path!r} appears twice")
        parent = parts[:-1]
        if parent and self.seen.get(parent) != "dir":
            raise _violation(f"{entry.path!r} comes before (or without) its directory")
        entry.in_image = bool(_uint(fields, _IN_IMAGE, "in_image", 1))
        entry.hidden = bool(_uint(fields, _HIDDEN, "hidden", 1))
        if entry.hidden and (entry.type != "whiteout" or self.with_data):
            raise _violation(f"{entry.path!r} is marked hidden but is not a listed deletion")
        if entry.type != "whiteout":
            entry.mode = _uint(fields, _MODE, "mode", 0o7777)
            entry.uid = _uint(fields, _UID, "uid", 0xFFFFFFFF)
            entry.gid = _uint(fields, _GID, "gid", 0xFFFFFFFF)
            entry.mtime_ns = _uint(fields, _MTIME_NS, "mtime", 1 << 63)
            entry.xattrs = self._xattrs(fields)
        if entry.type == "file":
            entry.size = _uint(fields, _SIZE, "size", 1 << 62)
            self.bytes += entry.size
            if self.bytes > self.max_bytes:
                raise ExportError(
                    f"the VM's changes hold more than {self.max_bytes} bytes of file data (max_bytes)"
                )
        elif entry.type in ("symlink", "hardlink"):
            link = _raw(fields, _LINK, "link")
            if not link or len(link) > DEFAULT_MAX_PATH_BYTES or b"\0" in link:
                raise _violation(f"the link target of {entry.path!r} is empty, too long or holds a NUL")
            if entry.type == "hardlink":
                target = self._parts(link)
                if self.seen.get(target) != "file":
                    raise _violation(f"{entry.path!r} links to {link[:80]!r}, which is no earlier file")
            entry.link = os.fsdecode(link)
        elif entry.type in ("char", "block"):
            entry.major = _uint(fields, _MAJOR, "major", MAX_DEVICE_NUMBER)
            entry.minor = _uint(fields, _MINOR, "minor", MAX_DEVICE_NUMBER)
        elif entry.type == "dir":
            entry.opaque = bool(_uint(fields, _OPAQUE, "opaque", 1))
        if not entry.hidden:
            self.seen[parts] = entry.type
        return entry


def _entries(
    frames: Iterable[dict[int, FieldValue] | bytes], validator: _Validator
) -> Iterator[tuple[_Entry, Iterator[bytes]]]:
    """Validated entries, each with the iterator of its content chunks (exactly ``size`` bytes;
    the caller must consume it before taking the next entry)."""
    stream = iter(frames)

    def next_item() -> dict[int, FieldValue] | bytes | None:
        return next(stream, None)

    def content(entry: _Entry) -> Iterator[bytes]:
        left = entry.size if validator.with_data and entry.type == "file" else 0
        while left:
            item = next_item()
            if not isinstance(item, bytes):
                raise _violation(f"{entry.path!r} ended {left} bytes short of its size")
            if len(item) > left:
                raise _violation(f"{entry.path!r} has more data than its size")
            left -= len(item)
            yield item

    while (item := next_item()) is not None:
        if isinstance(item, bytes):
            raise _violation("file data outside a file")
        entry = validator.entry(item)
        chunks = content(entry)
        yield entry, chunks
        for _ in chunks:  # whatever the caller left unread
            pass


def list_changes(
    stream: Iterable[dict[int, FieldValue] | bytes], *, max_entries: int = DEFAULT_MAX_ENTRIES
) -> list[Change]:
    """The change rows of a ``changes`` stream taken without data."""
    validator = _Validator(with_data=False, max_entries=max_entries, max_bytes=1 << 62)
    out: list[Change] = []
    for entry, _ in _entries(stream, validator):
        path = "/" + entry.path
        if entry.type == "whiteout":
            out.append(Change(path, "deleted", None))
        else:
            kind: ChangeKind = "modified" if entry.in_image else "added"
            out.append(Change(path, kind, entry.type, entry.size))
    return out


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


class _HashingWriter:
    """Counts and hashes what passes through to ``out``."""

    def __init__(self, out: _Sink) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)

    def flush(self) -> None:
        flush = getattr(self.out, "flush", None)
        if flush is not None:
            flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class _ChunkReader:
    """A file object over an entry's content chunks, for :meth:`tarfile.TarFile.addfile`."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buffer = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buffer) < n:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.buffer += chunk
        if n < 0:
            n = len(self.buffer)
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data


def _tar_info(entry: _Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.path)
    info.type = _TAR_TYPES[entry.type]
    info.mode = entry.mode
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    info.mtime = entry.mtime_ns // 1_000_000_000
    info.size = entry.size if entry.type == "file" else 0
    info.linkname = entry.link
    info.devmajor, info.devminor = entry.major, entry.minor
    info.pax_headers = {
        "SCHILY.xattr." + name: value.decode("utf-8", "surrogateescape")
        for name, value in (entry.xattrs or {}).items()
    }
    return info


def _marker(parts: tuple[str, ...], name: str, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo("/".join((*parts, name)))
    info.mode = 0o644
    info.mtime = mtime
    return info


def _write_tar(stream: Iterable[dict[int, FieldValue] | bytes], out: _Sink, validator: _Validator) -> int:
    entries = 0
    with tarfile.open(fileobj=cast(BinaryIO, out), mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for entry, chunks in _entries(stream, validator):
            if entry.parts[-1].startswith(WHITEOUT_PREFIX):
                raise ExportError(
                    f"/{entry.path} cannot be stored in a layer: names starting with"
                    f" {WHITEOUT_PREFIX!r} mark deletions there"
                )
            mtime = entry.mtime_ns // 1_000_000_000
            if entry.type == "whiteout":
                tar.addfile(_marker(entry.parts[:-1], WHITEOUT_PREFIX + entry.parts[-1], mtime))
            else:
                info = _tar_info(entry)
                tar.addfile(info, _ChunkReader(chunks) if entry.type == "file" else None)
                if entry.opaque:
                    tar.addfile(_marker(entry.parts, OPAQUE_MARKER, mtime))
                    entries += 1
            entries += 1
    return entries


def write_layer(
    stream: Iterable[dict[int, FieldValue] | bytes],
    dest: str | os.PathLike[str] | BinaryIO,
    *,
    compress: bool = True,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_bytes: int,
) -> Layer:
    """Writes the ``changes`` stream (taken with data) as a layer tar, gzip-compressed unless
    ``compress`` is false, to ``dest``: a path (written to a temporary file beside it and renamed
    when complete) or a binary file object. ``max_bytes`` bounds the file data."""
    validator = _Validator(with_data=True, max_entries=max_entries, max_bytes=max_bytes)
    if isinstance(dest, (str, os.PathLike)):
        path = Path(dest)
        tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
        try:
            with open(tmp, "xb") as f:
                layer = _write_stream(stream, f, validator, compress)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return Layer(layer.digest, layer.diff_id, layer.size, layer.media_type, layer.entries, path)
    return _write_stream(stream, dest, validator, compress)


def _write_stream(
    stream: Iterable[dict[int, FieldValue] | bytes], out: BinaryIO, validator: _Validator, compress: bool
) -> Layer:
    blob = _HashingWriter(out)
    if not compress:
        entries = _write_tar(stream, blob, validator)
        return Layer(blob.digest, blob.digest, blob.size, OCI_LAYER_TAR, entries)
    # mtime 0 and no file name in the gzip header: the same changes give the same digest.
    with gzip.GzipFile(fileobj=cast(BinaryIO, blob), mode="wb", mtime=0, filename="") as gz:
        tar_stream = _HashingWriter(gz)
        entries = _write_tar(stream, tar_stream, validator)
    return Layer(blob.digest, tar_stream.digest, blob.size, OCI_LAYER_GZIP, entries)
