"""Named volumes: ext4 file systems in image files on the host, attached to VMs as virtio-blk disks
and mounted by the guest agent, so data outlives the VM that wrote it.

A volume is a directory ``<data>/volumes/<name>/`` holding ``disk.ext4`` and ``volume.json``. It is
made in a private temporary directory beside the others (``mkfs.ext4`` on a sparse file) and
renamed into place, so a killed ``create`` leaves either a whole volume or a temporary directory
that the next ``create`` or ``rm`` clears.

The host never mounts or reads a volume's file system (a guest may have crafted it); it only
hands the file to a VM. One VM at a time may attach a volume read-write, any number read-only
while none writes: an ``flock`` on the disk file, held for as long as the VM runs, enforces it
across processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from supermachine import paths
from supermachine.errors import InputError, VolumeError, VolumeInUseError
from supermachine.units import parse_size

DISK = "disk.ext4"
META = "volume.json"
DEFAULT_SIZE = 1 << 30
MIN_SIZE = 16 << 20
MAX_SIZE = 16 << 40
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAX_META = 4096


@dataclass(frozen=True)
class Volume:
    name: str
    path: Path
    """The volume's disk image."""
    size: int
    created: float

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "disk": str(self.path), "size": self.size, "created": self.created}


def volumes_dir() -> Path:
    return paths.data_dir() / "volumes"


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InputError(
            f"invalid volume name {name!r}: 1 to 64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def create(name: str, size: int | str = DEFAULT_SIZE) -> Volume:
    """Makes the volume ``name`` of ``size`` bytes (or ``"10G"``): an empty ext4 file system whose
    root directory belongs to root (mode 0755), as a new docker volume's does."""
    check_name(name)
    nbytes = parse_size(size, "volume size") if isinstance(size, str) else size
    if not MIN_SIZE <= nbytes <= MAX_SIZE:
        raise InputError(f"a volume size must be between 16M and 16T, got {nbytes} bytes")
    mkfs = shutil.which("mkfs.ext4") or next(
        (p for p in ("/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4") if os.access(p, os.X_OK)), None
    )
    if mkfs is None:
        raise VolumeError("mkfs.ext4 is not installed (Debian: e2fsprogs)")
    root = volumes_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if target.exists():
        raise VolumeError(f"volume {name} already exists")
    _clear_leftovers(root)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".creating", dir=root))
    try:
        disk = work / DISK
        with open(disk, "wb") as f:
            f.truncate(nbytes)
        made = subprocess.run(
            [mkfs, "-q", "-F", "-L", name[:16], "-E", "root_owner=0:0", str(disk)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if made.returncode != 0:
            detail = (made.stderr or made.stdout).strip().splitlines()[-1:] or ["no output"]
            raise VolumeError(f"mkfs.ext4 failed for volume {name}: {detail[0]}")
        created = time.time()
        (work / META).write_text(json.dumps({"name": name, "size": nbytes, "created": created}))
        os.chmod(work, 0o700)
        try:
            os.rename(work, target)
        except OSError:
            raise VolumeError(f"volume {name} already exists") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Volume(name, target / DISK, nbytes, created)


def _clear_leftovers(root: Path) -> None:
    """Removes what killed ``create`` calls left (their temporary directories)."""
    for entry in root.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(".creating"):
            shutil.rmtree(entry, ignore_errors=True)


def get(name: str) -> Volume:
    check_name(name)
    directory = volumes_dir() / name
    try:
        fd = os.open(directory / META, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VolumeError(f"no volume named {name} (supermachine volume create {name})") from None
    with os.fdopen(fd, "rb") as f:
        raw = f.read(_MAX_META + 1)
    try:
        meta = json.loads(raw)
        size, created = int(meta["size"]), float(meta["created"])
    except (ValueError, KeyError, TypeError):
        raise VolumeError(f"volume {name} is damaged ({directory / META})") from None
    disk = directory / DISK
    if not disk.is_file() or disk.is_symlink():
        raise VolumeError(f"volume {name} has no disk image ({disk})")
    return Volume(name, disk, size, created)


def list_volumes() -> list[Volume]:
    root = volumes_dir()
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        if _NAME.fullmatch(entry.name):
            with contextlib.suppress(VolumeError):
                found.append(get(entry.name))
    return found


def remove(name: str) -> None:
    """Deletes a volume and its data; refused while a VM has it attached."""
    volume = get(name)
    with Attachment(volume, read_only=False, purpose="remove it"):
        shutil.rmtree(volume.path.parent)


def in_use(volume: Volume) -> bool:
    try:
        with Attachment(volume, read_only=False, purpose="check it"):
            return False
    except VolumeInUseError:
        return True


class Attachment:
    """The lock that stands for a VM's use of a volume: shared for read-only, exclusive for
    read-write; taken without waiting, so a conflict is an error at once."""

    def __init__(self, volume: Volume, *, read_only: bool, purpose: str = "attach it") -> None:
        self.volume = volume
        self.read_only = read_only
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.volume.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            how = "read-write to another VM" if self.read_only else "to another VM"
            raise VolumeInUseError(
                f"volume {self.volume.name} is attached {how}; cannot {self.purpose}"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Attachment:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
