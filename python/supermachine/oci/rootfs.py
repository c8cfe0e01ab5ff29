"""Root filesystems: apply an image's layers to a directory, and pack it into a squashfs image.

Layers are tar streams (uncompressed, gzip or zstd; detected from their first bytes, not from the
media type). Entries are applied in order with OCI whiteout semantics: ``.wh.<name>`` deletes
``<name>`` from lower layers and ``.wh..wh..opq`` empties its directory of lower-layer content.
Ownership, modes, xattrs, device nodes and hard links are reproduced (this needs root).

Safety: an entry with an absolute name or a ``..`` component is refused, and so is one whose
parent directories lead outside the root through a symlink. Symlinks inside the root are resolved
as a container would see them (absolute targets are relative to the image root). Nothing is ever
written through a symlink in the final path component: existing entries are replaced, not followed.
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
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from supermachine.errors import DigestMismatchError, LayerError, RootfsError, UnsafeLayerError
from supermachine.oci.image import Image
from supermachine.oci.store import file_lock, fsync_dir, hex_of

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_MAX_SYMLINK_HOPS = 40


class _HashingReader:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
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
def open_layer(raw: IO[bytes]) -> Iterator[IO[bytes]]:
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
        raise LayerError("bzip2-compressed layers are not supported")
    else:
        yield peek


def _check_name(name: str, what: str, kind: str = "entry") -> list[str]:
    if name.startswith("/"):
        raise UnsafeLayerError(f"{what}: {kind} {name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayerError(f"{what}: {kind} {name!r} contains '..'")
    return parts


class _Applier:
    """Applies tar entries of one layer onto ``root``."""

    def __init__(self, root: Path, what: str, dir_times: dict[str, int]) -> None:
        self.root = str(root)
        self.what = what
        self.created: set[str] = set()  # paths (relative, resolved) this layer has put in place
        self.dir_times = dir_times
        self.privileged = os.geteuid() == 0

    # -- path resolution -------------------------------------------------------------------------
    def _resolve_dir(self, parts: list[str], name: str, *, create: bool) -> list[str] | None:
        """Resolve directory components inside the root, following in-root symlinks.

        Returns the resolved components, or ``None`` if a component is missing and ``create`` is False.
        """
        resolved: list[str] = []
        queue = list(parts)
        hops = 0
        while queue:
            comp = queue.pop(0)
            if comp in ("", "."):
                continue
            if comp == "..":
                if not resolved:
                    raise UnsafeLayerError(
                        f"{self.what}: entry {name!r} resolves outside the root through a symlink"
                    )
                resolved.pop()
                continue
            path = os.path.join(self.root, *resolved, comp)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    return None
                os.mkdir(path, 0o755)
                self.created.add("/".join([*resolved, comp]))
                resolved.append(comp)
                continue
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise UnsafeLayerError(f"{self.what}: entry {name!r}: too many levels of symlinks")
                target = os.readlink(path)
                if target.startswith("/"):
                    resolved = []
                queue = target.split("/") + queue
            elif stat.S_ISDIR(st.st_mode):
                resolved.append(comp)
            else:
                raise LayerError(
                    f"{self.what}: entry {name!r}: {'/'.join([*resolved, comp])!r} is not a directory"
                )
        return resolved

    def _remove(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)

    # -- entries ---------------------------------------------------------------------------------
    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = _check_name(member.name, self.what)
        if not parts:  # the root directory itself
            self._metadata(self.root, member)
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, member.name)
            return
        parent = self._resolve_dir(parts[:-1], member.name, create=True)
        assert parent is not None
        rel = "/".join([*parent, base])
        dest = os.path.join(self.root, rel)
        try:
            existing = os.lstat(dest)
        except FileNotFoundError:
            existing = None
        if existing is not None and not (member.isdir() and stat.S_ISDIR(existing.st_mode)):
            self._remove(dest)
        if member.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                os.mkdir(dest, 0o700)
        elif member.isreg():
            src = tar.extractfile(member)
            assert src is not None
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        elif member.issym():
            os.symlink(member.linkname, dest)
        elif member.islnk():
            self._hardlink(member, dest)
            self.created.add(rel)
            return  # a hard link shares its target's inode and metadata
        elif member.ischr() or member.isblk():
            if not self.privileged:
                return  # device nodes need root; skip them in unprivileged builds
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(dest, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mkfifo(dest, 0o600)
        else:
            raise LayerError(f"{self.what}: entry {member.name!r} has unsupported tar type {member.type!r}")
        self.created.add(rel)
        self._metadata(dest, member)

    def _hardlink(self, member: tarfile.TarInfo, dest: str) -> None:
        parts = _check_name(member.linkname, self.what, "hard link target")
        if not parts:
            raise UnsafeLayerError(f"{self.what}: hard link {member.name!r} points at the root directory")
        parent = self._resolve_dir(parts[:-1], member.linkname, create=False)
        target = os.path.join(self.root, *(parent or []), parts[-1])
        if parent is None or not os.path.lexists(target):
            raise LayerError(f"{self.what}: hard link {member.name!r} points at missing {member.linkname!r}")
        if stat.S_ISDIR(os.lstat(target).st_mode):
            raise LayerError(f"{self.what}: hard link {member.name!r} points at a directory")
        os.link(target, dest, follow_symlinks=False)

    def _whiteout(self, parts: list[str], name: str) -> None:
        base = parts[-1]
        if base[len(WHITEOUT_PREFIX) :] in ("", ".", ".."):
            raise UnsafeLayerError(f"{self.what}: whiteout {name!r} names no file")
        parent = self._resolve_dir(parts[:-1], name, create=False)
        if parent is None:
            return
        parent_path = os.path.join(self.root, *parent)
        if base == OPAQUE_MARKER:
            for entry in os.listdir(parent_path):
                if "/".join([*parent, entry]) not in self.created:
                    self._remove(os.path.join(parent_path, entry))
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other AUFS metadata (.wh..wh.plnk, ...): not content
        victim = base[len(WHITEOUT_PREFIX) :]
        if "/".join([*parent, victim]) not in self.created:
            self._remove(os.path.join(parent_path, victim))

    def _metadata(self, path: str, member: tarfile.TarInfo) -> None:
        is_link = member.issym()
        if self.privileged:
            os.chown(path, member.uid, member.gid, follow_symlinks=False)
        if not is_link:
            os.chmod(path, member.mode & 0o7777)
        for key, value in member.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                try:
                    os.setxattr(
                        path, key[13:], value.encode("utf-8", "surrogateescape"), follow_symlinks=False
                    )
                except OSError as exc:
                    if self.privileged and exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                        raise LayerError(
                            f"{self.what}: cannot set xattr {key[13:]} on {member.name!r}: {exc.strerror}"
                        ) from None
        mtime_ns = int(member.mtime * 1_000_000_000)
        if member.isdir():
            self.dir_times[path] = mtime_ns
        else:
            os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def apply_layer(
    root: Path,
    blob: IO[bytes],
    *,
    what: str = "layer",
    diff_id: str | None = None,
    dir_times: dict[str, int] | None = None,
) -> None:
    """Apply one layer (a possibly compressed tar stream) to the directory ``root``.

    If ``diff_id`` is given, the uncompressed stream must hash to it. Directory mtimes are collected
    in ``dir_times`` (path → ns) so the caller can set them after the last layer; without it they
    are set when the layer is done.
    """
    times: dict[str, int] = {} if dir_times is None else dir_times
    applier = _Applier(root, what, times)
    try:
        with open_layer(blob) as plain:
            hashing = _HashingReader(plain)
            with tarfile.open(fileobj=hashing, mode="r|", errors="surrogateescape") as tar:  # type: ignore[call-overload]
                for member in tar:
                    applier.apply(tar, member)
            hashing.drain()
    except (tarfile.TarError, EOFError, zstandard.ZstdError, lzma.LZMAError, gzip.BadGzipFile) as exc:
        raise LayerError(f"{what} is not a valid tar stream: {' '.join(str(exc).split())}") from None
    except OSError as exc:
        raise LayerError(f"{what}: {exc.strerror or exc} ({exc.filename or ''})") from None
    if diff_id is not None:
        actual = f"sha256:{hashing.hash.hexdigest()}"
        if actual != diff_id:
            raise DigestMismatchError(
                f"{what}: uncompressed content has digest {actual}, the config says {diff_id}"
            )
    if dir_times is None:
        _set_dir_times(times)


def _set_dir_times(times: dict[str, int]) -> None:
    for path in sorted(times, key=len, reverse=True):
        with contextlib.suppress(FileNotFoundError):
            os.utime(path, ns=(times[path], times[path]), follow_symlinks=False)


def build_rootfs(image: Image, dest: Path) -> Path:
    """Apply every layer of ``image`` in order into the (new or empty) directory ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise RootfsError(f"{dest} is not empty")
    os.chmod(dest, 0o755)
    times: dict[str, int] = {}
    diff_ids = image.config.diff_ids
    for i, layer in enumerate(image.layers):
        what = f"layer {i + 1}/{len(image.layers)} ({layer.digest})"
        with image.store.blobs.open(layer.digest) as blob:
            apply_layer(dest, blob, what=what, diff_id=diff_ids[i] if diff_ids else None, dir_times=times)
    _set_dir_times(times)
    return dest


def mksquashfs(tree: Path, out: Path, *, compression: str = "gzip", processors: int | None = None) -> None:
    """Run ``mksquashfs`` on ``tree`` (ownership, modes and xattrs kept) writing ``out``."""
    exe = shutil.which("mksquashfs")
    if exe is None:
        raise RootfsError("mksquashfs not found; install squashfs-tools")
    cmd = [exe, str(tree), str(out), "-noappend", "-no-progress", "-quiet", "-comp", compression]
    if processors:
        cmd += ["-processors", str(processors)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = " ".join((proc.stderr or proc.stdout).split())[-300:]
        raise RootfsError(f"mksquashfs failed with exit code {proc.returncode}: {detail}")


def build_squashfs(
    image: Image, *, compression: str = "gzip", processors: int | None = None, force: bool = False
) -> Path:
    """The read-only squashfs root filesystem of ``image``, built once and cached by config digest."""
    store = image.store
    out = store.rootfs_path(image.config_digest)
    with store.using(), file_lock(store.locks / f"rootfs-{hex_of(image.config_digest)}.lock"):
        if out.exists() and not force:
            return out
        store.tmp_dir.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(6)
        tree = store.tmp_dir / f"rootfs-{hex_of(image.config_digest)[:12]}-{token}"
        tmp_out = out.with_name(f".{out.name}.tmp-{token}")
        try:
            build_rootfs(image, tree)
            mksquashfs(tree, tmp_out, compression=compression, processors=processors)
            with open(tmp_out, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp_out, out)
            fsync_dir(out.parent)
        finally:
            tmp_out.unlink(missing_ok=True)
            if tree.exists():
                shutil.rmtree(tree, ignore_errors=True)
    return out
