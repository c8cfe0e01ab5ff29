"""write_file / read_file through the real agent on a Unix socket."""

from __future__ import annotations

import errno
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
from supermachine.agent import AgentClient
from supermachine.errors import AgentRequestError


def test_round_trip_binary(client: AgentClient, tmp_path: Path) -> None:
    data = os.urandom(2 * 1024 * 1024 + 3) + bytes(range(256)) + b"\0" * 1000
    target = tmp_path / "blob.bin"
    client.write_file(str(target), data)
    assert target.read_bytes() == data
    assert client.read_file(str(target)) == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


@pytest.mark.parametrize("mode", [0o600, 0o755, 0o4755, 0o000])
def test_mode_is_applied_exactly(client: AgentClient, tmp_path: Path, mode: int) -> None:
    target = tmp_path / "file"
    old_umask = os.umask(0o077)
    try:
        client.write_file(str(target), b"x", mode=mode)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(target.stat().st_mode) == mode


def test_empty_file(client: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "empty"
    client.write_file(str(target), b"")
    assert target.read_bytes() == b""
    assert client.read_file(str(target)) == b""


def test_overwrite_is_atomic_and_leaves_no_temporary_files(client: AgentClient, tmp_path: Path) -> None:
    directory = tmp_path / "etc"
    directory.mkdir()
    target = directory / "config"
    target.write_bytes(b"old")
    inode = target.stat().st_ino
    client.write_file(str(target), b"new content")
    assert target.read_bytes() == b"new content"
    assert target.stat().st_ino != inode, "expected a rename over the old file, not an in-place write"
    assert sorted(p.name for p in directory.iterdir()) == ["config"]


def test_owner(client: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "owned"
    client.write_file(str(target), b"data", mode=0o640, uid=65534, gid=12345)
    info = target.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (65534, 12345, 0o640)


def test_read_missing_file(client: AgentClient) -> None:
    with pytest.raises(AgentRequestError) as info:
        client.read_file("/nonexistent/file.txt")
    assert str(info.value) == "read_file /nonexistent/file.txt: No such file or directory"
    assert info.value.errno == 2
    assert info.value.kind == "os"
    assert client.ping()


def test_read_directory(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(AgentRequestError, match="Is a directory"):
        client.read_file(str(tmp_path))


def test_write_into_missing_directory(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(AgentRequestError, match=r"^write_file .*/missing/file: No such file or directory$"):
        client.write_file(str(tmp_path / "missing" / "file"), os.urandom(300_000))
    # The data frames were consumed: the connection is still in step.
    assert client.exec(["echo", "ok"]).stdout == b"ok\n"


def test_relative_paths_are_refused(client: AgentClient) -> None:
    with pytest.raises(AgentRequestError, match="not absolute"):
        client.read_file("relative/path")
    with pytest.raises(AgentRequestError, match="not absolute"):
        client.write_file("relative", b"x")
    assert client.ping()


def test_read_proc_file(client: AgentClient) -> None:
    # Files whose size is reported as 0 are read to the end all the same.
    assert b"Name:" in client.read_file("/proc/self/status")


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def test_put_archive_unpacks_with_modes_owners_and_links(client: AgentClient, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    archive = _tar(
        [
            (_info("app", tarfile.DIRTYPE, mode=0o750, uid=12, gid=34), None),
            (_info("app/run.sh", mode=0o4755, size=5, uid=12, gid=34, mtime=1_000_000), b"hello"),
            (_info("app/link", tarfile.SYMTYPE, linkname="run.sh"), None),
            (_info("app/hard", tarfile.LNKTYPE, linkname="app/run.sh"), None),
        ]
    )
    assert client.put_archive(str(dest), archive) == 4
    script = dest / "app/run.sh"
    st = script.stat()
    assert (script.read_bytes(), st.st_mode & 0o7777, st.st_uid, st.st_gid) == (b"hello", 0o4755, 12, 34)
    assert int(st.st_mtime) == 1_000_000
    assert (dest / "app").stat().st_mode & 0o7777 == 0o750
    assert os.readlink(dest / "app/link") == "run.sh"
    assert (dest / "app/hard").stat().st_ino == st.st_ino
    # The connection stays usable, and an escape is refused with nothing written outside.
    bad = _tar([(_info("../escaped", size=1), b"x")])
    with pytest.raises(AgentRequestError, match="put_archive"):
        client.put_archive(str(dest), bad)
    assert not (tmp_path / "escaped").exists()
    with pytest.raises(AgentRequestError, match="not a directory"):
        client.put_archive(str(script), archive)
    with pytest.raises(AgentRequestError, match="put_archive"):
        client.put_archive(str(dest), b"\xff" * 1024)
    assert client.ping()


def test_stat_reports_types_modes_owners_and_links(client: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"12345")
    os.chown(target, 7, 8)
    os.chmod(target, 0o4750)  # after chown, which clears set-id bits
    (tmp_path / "link").symlink_to("file")
    st = client.stat(str(target))
    assert (st.type, st.mode, st.uid, st.gid, st.size) == ("file", 0o4750, 7, 8, 5)
    assert st.mtime_ns // 1_000_000_000 == int(target.stat().st_mtime)
    link = client.stat(str(tmp_path / "link"))
    assert (link.type, link.link) == ("symlink", "file")
    assert client.stat(str(tmp_path / "link"), follow=True).type == "file"
    assert client.stat(str(tmp_path)).type == "dir"
    with pytest.raises(AgentRequestError) as info:
        client.stat(str(tmp_path / "missing"))
    assert info.value.errno == errno.ENOENT
    with pytest.raises(AgentRequestError, match="not absolute"):
        client.stat("relative")
    assert client.ping()


def test_remove_files_links_and_trees(client: AgentClient, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub/f").write_text("x")
    (tree / "escape").symlink_to(outside)  # removed, never followed
    (tmp_path / "file").write_text("x")
    client.remove(str(tmp_path / "file"))
    assert not (tmp_path / "file").exists()
    with pytest.raises(AgentRequestError) as info:
        client.remove(str(tree))
    assert info.value.errno == errno.ENOTEMPTY
    client.remove(str(tree), recursive=True)
    assert not tree.exists() and (outside / "keep").read_text() == "keep"
    with pytest.raises(AgentRequestError, match="refusing to remove /"):
        client.remove("/", recursive=True)
    with pytest.raises(AgentRequestError) as info:
        client.remove(str(tmp_path / "missing"))
    assert info.value.errno == errno.ENOENT
    assert client.ping()
