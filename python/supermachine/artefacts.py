"""Where the guest kernel and agent come from, and the copies a wheel carries.

A wheel (``make wheel``, ``pip install .``) carries the ``vmlinux`` of each kernel profile and the
static guest agent, zstd-compressed, in ``supermachine/guest/`` with a ``manifest.json`` naming each
file's SHA-256 and size. On first use each is decompressed into the user cache under its content
hash (``<cache>/packaged/<sha256>/<name>``) and checked against the manifest, so a damaged wheel
fails with one line naming the file instead of booting a broken kernel.

Which source wins, most specific first:

1. ``SUPERMACHINE_GUEST_DIR``: the recipes in that directory, built into the cache on demand
   (an explicit ``VmConfig(kernel=...)`` / ``--kernel`` wins over all of these for the kernel);
2. the source checkout this package is imported from (``guest/`` beside ``python/``): its recipes,
   so a developer's edits to the kernel config or the agent take effect;
3. the packaged copies, for an installed wheel (no checkout, no compiler needed).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zstandard

from supermachine import paths
from supermachine.errors import AgentBuildError, KernelError

__all__ = [
    "MANIFEST_VERSION",
    "PackagedFile",
    "Source",
    "checkout_guest_dir",
    "guest_source",
    "is_packaged",
    "manifest",
    "packaged_dir",
    "recipe_root",
    "sha256_file",
    "unpacked",
    "unpacked_path",
]

Source = Literal["override", "checkout", "packaged"]
"""``override``: ``SUPERMACHINE_GUEST_DIR``; ``checkout``: the source checkout's ``guest/``;
``packaged``: the copies inside the installed wheel."""

#: The layout of ``manifest.json``; the wheel build script writes the same number.
MANIFEST_VERSION = 1
# A manifest is a few hundred bytes; anything far larger is not one.
_MANIFEST_MAX_BYTES = 64 << 10
# No packaged artefact is near this size (a vmlinux is ~15 MiB); bounds a hostile manifest.
_ARTEFACT_MAX_BYTES = 512 << 20
_CHUNK = 1 << 20

# Checked cache entries of this process: (path, size, mtime_ns, inode) -> sha256.
_verified: dict[tuple[str, int, int, int], str] = {}


@dataclass(frozen=True)
class PackagedFile:
    """One artefact of the wheel, as its manifest describes it."""

    name: str
    """``vmlinux-<profile>`` (one per kernel profile) or ``supermachine-agent``."""
    file: Path
    """The compressed file inside the installed package."""
    sha256: str
    """Of the decompressed content."""
    size: int
    """Of the decompressed content, in bytes."""
    recipe_key: str
    """The input key of the recipe build it came from (the name of its cache entry)."""


def packaged_dir() -> Path:
    """The directory of packaged guest artefacts inside the installed package."""
    return Path(__file__).resolve().parent / "guest"


def checkout_guest_dir() -> Path | None:
    """The ``guest/`` directory of the source checkout this package is imported from, if any."""
    # python/supermachine/artefacts.py -> the repository root is two levels above the package.
    found = Path(__file__).resolve().parents[2] / "guest"
    return found if (found / "kernel" / "build.sh").is_file() else None


def guest_source() -> tuple[Source, Path] | None:
    """Where guest artefacts come from (see the module's docstring), with the directory: the
    ``guest/`` recipe directory for ``override`` and ``checkout``, :func:`packaged_dir` for
    ``packaged``. ``None`` when there is neither a checkout nor a packaged copy."""
    override = os.environ.get("SUPERMACHINE_GUEST_DIR")
    if override:
        return "override", Path(override)
    checkout = checkout_guest_dir()
    if checkout is not None:
        return "checkout", checkout
    if (packaged_dir() / "manifest.json").is_file():
        return "packaged", packaged_dir()
    return None


def is_packaged() -> bool:
    """Whether guest artefacts come from the copies this installed wheel carries."""
    source = guest_source()
    return source is not None and source[0] == "packaged"


def recipe_root(part: str, error: type[KernelError] | type[AgentBuildError], packaged: str) -> Path:
    """The ``guest/`` recipe directory whose ``part/build.sh`` builds an artefact: the override's
    (which must have it) or the source checkout's. Raises ``error`` when there is neither
    (``packaged`` names what a wheel would carry instead, for the message)."""
    source = guest_source()
    if source is not None and source[0] == "override":
        if not (source[1] / part / "build.sh").is_file():
            raise error(f"SUPERMACHINE_GUEST_DIR={source[1]} has no {part}/build.sh")
        return source[1]
    if source is not None and source[0] == "checkout":
        return source[1]
    raise error(
        f"no guest {part} recipe: this supermachine is neither a source checkout nor carries {packaged};"
        " install it from a wheel built with `make wheel`, or set SUPERMACHINE_GUEST_DIR"
    )


def _error(name: str) -> type[KernelError] | type[AgentBuildError]:
    return KernelError if name.startswith("vmlinux") else AgentBuildError


def manifest() -> dict[str, PackagedFile]:
    """The packaged artefacts by name; empty when this package carries none."""
    path = packaged_dir() / "manifest.json"
    try:
        with path.open("rb") as f:
            raw = f.read(_MANIFEST_MAX_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise KernelError(f"cannot read {path}: {e.strerror}") from None
    try:
        if len(raw) > _MANIFEST_MAX_BYTES:
            raise ValueError("too large")
        doc = json.loads(raw)
        if doc["version"] != MANIFEST_VERSION:
            raise ValueError(f"version {doc['version']}, expected {MANIFEST_VERSION}")
        out: dict[str, PackagedFile] = {}
        for name, entry in doc["artefacts"].items():
            file = str(entry["file"])
            sha = str(entry["sha256"])
            size = int(entry["size"])
            if "/" in file or file.startswith(".") or len(sha) != 64 or not 0 < size <= _ARTEFACT_MAX_BYTES:
                raise ValueError(f"bad entry {name!r}")
            int(sha, 16)
            out[str(name)] = PackagedFile(str(name), path.parent / file, sha, size, str(entry["recipe"]))
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise KernelError(f"{path} is not a valid manifest ({e}): reinstall supermachine") from None


def _entry(name: str) -> PackagedFile:
    found = manifest().get(name)
    if found is None:
        raise _error(name)(
            f"this supermachine carries no packaged {name} ({packaged_dir()}/manifest.json): "
            "reinstall it from a complete wheel, or set SUPERMACHINE_GUEST_DIR to a guest/ source directory"
        )
    return found


def unpacked_path(name: str) -> Path:
    """Where the packaged artefact ``name`` is (or would be) decompressed. Never unpacks."""
    entry = _entry(name)
    return paths.cache_dir() / "packaged" / entry.sha256[:32] / name


def sha256_file(path: Path, limit: int = _ARTEFACT_MAX_BYTES) -> str:
    """The SHA-256 of a file's content, read in bounded chunks (at most ``limit`` bytes)."""
    digest = hashlib.sha256()
    total = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            total += len(chunk)
            if total > limit:
                raise ValueError(f"{path} is larger than {limit} bytes")
            digest.update(chunk)
    return digest.hexdigest()


def _cached_ok(path: Path, sha256: str) -> bool:
    """Whether the cache entry ``path`` holds the content ``sha256`` (hashed once per process)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if _verified.get(key) == sha256:
        return True
    try:
        ok = sha256_file(path) == sha256
    except (OSError, ValueError):
        ok = False
    if ok:
        _verified[key] = sha256
    return ok


def _decompress(entry: PackagedFile, dest: Path) -> None:
    """Decompresses ``entry`` into a temporary file beside ``dest``, checks its size and SHA-256,
    and renames it into place."""
    fail = _error(entry.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        digest = hashlib.sha256()
        total = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with entry.file.open("rb") as src, zstandard.ZstdDecompressor().stream_reader(src) as reader:
                    while chunk := reader.read(_CHUNK):
                        total += len(chunk)
                        if total > entry.size:
                            break
                        digest.update(chunk)
                        out.write(chunk)
            except zstandard.ZstdError as e:
                raise fail(f"packaged file {entry.file} is corrupt ({e}): reinstall supermachine") from None
            except FileNotFoundError:
                raise fail(f"packaged file {entry.file} is missing: reinstall supermachine") from None
        if total != entry.size or digest.hexdigest() != entry.sha256:
            got = "too large" if total > entry.size else f"{total} bytes, sha256 {digest.hexdigest()[:16]}"
            raise fail(
                f"packaged file {entry.file} is corrupt ({got}; expected {entry.size} bytes, "
                f"sha256 {entry.sha256[:16]}): reinstall supermachine"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except OSError as e:
        raise fail(f"cannot unpack {entry.file} into {dest.parent}: {e.strerror}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def unpacked(name: str) -> Path:
    """The packaged artefact ``name`` decompressed into the user cache, unpacking it first if the
    cache has no intact copy (a damaged cache entry is replaced). Raises :class:`KernelError` (or
    :class:`AgentBuildError` for the agent) naming the packaged file when it is damaged."""
    entry = _entry(name)
    dest = unpacked_path(name)
    if _cached_ok(dest, entry.sha256):
        return dest
    _decompress(entry, dest)
    st = dest.stat()
    _verified[(str(dest), st.st_size, st.st_mtime_ns, st.st_ino)] = entry.sha256
    return dest
