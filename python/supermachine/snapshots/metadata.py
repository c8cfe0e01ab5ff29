"""``metadata.json``: what a snapshot directory holds and what produced it.

A snapshot directory contains ``memory.bin`` (raw guest RAM, page-aligned), ``vmstate.bin`` and this
file. The metadata records only what the VMM does not know: the image, the kernel and agent that
were booted, how commands run in restored VMs, the supermachine version that baked it and when
(plus the VM shape it was asked for, checked against the VM state). What the VMM owns, the memory
identity, the RAM size and for a diff its base and the base's identity, is recorded once, in
``vmstate.bin``: read it with ``_core.snapshot_info(dir)`` and check ``memory.bin`` against it with
:func:`supermachine.snapshots.verify.check_ram`. Loading reports every problem as a one-line
:class:`SnapshotMetadataError`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import blake3

from supermachine import __version__, _core
from supermachine.errors import SnapshotMetadataError

METADATA_FILE = "metadata.json"
MEMORY_FILE = "memory.bin"
VMSTATE_FILE = "vmstate.bin"
FORMAT = "supermachine-snapshot"
VERSION = 2
"""Version 2 dropped ``ram``, ``base`` and ``base_blake3``: the VM state records them."""
BLAKE3_PREFIX = "blake3:"
SHA256_PREFIX = "sha256:"
_READ_BLOCK = 8 << 20

MAX_METADATA_BYTES = 1 << 20
"""Largest ``metadata.json`` read: real ones are a few KiB (the environment is the largest part)."""
MAX_JSON_DEPTH = 8
"""Deepest nesting of arrays and objects accepted in ``metadata.json`` (real ones use 3)."""
MAX_STRING = 4096
"""Longest string field (paths, references, environment entries)."""
MAX_ITEMS = 4096
"""Most entries of a list or object field (``run.env``, ``run.cmd``, ``run.entrypoint``)."""
MAX_VERSION_STRING = 128
MAX_MEMORY_MIB = _core.MAX_MEMORY_MIB  # the VMM's limit
MAX_VCPUS = _core.MAX_VCPUS  # the VMM's limit
MAX_CREATED = 253_402_300_799.0
"""Last second of the year 9999: later times cannot be shown as dates."""


def open_regular(path: str | os.PathLike[str], *, follow_symlinks: bool = False) -> int:
    """Open ``path`` read-only if it is a regular file, and return the descriptor.

    A symlink as the last component is refused unless ``follow_symlinks``, and a FIFO is not waited
    on (``O_NONBLOCK``); the type is checked on the open descriptor, so the file checked is the file
    read. Anything else raises :class:`OSError` (``strerror`` ``not a regular file`` for other
    types)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def blake3_fd(fd: int) -> str:
    """``blake3:<hex>`` of an open file's content from its start, read in large blocks and hashed on
    all cores. Reading (not mapping) keeps a file truncated meanwhile from killing the process."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    buffer = bytearray(_READ_BLOCK)
    view = memoryview(buffer)
    offset = 0
    while n := os.preadv(fd, [buffer], offset):
        hasher.update(view[:n])
        offset += n
    return BLAKE3_PREFIX + hasher.hexdigest()


def blake3_file(path: str | os.PathLike[str]) -> str:
    """``blake3:<hex>`` of a regular file's content (see :func:`blake3_fd`)."""
    fd = open_regular(path)
    try:
        return blake3_fd(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of a regular file's content, streamed in large blocks (a FIFO or device
    raises :class:`OSError` instead of blocking or never ending, see :func:`open_regular`)."""
    digest = hashlib.sha256()
    with os.fdopen(open_regular(path, follow_symlinks=True), "rb") as f:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
    return SHA256_PREFIX + digest.hexdigest()


@dataclass(frozen=True)
class ImageIdentity:
    ref: str
    """The reference the image was asked for by (``alpine:3.20``, ``oci:PATH``, ...)."""
    config_digest: str
    """``sha256:...`` of the image config: what identifies the image's content."""


@dataclass(frozen=True)
class FileIdentity:
    """A host file booted into the VM (kernel, agent): where it was and what it held."""

    path: str
    sha256: str

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileIdentity:
        return cls(os.fspath(path), sha256_file(path))


@dataclass(frozen=True)
class RunDefaults:
    """How commands run in VMs restored from the snapshot, and what the image runs by default."""

    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    rootfs: str | None = None
    """The root filesystem image the VM had (a restore needs it at the same path)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "env": dict(self.env),
            "workdir": self.workdir,
            "user": self.user,
            "entrypoint": None if self.entrypoint is None else list(self.entrypoint),
            "cmd": None if self.cmd is None else list(self.cmd),
            "rootfs": self.rootfs,
        }


@dataclass(frozen=True)
class SnapshotMetadata:
    image: ImageIdentity
    memory_mib: int
    vcpus: int
    kernel: FileIdentity
    agent: FileIdentity
    created: float = field(default_factory=time.time)
    """Unix time the snapshot was taken, with sub-second resolution."""
    baked_by_version: str = __version__
    run: RunDefaults | None = None
    """Command defaults for restored VMs (absent in metadata written by hand or by old tools)."""

    def to_json(self) -> dict[str, Any]:
        out = self._core_json()
        if self.run is not None:
            out["run"] = self.run.to_json()
        return out

    def _core_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "image": {"ref": self.image.ref, "config_digest": self.image.config_digest},
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "kernel": {"path": self.kernel.path, "sha256": self.kernel.sha256},
            "agent": {"path": self.agent.path, "sha256": self.agent.sha256},
            "baked_by_version": self.baked_by_version,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, data: object, source: str = "metadata") -> SnapshotMetadata:
        """Parse and validate; every problem is one :class:`SnapshotMetadataError` line."""
        if not isinstance(data, dict):
            raise SnapshotMetadataError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise SnapshotMetadataError(f"{source}: not supermachine snapshot metadata (format field)")
        version = data.get("version")
        if version != VERSION:
            raise SnapshotMetadataError(
                f"{source}: unsupported metadata version {version!r} (this supermachine reads {VERSION});"
                " the snapshot must be baked again"
            )
        p = _Fields(data, source)
        image = p.obj("image")
        kernel = p.obj("kernel")
        agent = p.obj("agent")
        memory_mib = p.integer("memory_mib", 1, MAX_MEMORY_MIB)
        meta = cls(
            image=ImageIdentity(image.string("ref"), image.string("config_digest")),
            memory_mib=memory_mib,
            vcpus=p.integer("vcpus", 1, MAX_VCPUS),
            kernel=FileIdentity(kernel.string("path"), kernel.digest("sha256", SHA256_PREFIX)),
            agent=FileIdentity(agent.string("path"), agent.digest("sha256", SHA256_PREFIX)),
            created=p.time("created"),
            baked_by_version=p.string("baked_by_version", MAX_VERSION_STRING),
            run=None if data.get("run") is None else p.obj("run").run_defaults(),
        )
        return meta


class _Fields:
    """Typed, bounded access to one JSON object's fields, naming the dotted field path in errors."""

    def __init__(self, data: dict[str, Any], source: str, prefix: str = "") -> None:
        self._data = data
        self._source = source
        self._prefix = prefix

    def _get(self, key: str) -> Any:
        if key not in self._data:
            self._fail(key, "is missing")
        return self._data[key]

    def _fail(self, key: str, problem: str) -> NoReturn:
        raise SnapshotMetadataError(f"{self._source}: field '{self._prefix}{key}' {problem}")

    def obj(self, key: str) -> _Fields:
        value = self._get(key)
        if not isinstance(value, dict):
            self._fail(key, "must be an object")
        return _Fields(value, self._source, f"{self._prefix}{key}.")

    def _check_text(self, key: str, value: object, limit: int, what: str) -> str:
        if not isinstance(value, str) or not value:
            self._fail(key, f"must be {what}")
        if len(value) > limit:
            self._fail(key, f"is longer than {limit} characters")
        if "\0" in value:
            self._fail(key, "must not contain NUL characters")
        return value

    def string(self, key: str, limit: int = MAX_STRING) -> str:
        return self._check_text(key, self._get(key), limit, "a non-empty string")

    def optional_str(self, key: str) -> str | None:
        return None if self._data.get(key) is None else self.string(key)

    def optional_strings(self, key: str) -> tuple[str, ...] | None:
        value = self._data.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            self._fail(key, "must be a list of strings")
        if len(value) > MAX_ITEMS:
            self._fail(key, f"has more than {MAX_ITEMS} entries")
        if not all(isinstance(v, str) for v in value):
            self._fail(key, "must be a list of strings")
        for item in value:
            if len(item) > MAX_STRING or "\0" in item:
                self._fail(key, f"entries must be at most {MAX_STRING} characters, without NUL")
        return tuple(value)

    def run_defaults(self) -> RunDefaults:
        env = self._data.get("env", {})
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            self._fail("env", "must be an object of strings")
        if len(env) > MAX_ITEMS:
            self._fail("env", f"has more than {MAX_ITEMS} entries")
        for name, value in env.items():
            self._check_text("env", name, MAX_STRING, "an object whose names are non-empty strings")
            if "=" in name:
                self._fail("env", f"has a name with '=' in it: {name[:40]!r}")
            if len(value) > MAX_STRING or "\0" in value:
                self._fail("env", f"values must be at most {MAX_STRING} characters, without NUL")
        return RunDefaults(
            env=dict(env),
            workdir=self.optional_str("workdir"),
            user=self.optional_str("user"),
            entrypoint=self.optional_strings("entrypoint"),
            cmd=self.optional_strings("cmd"),
            rootfs=self.optional_str("rootfs"),
        )

    def digest(self, key: str, prefix: str) -> str:
        value = self.string(key)
        hexpart = value.removeprefix(prefix)
        if not value.startswith(prefix) or len(hexpart) != 64 or not _is_hex(hexpart):
            self._fail(key, f"must be '{prefix}' and 64 hex digits")
        return value

    def integer(self, key: str, low: int, high: int) -> int:
        value = self._get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            self._fail(key, "must be an integer")
        if not low <= value <= high:
            self._fail(key, f"must be between {low} and {high}")
        return int(value)

    def time(self, key: str) -> float:
        value = self._get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            self._fail(key, "must be a finite number (Unix time)")
        if not 0 <= value <= MAX_CREATED:
            self._fail(key, f"must be a Unix time between 0 and {MAX_CREATED:.0f}")
        return float(value)


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdef" for c in s)


def load(snapshot_dir: str | os.PathLike[str]) -> SnapshotMetadata:
    """The metadata of a snapshot directory. Raises :class:`SnapshotMetadataError` (one line)."""
    path = Path(snapshot_dir) / METADATA_FILE
    data = parse_json(read_capped(path), str(path))
    return SnapshotMetadata.from_json(data, str(path))


def read_capped(path: Path, limit: int = MAX_METADATA_BYTES) -> bytes:
    """The content of the regular file ``path`` if it is at most ``limit`` bytes; otherwise (or if
    it is missing, a FIFO, a symlink, unreadable) a one-line :class:`SnapshotMetadataError`."""
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        raise SnapshotMetadataError(f"{path}: missing (not a snapshot directory?)") from None
    except OSError as exc:
        why = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot open: {exc.strerror or exc}"
        raise SnapshotMetadataError(f"{path}: {why}") from None
    try:
        if os.fstat(fd).st_size > limit:
            raise SnapshotMetadataError(f"{path}: larger than {limit} bytes (not snapshot metadata)")
        with os.fdopen(os.dup(fd), "rb") as f:
            text = f.read(limit + 1)
    except OSError as exc:
        raise SnapshotMetadataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(text) > limit:
        raise SnapshotMetadataError(f"{path}: larger than {limit} bytes (not snapshot metadata)")
    return text


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def nesting_depth(text: bytes) -> int:
    """The deepest nesting of JSON arrays and objects in ``text`` (brackets inside strings do not
    count). Checked before parsing, so no input can make the parser recurse deeply."""
    brackets = _JSON_STRING.sub(b"", text).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for b in brackets:
        depth = depth + 1 if b in b"[{" else depth - 1
        deepest = max(deepest, depth)
    return deepest


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(text: bytes, source: str, max_depth: int = MAX_JSON_DEPTH) -> object:
    """Parse untrusted JSON: bounded nesting, no ``NaN``/``Infinity``, every failure one
    :class:`SnapshotMetadataError` line naming ``source``."""
    if nesting_depth(text) > max_depth:
        raise SnapshotMetadataError(f"{source}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise SnapshotMetadataError(f"{source}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise SnapshotMetadataError(
            f"{source}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise SnapshotMetadataError(f"{source}: not valid JSON ({exc})") from None


def save(snapshot_dir: str | os.PathLike[str], meta: SnapshotMetadata) -> Path:
    """Write ``metadata.json`` atomically: a temp file in the same directory, fsync, rename over the
    old file, fsync of the directory. A crash leaves the old metadata or the new, never a mix."""
    directory = Path(snapshot_dir)
    path = directory / METADATA_FILE
    data = meta.to_json()
    SnapshotMetadata.from_json(data, str(path))  # never write what load would refuse
    payload = (json.dumps(data, indent=2) + "\n").encode()
    if len(payload) > MAX_METADATA_BYTES:
        raise SnapshotMetadataError(f"{path}: metadata larger than {MAX_METADATA_BYTES} bytes")
    fd, tmp = tempfile.mkstemp(prefix=f".{METADATA_FILE}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    return path


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make renames and unlinks in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
