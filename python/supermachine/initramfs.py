"""The guest's initramfs: an uncompressed newc cpio whose ``/init`` is the static guest agent.

The agent (``guest/agent``) is built by its recipe ``guest/agent/build.sh``, which owns the cache key
of the binary; an installed wheel carries it instead (:mod:`supermachine.artefacts`). The initramfs
is cached next to it, keyed by the SHA-256 of the agent binary and the layout version of this
module, under ``<cache>/initramfs/<key>/initramfs.cpio``. The archive is
reproducible: the same agent binary always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from supermachine import artefacts, paths
from supermachine.errors import AgentBuildError

__all__ = [
    "CpioEntry",
    "agent_build_script",
    "agent_path",
    "cached_agent_path",
    "initramfs_entries",
    "initramfs_path",
    "newc_archive",
]

#: The agent's name among the packaged artefacts (and the binary's name).
AGENT = "supermachine-agent"
#: Bump when the archive's layout changes, so cached archives are rebuilt.
LAYOUT_VERSION = 1
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc archive: a path without leading ``/``, a full ``st_mode`` and content."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """An uncompressed ``newc`` (SVR4, no checksum) cpio archive, as the kernel unpacks it.

    Owners are root, modification times 0 and inode numbers count up from 1 in the given order, so
    the output depends only on the entries.
    """
    out = bytearray()
    members = [*entries, CpioEntry(_TRAILER, 0)]
    for ino, entry in enumerate(members, start=1):
        trailer = entry.name == _TRAILER
        if not trailer and (not entry.name or entry.name.startswith("/") or "\0" in entry.name):
            raise AgentBuildError(f"invalid initramfs member name {entry.name!r}")
        name = entry.name.encode() + b"\0"
        fields = (
            0 if trailer else ino,
            entry.mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
            0,  # mtime
            len(entry.data),
            0,  # devmajor
            0,  # devminor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check
        )
        out += b"070701" + b"".join(b"%08x" % value for value in fields)
        out += name
        out += _pad4(len(out))
        out += entry.data
        out += _pad4(len(out))
    return bytes(out)


def initramfs_entries(agent: bytes) -> list[CpioEntry]:
    """The members of the initramfs around the agent binary ``agent``.

    Mount points exist up front so that the agent (which runs while every system call may be
    emulated) does not have to create them; ``/dev/console`` lets the kernel open the console as the
    agent's stdin/stdout/stderr.
    """
    directory = stat.S_IFDIR
    return [
        CpioEntry("dev", directory | 0o755),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("mnt", directory | 0o755),
        CpioEntry("mnt/lower", directory | 0o755),
        CpioEntry("mnt/root", directory | 0o755),
        CpioEntry("mnt/rw", directory | 0o755),
        CpioEntry("proc", directory | 0o555),
        CpioEntry("root", directory | 0o700),
        CpioEntry("run", directory | 0o755),
        CpioEntry("sys", directory | 0o555),
        CpioEntry("tmp", directory | 0o1777),
        CpioEntry("init", stat.S_IFREG | 0o755, agent),
    ]


def _agent_dir() -> Path:
    return artefacts.recipe_root("agent", AgentBuildError, "a packaged agent") / "agent"


def agent_build_script() -> Path:
    """The agent's build recipe, ``guest/agent/build.sh``."""
    return _agent_dir() / "build.sh"


def _run_recipe(*args: str, stream_stderr: bool) -> Path:
    bash = shutil.which("bash")
    if bash is None:
        raise AgentBuildError("bash not found: the guest agent recipe is a bash script")
    env = dict(os.environ)
    env["SUPERMACHINE_CACHE_DIR"] = str(paths.cache_dir())
    result = subprocess.run(
        [bash, str(agent_build_script()), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=None if stream_stderr else subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or "").splitlines() if line.strip()]
        message = lines[-1] if lines else f"guest agent recipe failed with exit status {result.returncode}"
        raise AgentBuildError(message.removeprefix("build.sh: error: "))
    printed = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if not printed:
        raise AgentBuildError("guest agent recipe printed no path")
    return Path(printed[-1])


def cached_agent_path() -> Path:
    """Where the agent binary for the current sources is (or would be) cached. Never builds.

    For an installed wheel: where its packaged agent is (or would be) unpacked.
    """
    if artefacts.is_packaged():
        return artefacts.unpacked_path(AGENT)
    return _run_recipe("--print-path", stream_stderr=False)


def agent_path(build: bool = True) -> Path:
    """The static agent binary for the current sources, built with ``build.sh`` when missing.

    A first build takes about ten seconds (cargo's output goes to stderr). With ``build`` false a
    missing binary raises :class:`AgentBuildError`. An installed wheel's packaged agent is
    unpacked instead (checked against its SHA-256).
    """
    if artefacts.is_packaged():
        return artefacts.unpacked(AGENT)
    path = cached_agent_path()
    if path.is_file():
        return path
    if not build:
        raise AgentBuildError(f"guest agent is not built yet (expected {path}); run {agent_build_script()}")
    sys.stderr.flush()
    built = _run_recipe(stream_stderr=True)
    if not built.is_file():
        raise AgentBuildError(f"guest agent recipe reported {built}, which does not exist")
    return built


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def initramfs_path(build: bool = True) -> Path:
    """The cached initramfs (uncompressed newc cpio) whose ``/init`` is the current agent.

    ``build`` is passed to :func:`agent_path` (whether the agent may be compiled); the archive
    itself is written whenever it is missing, which takes milliseconds.
    """
    agent = agent_path(build=build)
    try:
        binary = agent.read_bytes()
    except OSError as e:
        raise AgentBuildError(f"cannot read the guest agent {agent}: {e.strerror}") from None
    key = hashlib.sha256(b"layout %d\n" % LAYOUT_VERSION + binary).hexdigest()[:16]
    path = paths.cache_dir() / "initramfs" / key / "initramfs.cpio"
    if path.is_file():
        return path
    try:
        _write_atomically(path, newc_archive(initramfs_entries(binary)))
    except OSError as e:
        raise AgentBuildError(f"cannot write the initramfs {path}: {e.strerror}") from None
    return path
