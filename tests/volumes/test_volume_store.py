"""Named volumes on the host (:mod:`supermachine.volumes`, ``supermachine volume ...``): real ext4
images made by mkfs.ext4, real locks held by other processes; no VM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from supermachine import volumes
from supermachine.errors import InputError, VolumeError, VolumeInUseError
from supermachine.vm import SharedFolder, VolumeMount, parse_mount


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SUPERMACHINE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supermachine", "volume", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[object]:
    """Another process that attaches a volume (``hold(name, read_only)``) until the test ends."""
    procs: list[subprocess.Popen[str]] = []

    def hold(name: str, read_only: bool) -> None:
        code = textwrap.dedent(
            f"""
            import sys
            from supermachine import volumes
            a = volumes.Attachment(volumes.get({name!r}), read_only={read_only})
            a.acquire()
            print("held", flush=True)
            sys.stdin.read()
            """
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        procs.append(proc)

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_create_makes_an_ext4_image_and_the_cli_lists_inspects_and_removes_it(data_dir: Path) -> None:
    made = cli("create", "--size", "32M", "data")
    assert (made.returncode, made.stdout) == (0, "data\n"), made.stderr
    disk = data_dir / "volumes/data/disk.ext4"
    assert disk.stat().st_size == 32 << 20
    check = subprocess.run(["/sbin/dumpe2fs", "-h", str(disk)], capture_output=True, text=True)
    assert "Filesystem volume name:   data" in check.stdout, check.stderr
    assert cli("ls", "-q").stdout == "data\n"
    listed = cli("ls").stdout
    assert "data" in listed and "32.0 MiB" in listed and " no" in listed
    [info] = json.loads(cli("inspect", "data").stdout)
    assert (info["name"], info["size"], info["in_use"]) == ("data", 32 << 20, False)
    assert 0 < info["on_disk"] < 32 << 20  # sparse
    gone = cli("rm", "data")
    assert gone.returncode == 0 and not (data_dir / "volumes/data").exists()
    assert cli("ls", "-q").stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("create", "bad name"), "error: invalid volume name 'bad name'"),
        (("create", "--size", "1M", "small"), "error: a volume size must be between 16M and 16T"),
        (("create", "--size", "lots", "x"), "error: volume size='lots' is not a size"),
        (("rm", "nope"), "error: no volume named nope"),
        (("inspect", "nope"), "error: no volume named nope"),
    ],
)
def test_bad_input_is_one_line(args: tuple[str, ...], message: str) -> None:
    result = cli(*args)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_name_is_made_once_and_a_killed_create_leaves_nothing_that_counts(data_dir: Path) -> None:
    volumes.create("once", "16M")
    with pytest.raises(VolumeError, match="already exists"):
        volumes.create("once", "16M")
    leftover = data_dir / "volumes/.half.abc.creating"
    leftover.mkdir()
    (leftover / "disk.ext4").write_bytes(b"half")
    assert [v.name for v in volumes.list_volumes()] == ["once"]
    volumes.create("next", "16M")
    assert not leftover.exists()


def test_one_writer_or_many_readers_across_processes(holder: object) -> None:
    hold = holder  # type: ignore[assignment]
    volumes.create("shared", "16M")
    volume = volumes.get("shared")
    hold("shared", True)  # a reader elsewhere
    with volumes.Attachment(volume, read_only=True):  # another reader is fine
        pass
    with pytest.raises(VolumeInUseError, match="volume shared is attached to another VM"):
        volumes.Attachment(volume, read_only=False).acquire()
    assert cli("rm", "shared").returncode == 1
    assert "attached" in cli("rm", "shared").stderr
    volumes.create("solo", "16M")
    hold("solo", False)  # a writer elsewhere
    with pytest.raises(VolumeInUseError, match="attached read-write to another VM"):
        volumes.Attachment(volumes.get("solo"), read_only=True).acquire()
    assert volumes.in_use(volumes.get("solo"))
    [info] = json.loads(cli("inspect", "solo").stdout)
    assert info["in_use"] is True


def test_a_damaged_or_planted_volume_is_refused(data_dir: Path, tmp_path: Path) -> None:
    volumes.create("v", "16M")
    (data_dir / "volumes/v/volume.json").write_text("{")
    with pytest.raises(VolumeError, match="damaged"):
        volumes.get("v")
    planted = data_dir / "volumes/link"
    planted.mkdir()
    (planted / "volume.json").write_text(json.dumps({"name": "link", "size": 1, "created": 0}))
    os.symlink("/etc/passwd", planted / "disk.ext4")
    with pytest.raises(VolumeError, match="no disk image"):
        volumes.get("link")


@pytest.mark.parametrize(
    ("spec", "mount"),
    [
        ("data:/data", VolumeMount("data", "/data")),
        ("data:/srv/x:ro", VolumeMount("data", "/srv/x", read_only=True)),
        ("data:/srv/x:rw", VolumeMount("data", "/srv/x")),
        ("/srv/share:/data", SharedFolder(Path("/srv/share"), "/data")),
        ("/srv/share:/data:ro", SharedFolder(Path("/srv/share"), "/data", read_only=True)),
        ("./src:/src", SharedFolder(Path.cwd() / "src", "/src")),
        ("~/x:/x", SharedFolder(Path.home() / "x", "/x")),
    ],
)
def test_mount_specs_parse_as_docker_writes_them(spec: str, mount: VolumeMount | SharedFolder) -> None:
    assert parse_mount(spec) == mount


@pytest.mark.parametrize(
    "spec",
    ["data", "data:relative", ":/x", "data:/x:rx", "bad name:/x", "data:/", "/h:/a/../b", "/h:x", "/h"],
)
def test_bad_mount_specs_are_refused(spec: str) -> None:
    with pytest.raises(InputError):
        parse_mount(spec)
