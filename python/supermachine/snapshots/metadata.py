"""``metadata.json``: what a snapshot directory holds and what produced it.

A snapshot directory contains ``memory.bin`` (raw guest RAM, page-aligned), ``vmstate.bin`` and this
file. The metadata names the image, the VM shape, the kernel and agent that were booted, the
supermachine version that baked it, when, the base snapshot (for diffs) and the RAM file's size and
blake3 content hash. Loading reports every problem as a one-line :class:`SnapshotMetadataError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from supermachine import __version__
from supermachine.errors import SnapshotMetadataError

METADATA_FILE = "metadata.json"
MEMORY_FILE = "memory.bin"
VMSTATE_FILE = "vmstate.bin"
FORMAT = "supermachine-snapshot"
VERSION = 1
BLAKE3_PREFIX = "blake3:"
SHA256_PREFIX = "sha256:"
_READ_BLOCK = 8 << 20


def blake3_file(path: str | os.PathLike[str]) -> str:
    """``blake3:<hex>`` of a file's content: memory-mapped and hashed on all cores."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if os.path.getsize(path) == 0:
        return BLAKE3_PREFIX + hasher.hexdigest()
    hasher.update_mmap(os.fspath(path))
    return BLAKE3_PREFIX + hasher.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of a file's content, streamed in large blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
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
    ram_size: int
    """Size of ``memory.bin`` in bytes."""
    ram_blake3: str
    """``blake3:<hex>`` of ``memory.bin``."""
    created: float = field(default_factory=time.time)
    """Unix time the snapshot was taken, with sub-second resolution."""
    baked_by_version: str = __version__
    base: str | None = None
    """Directory name of the snapshot this one is a diff against (a sibling in the store)."""
    base_blake3: str | None = None
    """``blake3:<hex>`` of the base's ``memory.bin`` when this snapshot was taken."""
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
            "base": self.base,
            "base_blake3": self.base_blake3,
            "ram": {"size": self.ram_size, "blake3": self.ram_blake3},
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
                f"{source}: unsupported metadata version {version!r} (this supermachine reads {VERSION})"
            )
        p = _Fields(data, source)
        image = p.obj("image")
        kernel = p.obj("kernel")
        agent = p.obj("agent")
        ram = p.obj("ram")
        meta = cls(
            image=ImageIdentity(image.string("ref"), image.string("config_digest")),
            memory_mib=p.positive_int("memory_mib"),
            vcpus=p.positive_int("vcpus"),
            kernel=FileIdentity(kernel.string("path"), kernel.string("sha256")),
            agent=FileIdentity(agent.string("path"), agent.string("sha256")),
            ram_size=ram.non_negative_int("size"),
            ram_blake3=ram.hash("blake3"),
            created=p.time("created"),
            baked_by_version=p.string("baked_by_version"),
            base=p.optional_str("base"),
            base_blake3=p.optional_hash("base_blake3"),
            run=None if data.get("run") is None else p.obj("run").run_defaults(),
        )
        if (meta.base is None) != (meta.base_blake3 is None):
            raise SnapshotMetadataError(f"{source}: 'base' and 'base_blake3' must be set together")
        return meta


class _Fields:
    """Typed access to one JSON object's fields, naming the dotted field path in errors."""

    def __init__(self, data: dict[str, Any], source: str, prefix: str = "") -> None:
        self._data = data
        self._source = source
        self._prefix = prefix

    def _get(self, key: str) -> Any:
        if key not in self._data:
            self._fail(key, "is missing")
        return self._data[key]

    def _fail(self, key: str, problem: str) -> None:
        raise SnapshotMetadataError(f"{self._source}: field '{self._prefix}{key}' {problem}")

    def obj(self, key: str) -> _Fields:
        value = self._get(key)
        if not isinstance(value, dict):
            self._fail(key, "must be an object")
        return _Fields(value, self._source, f"{self._prefix}{key}.")

    def string(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str) or not value:
            self._fail(key, "must be a non-empty string")
        return str(value)

    def optional_str(self, key: str) -> str | None:
        return None if self._data.get(key) is None else self.string(key)

    def optional_strings(self, key: str) -> tuple[str, ...] | None:
        value = self._data.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self._fail(key, "must be a list of strings")
        return tuple(value)

    def run_defaults(self) -> RunDefaults:
        env = self._data.get("env", {})
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            self._fail("env", "must be an object of strings")
        return RunDefaults(
            env=dict(env),
            workdir=self.optional_str("workdir"),
            user=self.optional_str("user"),
            entrypoint=self.optional_strings("entrypoint"),
            cmd=self.optional_strings("cmd"),
            rootfs=self.optional_str("rootfs"),
        )

    def hash(self, key: str) -> str:
        value = self.string(key)
        hexpart = value.removeprefix(BLAKE3_PREFIX)
        if not value.startswith(BLAKE3_PREFIX) or len(hexpart) != 64 or not _is_hex(hexpart):
            self._fail(key, "must be 'blake3:' and 64 hex digits")
        return value

    def optional_hash(self, key: str) -> str | None:
        return None if self._data.get(key) is None else self.hash(key)

    def non_negative_int(self, key: str) -> int:
        value = self._get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            self._fail(key, "must be a non-negative integer")
        return int(value)

    def positive_int(self, key: str) -> int:
        value = self.non_negative_int(key)
        if value == 0:
            self._fail(key, "must be positive")
        return value

    def time(self, key: str) -> float:
        value = self._get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            self._fail(key, "must be a finite number (Unix time)")
        return float(value)


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdef" for c in s)


def ram_identity(snapshot_dir: str | os.PathLike[str]) -> tuple[int, str]:
    """``(size, blake3)`` of a snapshot directory's ``memory.bin``."""
    path = Path(snapshot_dir) / MEMORY_FILE
    try:
        return path.stat().st_size, blake3_file(path)
    except OSError as exc:
        raise SnapshotMetadataError(f"{path}: cannot read RAM file: {exc.strerror or exc}") from None


def describe(
    snapshot_dir: str | os.PathLike[str],
    *,
    image: ImageIdentity,
    memory_mib: int,
    vcpus: int,
    kernel: FileIdentity,
    agent: FileIdentity,
    base: str | None = None,
    created: float | None = None,
    run: RunDefaults | None = None,
) -> SnapshotMetadata:
    """Metadata for a freshly written snapshot directory: hashes its ``memory.bin`` and, for a diff,
    takes the base's content hash from the base's own metadata (a sibling directory named ``base``).
    Call :func:`save` with the result."""
    directory = Path(snapshot_dir)
    size, digest = ram_identity(directory)
    base_blake3 = None if base is None else load(directory.parent / base).ram_blake3
    return SnapshotMetadata(
        image=image,
        memory_mib=memory_mib,
        vcpus=vcpus,
        kernel=kernel,
        agent=agent,
        ram_size=size,
        ram_blake3=digest,
        created=time.time() if created is None else created,
        base=base,
        base_blake3=base_blake3,
        run=run,
    )


def load(snapshot_dir: str | os.PathLike[str]) -> SnapshotMetadata:
    """The metadata of a snapshot directory. Raises :class:`SnapshotMetadataError` (one line)."""
    path = Path(snapshot_dir) / METADATA_FILE
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise SnapshotMetadataError(f"{path}: missing (not a snapshot directory?)") from None
    except OSError as exc:
        raise SnapshotMetadataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except UnicodeDecodeError:
        raise SnapshotMetadataError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise SnapshotMetadataError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    return SnapshotMetadata.from_json(data, str(path))


def save(snapshot_dir: str | os.PathLike[str], meta: SnapshotMetadata) -> Path:
    """Write ``metadata.json`` atomically: a temp file in the same directory, fsync, rename over the
    old file, fsync of the directory. A crash leaves the old metadata or the new, never a mix."""
    directory = Path(snapshot_dir)
    path = directory / METADATA_FILE
    data = meta.to_json()
    SnapshotMetadata.from_json(data, str(path))  # never write what load would refuse
    payload = (json.dumps(data, indent=2) + "\n").encode()
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
