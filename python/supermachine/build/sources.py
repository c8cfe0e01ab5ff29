"""What COPY and ADD read: files of the build context or of an earlier stage's root file system.

A :class:`SourceTree` is a host directory a build reads from. The context is the user's; a stage
tree was built by :func:`supermachine.oci.build_rootfs` from layers an attacker may have written.
So a source path is resolved beneath the tree's root one component at a time, a symbolic link is
followed as a container would see it (absolute targets are relative to the root, ``..`` stops at
the root), the walk below it never follows a link, and files are opened with ``O_NOFOLLOW``. Paths
that ``.dockerignore`` excludes do not exist for the build.

The selected files become a :class:`CopyPlan`: tar entries named by their destination in the guest,
with the owner and mode the instruction asks for. Its :meth:`~CopyPlan.digest` (names, types,
modes, owners and content, not times) is the step's cache input; :meth:`~CopyPlan.write_tar`
streams the tar the build VM unpacks (``put_archive``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from supermachine.build.ignore import IgnoreRules
from supermachine.errors import InputError

#: Symbolic links followed while resolving one source path (as Linux's ELOOP limit).
MAX_SYMLINK_HOPS = 40
#: Entries one COPY or ADD may take.
MAX_COPY_ENTRIES = 1_000_000
_GLOB_CHARS = frozenset("*?[")


class SourceError(InputError):
    """A COPY or ADD source is missing, excluded or outside its tree."""


@dataclass(frozen=True)
class CopyItem:
    """One tar entry of a COPY: where it goes in the guest and what it is."""

    dest: str
    """Path in the guest, relative to ``/``."""
    kind: str
    """``file``, ``dir`` or ``symlink``."""
    mode: int
    uid: int
    gid: int
    mtime: int
    source: Path | None = None
    """The host file to read (regular files)."""
    link: str = ""
    size: int = 0


def _clean(path: str) -> str:
    """``path`` relative to a root: normalised, without a leading ``/``; ``..`` stops at the root."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


class SourceTree:
    """A host directory a build reads sources from (see the module docstring)."""

    def __init__(self, root: Path, what: str, ignore: IgnoreRules | None = None) -> None:
        self.root = root
        self.what = what
        self.ignore = ignore

    def _excluded(self, rel: str) -> bool:
        return self.ignore is not None and rel != "" and self.ignore.excluded(rel)

    def resolve(self, rel: str) -> tuple[str, os.stat_result] | None:
        """The real path (beneath the root, no link in it) that ``rel`` names, following links as
        a container would, and what it is; ``None`` if it does not exist."""
        todo = [p for p in rel.split("/") if p not in ("", ".")]
        done: list[str] = []
        hops = 0
        while todo:
            part = todo.pop(0)
            if part == "..":
                if done:
                    done.pop()
                continue
            candidate = "/".join([*done, part])
            try:
                st = os.lstat(self.root / candidate)
            except (FileNotFoundError, NotADirectoryError):
                return None
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise SourceError(f"too many symbolic links resolving {rel!r} in {self.what}")
                target = os.readlink(self.root / candidate)
                if target.startswith("/"):
                    done = []
                todo = [p for p in target.split("/") if p not in ("", ".")] + todo
                continue
            if todo and not stat.S_ISDIR(st.st_mode):
                return None
            done.append(part)
        real = "/".join(done)
        return real, os.lstat(self.root / real) if real else os.lstat(self.root)

    def select(self, pattern: str, where: str) -> list[str]:
        """The paths ``pattern`` names (a path or a glob, relative to the root), as real paths."""
        cleaned = _clean(pattern)
        if not any(c in _GLOB_CHARS for c in cleaned):
            found = self.resolve(cleaned)
            if found is None or self._excluded(cleaned) or self._excluded(found[0]):
                raise SourceError(f"{where}: {pattern!r} does not exist in {self.what}")
            return [found[0]]
        parts = cleaned.split("/")
        matches = [rel for rel in self._glob(parts) if not self._excluded(rel)]
        if not matches:
            raise SourceError(f"{where}: no file in {self.what} matches {pattern!r}")
        out = []
        for rel in sorted(matches):
            found = self.resolve(rel)
            if found is not None:
                out.append(found[0])
        return out

    def _glob(self, parts: list[str], base: str = "") -> Iterator[str]:
        head, rest = parts[0], parts[1:]
        directory = self.root / base if base else self.root
        try:
            names = sorted(os.listdir(directory))
        except (NotADirectoryError, FileNotFoundError):
            return
        for name in names:
            if not fnmatch.fnmatchcase(name, head):
                continue
            rel = f"{base}/{name}" if base else name
            if not rest:
                yield rel
            elif stat.S_ISDIR(os.lstat(self.root / rel).st_mode):
                yield from self._glob(rest, rel)

    def walk(self, rel: str) -> Iterator[tuple[str, os.stat_result]]:
        """Every entry beneath the real directory ``rel`` (not ``rel`` itself), parents first,
        names sorted, never through a symbolic link, without what ``.dockerignore`` excludes."""
        stack = [rel]
        while stack:
            current = stack.pop()
            directory = self.root / current if current else self.root
            entries = []
            for name in sorted(os.listdir(directory)):
                child = f"{current}/{name}" if current else name
                st = os.lstat(self.root / child)
                if self._excluded(child) and not (
                    stat.S_ISDIR(st.st_mode)
                    and self.ignore is not None
                    and self.ignore.may_include_below(child)
                ):
                    continue
                entries.append((child, st))
            subdirs = []
            for child, st in entries:
                if not self._excluded(child):
                    yield child, st
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(child)
            stack.extend(reversed(subdirs))


@dataclass
class CopyPlan:
    """The tar entries of one COPY or ADD (of files; archives ADD unpacks go separately)."""

    items: list[CopyItem] = field(default_factory=list)

    def add(self, item: CopyItem) -> None:
        if len(self.items) >= MAX_COPY_ENTRIES:
            raise SourceError(f"more than {MAX_COPY_ENTRIES} files in one COPY")
        self.items.append(item)

    def digest(self) -> str:
        """What the step's cache key takes from its sources: every entry's name, type, mode,
        owner, link target and content hash (times are left out, as docker's cache does)."""
        h = hashlib.sha256()
        for item in self.items:
            content = _file_hash(item.source) if item.kind == "file" and item.source is not None else ""
            row = [item.dest, item.kind, item.mode, item.uid, item.gid, item.link, content]
            h.update(json.dumps(row).encode() + b"\n")
        return "sha256:" + h.hexdigest()

    def write_tar(self, out: BinaryIO) -> None:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for item in self.items:
                info = tarfile.TarInfo(item.dest)
                info.mode, info.uid, info.gid, info.mtime = item.mode, item.uid, item.gid, item.mtime
                info.uname = info.gname = ""
                if item.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif item.kind == "symlink":
                    info.type = tarfile.SYMTYPE
                    info.linkname = item.link
                    tar.addfile(info)
                else:
                    assert item.source is not None
                    with _open_regular(item.source) as f:
                        info.size = os.fstat(f.fileno()).st_size
                        tar.addfile(info, f)


def _open_regular(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SourceError(f"{path} is no longer a regular file")
    return os.fdopen(fd, "rb")


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with _open_regular(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def plan_copy(
    plan: CopyPlan,
    tree: SourceTree,
    rel: str,
    st: os.stat_result,
    dest: str,
    *,
    owner: tuple[int, int] | None,
    chmod: int | None,
    dest_exists_as_dir: bool,
) -> None:
    """Adds the source ``rel`` (a real path in ``tree``) copied to ``dest`` (the guest path the
    file becomes, or the directory a directory's contents go into) to ``plan``."""
    uid, gid = owner if owner is not None else (0, 0)
    target = _clean(dest)

    def item(name: str, s: os.stat_result, source_rel: str) -> CopyItem:
        mode = chmod if chmod is not None else stat.S_IMODE(s.st_mode)
        if stat.S_ISDIR(s.st_mode):
            return CopyItem(name, "dir", mode, uid, gid, int(s.st_mtime))
        if stat.S_ISLNK(s.st_mode):
            link = os.readlink(tree.root / source_rel)
            return CopyItem(name, "symlink", 0o777, uid, gid, int(s.st_mtime), link=link)
        return CopyItem(name, "file", mode, uid, gid, int(s.st_mtime), tree.root / source_rel, size=s.st_size)

    if not stat.S_ISDIR(st.st_mode):
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise SourceError(f"{rel!r} in {tree.what} is neither a file nor a directory")
        plan.add(item(target, st, rel))
        return
    if not dest_exists_as_dir and target:
        # The directory a directory's contents go into: made with the instruction's owner.
        plan.add(CopyItem(target, "dir", 0o755, uid, gid, int(st.st_mtime)))
    for child, child_st in tree.walk(rel):
        if not (
            stat.S_ISDIR(child_st.st_mode) or stat.S_ISREG(child_st.st_mode) or stat.S_ISLNK(child_st.st_mode)
        ):
            continue  # sockets, FIFOs and devices of a context are not copied
        name = posixpath.join(target, child[len(rel) :].lstrip("/")) if rel else posixpath.join(target, child)
        plan.add(item(name.lstrip("/"), child_st, child))
