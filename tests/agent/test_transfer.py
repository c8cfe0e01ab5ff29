"""Copying between host and guest (:mod:`supermachine.transfer`) and the agent requests under it,
``list_dir`` and ``get_archive``: against the real agent (a host process here), against a hostile
agent on a real socket, and the host-side unpacker against archives no honest agent sends. Whatever
an archive holds, nothing changes outside the destination and no link is followed.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import stat
import tarfile
from pathlib import Path

import pytest
from _fake_agent import FakeAgent, FakeConnection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from supermachine.agent import AgentClient, connect_vsock_uds
from supermachine.errors import (
    AgentRequestError,
    CopyError,
    InputError,
    OutputLimitError,
    ProtocolError,
    SupermachineError,
)
from supermachine.transfer import host_archive, unpack_guest_archive

LIST_DIR_ENTRY, DATA, END, ERROR = 0x89, 0x85, 0x86, 0x8F


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Per path below ``root``: type, permission bits, and a file's content or a link's target."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st_ = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", st_.st_mode & 0o7777)
            elif stat.S_ISREG(st_.st_mode):
                out[rel] = ("file", st_.st_mode & 0o7777, path.read_bytes())
            else:
                out[rel] = ("special",)
    return out


def sample_tree(root: Path) -> Path:
    (root / "app/sub/deeper").mkdir(parents=True)
    (root / "app/run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "app/run.sh", 0o755)
    (root / "app/sub/data.bin").write_bytes(os.urandom(300_000))
    (root / "app/sub/deeper/empty").write_bytes(b"")
    os.symlink("run.sh", root / "app/link")
    os.symlink("/etc/passwd", root / "app/absolute-link")  # kept as a link, never followed
    os.chmod(root / "app/sub", 0o750)
    return root / "app"


# -- the real agent ---------------------------------------------------------------------------------


def test_list_dir_describes_each_entry_sorted_without_following_links(
    client: AgentClient, tmp_path: Path
) -> None:
    app = sample_tree(tmp_path / "src")
    os.mkfifo(app / "fifo")
    entries = client.list_dir(str(app))
    assert [e.name for e in entries] == ["absolute-link", "fifo", "link", "run.sh", "sub"]
    by_name = {e.name: e for e in entries}
    assert by_name["link"].type == "symlink" and by_name["link"].link == "run.sh"
    assert by_name["absolute-link"].link == "/etc/passwd"
    assert by_name["run.sh"].type == "file" and by_name["run.sh"].size == 18
    assert by_name["run.sh"].mode == 0o755
    assert by_name["sub"].type == "dir" and by_name["sub"].mode == 0o750
    assert by_name["fifo"].type == "fifo"
    assert [(e.name, e.size) for e in client.list_dir(str(app / "sub/deeper"))] == [("empty", 0)]
    with pytest.raises(AgentRequestError) as missing:
        client.list_dir(str(tmp_path / "missing"))
    assert missing.value.errno == 2
    with pytest.raises(AgentRequestError, match="list_dir"):
        client.list_dir(str(app / "run.sh"))
    with pytest.raises(AgentRequestError, match="not absolute"):
        client.list_dir("relative")
    with pytest.raises(OutputLimitError, match="more than 2 entries"):
        client.list_dir(str(app), max_entries=2)


def test_get_archive_then_unpack_copies_a_tree_out(client: AgentClient, tmp_path: Path) -> None:
    app = sample_tree(tmp_path / "src")
    os.chmod(app / "run.sh", 0o4755)  # the set-id bit does not survive the copy out
    os.mkfifo(app / "fifo")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(app / "socket"))  # left out of the archive
    dest = tmp_path / "dest"
    dest.mkdir()
    with client.get_archive(str(app), max_bytes=10 << 20) as stream:
        result = unpack_guest_archive(stream, dest)
        assert stream.read() == b"" and stream.finished
    server.close()
    assert (result.skipped, result.bytes) == (1, 18 + 300_000)
    copied, original = tree(dest / "app"), tree(app)
    assert copied["run.sh"] == ("file", 0o755, (app / "run.sh").read_bytes())
    del original["run.sh"], copied["run.sh"], original["fifo"], original["socket"]
    assert copied == original
    # The connection is still usable; a single file comes out under its own name.
    with client.get_archive(str(app / "sub/data.bin")) as stream:
        unpack_guest_archive(stream, dest)
        stream.read()  # to the end of the reply: closing before it would close the connection
    assert (dest / "data.bin").read_bytes() == (app / "sub/data.bin").read_bytes()
    with pytest.raises(AgentRequestError) as missing, client.get_archive(str(tmp_path / "nope")) as stream:
        stream.read()
    assert missing.value.errno == 2
    assert client.ping()


def test_get_archive_stops_at_max_bytes(client: AgentClient, tmp_path: Path) -> None:
    app = sample_tree(tmp_path / "src")
    dest = tmp_path / "dest"
    dest.mkdir()
    with (
        pytest.raises(OutputLimitError, match="larger than the limit"),
        client.get_archive(str(app), max_bytes=100_000) as stream,
    ):
        unpack_guest_archive(stream, dest)


def test_host_archive_into_the_real_agent_copies_a_tree_in(client: AgentClient, tmp_path: Path) -> None:
    app = sample_tree(tmp_path / "src")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(app / "socket"))  # a socket cannot be archived: left out
    dest = tmp_path / "dest"
    dest.mkdir()
    with host_archive(app) as stream:
        entries = client.put_archive(str(dest), stream)
    server.close()
    assert entries == 8
    original = tree(app)
    del original["socket"]
    assert tree(dest / "app") == original
    assert (dest / "app/run.sh").stat().st_uid == 0


def test_host_archive_refuses_a_missing_source_in_one_line(tmp_path: Path) -> None:
    with (
        pytest.raises(InputError, match=r"cannot copy .*missing: No such file or directory"),
        host_archive(tmp_path / "missing"),
    ):
        pass


# -- a hostile agent --------------------------------------------------------------------------------


def _with_fake(tmp_path: Path, behaviour: object) -> FakeAgent:
    return FakeAgent(tmp_path / "vsock.sock", behaviour)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("names", "count", "error"),
    [
        ([b"a/b"], 1, "bad or out-of-order entry name"),
        ([b".."], 1, "bad or out-of-order entry name"),
        ([b""], 1, "bad or out-of-order entry name"),
        ([b"x" * 256], 1, "bad or out-of-order entry name"),
        ([b"b", b"a"], 2, "bad or out-of-order entry name"),
        ([b"a", b"a"], 2, "bad or out-of-order entry name"),
        ([b"a"], 5, "said it listed 5 entries but sent 1"),
    ],
)
def test_a_hostile_listing_is_refused(tmp_path: Path, names: list[bytes], count: int, error: str) -> None:
    def behaviour(conn: FakeConnection) -> None:
        conn.read_request()
        for name in names:
            conn.send_fields(LIST_DIR_ENTRY, [(1, 0), (2, 0o644), (8, name)])
        conn.send_fields(END, [(1, count)])
        conn.drain()

    fake = _with_fake(tmp_path, behaviour)
    try:
        with connect_vsock_uds(fake.path, timeout=5) as client, pytest.raises(ProtocolError, match=error):
            client.list_dir("/x", timeout=10)
    finally:
        fake.close()


@pytest.mark.parametrize(
    ("frames", "error"),
    [
        ([(DATA, b"x" * 1000), (END, [(1, 999)])], (ProtocolError, "said it sent 999 archive bytes")),
        ([(DATA, b"x" * 6000)] * 3, (OutputLimitError, "larger than the limit")),
        ([(DATA, b"\0" * 100), (ERROR, [(1, b"os"), (2, 5), (3, b"get_archive /x: I/O error")])], None),
    ],
)
def test_a_hostile_archive_stream_is_refused(
    tmp_path: Path, frames: list[tuple[int, object]], error: tuple[type[Exception], str] | None
) -> None:
    def behaviour(conn: FakeConnection) -> None:
        conn.read_request()
        for kind, payload in frames:
            if isinstance(payload, bytes):
                conn.send(kind, payload)
            else:
                conn.send_fields(kind, payload)  # type: ignore[arg-type]
        conn.drain()

    fake = _with_fake(tmp_path, behaviour)
    kind, match = error if error is not None else (AgentRequestError, "I/O error")
    try:
        with (
            connect_vsock_uds(fake.path, timeout=5) as client,
            pytest.raises(kind, match=match),
            client.get_archive("/x", max_bytes=10_000, timeout=10) as stream,
        ):
            while stream.read(4096):
                pass
    finally:
        fake.close()


# -- hostile archives -------------------------------------------------------------------------------


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    out.seek(0)
    return out


def _pax(info: tarfile.TarInfo, **headers: str) -> tarfile.TarInfo:
    """``info`` with extended header records, which can carry bytes no ustar field can (NUL)."""
    info.pax_headers = headers
    return info


def _m(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o644 if kind != tarfile.DIRTYPE else 0o755
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """A destination, and beside it a directory with a file that no copy may touch; the
    destination holds a link to it, as a user's directory might."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("keep\n")
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "to-outside")
    return dest, outside


def _untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "keep\n"


@pytest.mark.parametrize(
    ("members", "error"),
    [
        ([(_m("/abs"), b"x")], "named '/abs', which is an absolute path"),
        ([(_pax(_m("x"), path="a\0b"), b"x")], r"named 'a\\x00b', which contains a NUL byte"),
        ([(_pax(_m("f"), mtime="1e23"), b"x")], r"named 'f' with a modification time out of range"),
        ([(_m("a/../../escape"), b"x")], "'..'"),
        ([(_m("to-outside/secret"), b"pwned")], "is not a directory"),
        ([(_m("l", tarfile.SYMTYPE, linkname="/"), None), (_m("l/tmp/x"), b"x")], "is not a directory"),
        ([(_m("h", tarfile.LNKTYPE, linkname="to-outside/secret"), None)], "no file it made"),
        (
            [(_m("s", tarfile.SYMTYPE, linkname="x"), None), (_m("h", tarfile.LNKTYPE, linkname="s"), None)],
            "no file",
        ),
        ([(_m("/".join(["d"] * 300)), b"x")], "levels deep"),
        ([(_m("dir", tarfile.DIRTYPE), None), (_m("dir", tarfile.REGTYPE), b"x")], "is a directory"),
    ],
)
def test_a_hostile_archive_is_refused_and_changes_nothing_outside(
    layout: tuple[Path, Path], members: list[tuple[tarfile.TarInfo, bytes | None]], error: str
) -> None:
    dest, outside = layout
    with pytest.raises(CopyError, match=error):
        unpack_guest_archive(_tar(*members), dest)
    _untouched(outside)


def test_an_entry_replaces_a_link_rather_than_writing_through_it(layout: tuple[Path, Path]) -> None:
    dest, outside = layout
    result = unpack_guest_archive(_tar((_m("to-outside"), b"replaced")), dest)
    assert result.entries == 1
    assert not (dest / "to-outside").is_symlink() and (dest / "to-outside").read_bytes() == b"replaced"
    _untouched(outside)


def test_devices_fifos_set_id_bits_and_owners_do_not_come_out(layout: tuple[Path, Path]) -> None:
    dest, outside = layout
    archive = _tar(
        (_m("d", tarfile.DIRTYPE, mode=0o1500), None),
        (_m("d/suid", mode=0o6755, uid=0, gid=0), b"#!"),
        (_m("d/null", tarfile.CHRTYPE, devmajor=1, devminor=3), None),
        (_m("d/disk", tarfile.BLKTYPE, devmajor=8, devminor=0), None),
        (_m("d/pipe", tarfile.FIFOTYPE), None),
        (_m("d/hard", tarfile.LNKTYPE, linkname="d/suid"), None),
        (_m("d/abs", tarfile.SYMTYPE, linkname="/etc/shadow"), None),
    )
    result = unpack_guest_archive(archive, dest)
    assert (result.entries, result.skipped, result.bytes) == (4, 3, 2)
    assert sorted(p.name for p in (dest / "d").iterdir()) == ["abs", "hard", "suid"]
    assert (dest / "d/suid").stat().st_mode & 0o7777 == 0o755
    assert (dest / "d").stat().st_mode & 0o7777 == 0o700
    assert (dest / "d/hard").stat().st_ino == (dest / "d/suid").stat().st_ino
    assert os.readlink(dest / "d/abs") == "/etc/shadow"  # inert: never followed
    _untouched(outside)


def test_limits_and_broken_archives_are_one_line_errors(layout: tuple[Path, Path]) -> None:
    dest, outside = layout
    many = _tar(*[(_m(f"f{i}"), b"x") for i in range(5)])
    with pytest.raises(CopyError, match="more than 3 entries"):
        unpack_guest_archive(many, dest, max_entries=3)
    truncated = io.BytesIO(_tar((_m("big"), b"x" * 100_000)).getvalue()[:20_000])
    with pytest.raises(CopyError, match=r"broken archive|ends inside a file"):
        unpack_guest_archive(truncated, dest)
    with pytest.raises(InputError, match="cannot copy into"):
        unpack_guest_archive(_tar(), dest / "missing")
    _untouched(outside)


def _archives() -> st.SearchStrategy[list[tuple[str, bytes, str]]]:
    names = st.sampled_from(
        [
            "a",
            "b",
            "a/b",
            "a/b/c",
            "..",
            "../x",
            "/x",
            "to-outside",
            "to-outside/x",
            "./a",
            "a//b",
            "l",
            "l/x",
        ]
    )
    kinds = st.sampled_from(["file", "dir", "sym", "hard", "fifo"])
    targets = st.sampled_from(["a", "a/b", "/", "..", "../outside", "to-outside", "l", "../../etc"])
    return st.lists(st.tuples(names, st.sampled_from([b"", b"data"]), st.tuples(kinds, targets)), max_size=10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=_archives())
def test_no_archive_changes_anything_outside_the_destination(
    tmp_path_factory: pytest.TempPathFactory, members: list[tuple[str, bytes, tuple[str, str]]]
) -> None:  # type: ignore[misc]
    root = tmp_path_factory.mktemp("fuzz")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret").write_text("keep\n")
    dest = root / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "to-outside")
    kind_of = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE}
    kind_of |= {"hard": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}
    archive = _tar(
        *[
            (_m(name, kind_of[kind], linkname=target), data if kind == "file" else None)
            for name, data, (kind, target) in members
        ]
    )
    with contextlib.suppress(SupermachineError):
        unpack_guest_archive(archive, dest)
    _untouched(outside)
    assert sorted(p.name for p in root.iterdir()) == ["dest", "outside"]
    for dirpath, dirnames, filenames in os.walk(dest):  # links are not followed
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            # Nothing below the destination is reached through a link: every parent is a real
            # directory inside it.
            assert path.parent.resolve() == path.parent.absolute(), path
