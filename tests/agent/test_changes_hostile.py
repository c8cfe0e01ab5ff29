"""A hostile guest's change set: the host-side parser (:mod:`supermachine.changes`) against streams
no honest agent sends. Every one is refused with a typed one-line error, nothing is left at the
destination, and whatever it accepts, applied by the image builder, stays inside the root.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
from _fake_agent import FakeAgent, FakeConnection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from supermachine.agent import FieldValue, connect_vsock_uds
from supermachine.changes import MAX_XATTRS, list_changes, write_layer
from supermachine.errors import ExportError, ProtocolError, SupermachineError
from supermachine.oci.rootfs import apply_layer

Item = dict[int, FieldValue] | bytes
FILE, DIR, SYMLINK, HARDLINK, WHITEOUT, CHAR = 0, 1, 2, 3, 4, 5


def entry(path: bytes, kind: int = FILE, **extra: FieldValue) -> dict[int, FieldValue]:
    tags = {"mode": 3, "uid": 4, "gid": 5, "size": 6, "mtime": 7, "link": 8, "major": 9, "minor": 10}
    tags |= {"xattrs": 11, "opaque": 12, "in_image": 13, "hidden": 14}
    fields: dict[int, FieldValue] = {1: path, 2: kind, 3: 0o644}
    for name, value in extra.items():
        fields[tags[name]] = value
    return fields


def honest() -> list[Item]:
    return [
        entry(b"etc", DIR, mode=0o755, in_image=1),
        entry(b"etc/hosts", size=3, in_image=1),
        b"abc",
        entry(b"etc/gone", WHITEOUT),
        entry(b"etc/link", HARDLINK, link=b"etc/hosts"),
        entry(b"etc/sym", SYMLINK, link=b"../../../../outside"),
    ]


def export(items: list[Item], dest: Path, **kwargs: int) -> None:
    write_layer(
        iter(items),
        dest,
        max_bytes=kwargs.get("max_bytes", 1 << 20),
        **{k: v for k, v in kwargs.items() if k != "max_bytes"},
    )


def test_an_honest_stream_is_accepted(tmp_path: Path) -> None:
    layer = write_layer(iter(honest()), tmp_path / "layer.tar.gz", max_bytes=1 << 20)
    assert layer.entries == 5
    root = tmp_path / "root"
    root.mkdir()
    with open(tmp_path / "layer.tar.gz", "rb") as f:
        apply_layer(root, f)
    assert (root / "etc/hosts").read_bytes() == b"abc"
    assert os.readlink(root / "etc/sym") == "../../../../outside"  # kept, never followed


BAD_STREAMS: dict[str, tuple[list[Item], str]] = {
    "parent escape": ([entry(b"../x")], "not a plain relative path"),
    "inner escape": ([entry(b"etc", DIR), entry(b"etc/../../x")], "not a plain relative path"),
    "absolute": ([entry(b"/etc/passwd")], "not a plain relative path"),
    "empty path": ([entry(b"")], "empty"),
    "NUL in path": ([entry(b"a\0b")], "NUL"),
    "long name": ([entry(b"x" * 256)], "not a plain relative path"),
    "long path": ([entry(b"a/" * 2100 + b"b")], "too long"),
    "too deep": ([entry(b"a/" * 300 + b"b")], "levels deep"),
    "twice": ([entry(b"a"), entry(b"a")], "appears twice"),
    "orphan": ([entry(b"nodir/file")], "before (or without) its directory"),
    "child of a file": ([entry(b"f"), entry(b"f/x")], "before (or without) its directory"),
    "child of a whiteout": ([entry(b"w", WHITEOUT), entry(b"w/x")], "before (or without)"),
    "unknown type": ([entry(b"a", 9)], "type 9"),
    "mode bits": ([entry(b"a", mode=0o170644)], "mode"),
    "uid": ([entry(b"a", uid=1 << 40)], "uid"),
    "bytes for an int": ([{1: b"a", 2: b"x"}], "not an integer"),
    "int for a path": ([{1: 5, 2: FILE}], "not bytes"),
    "hard link to nothing": ([entry(b"l", HARDLINK, link=b"missing")], "no earlier file"),
    "hard link to a dir": ([entry(b"d", DIR), entry(b"l", HARDLINK, link=b"d")], "no earlier file"),
    "hard link escape": ([entry(b"l", HARDLINK, link=b"../etc/shadow")], "not a plain relative path"),
    "empty symlink": ([entry(b"s", SYMLINK)], "link target"),
    "overlay xattr": ([entry(b"a", xattrs=[b"trusted.overlay.opaque\0y"])], "not allowed"),
    "acl xattr": ([entry(b"a", xattrs=[b"system.posix_acl_access\0x"])], "not allowed"),
    "xattr without value": ([entry(b"a", xattrs=[b"user.x"])], "not allowed"),
    "many xattrs": ([entry(b"a", xattrs=[b"user.%d\0" % i for i in range(MAX_XATTRS + 1)])], "at most"),
    "device number": ([entry(b"c", CHAR, major=1 << 30)], "major"),
    "hidden in an export": ([entry(b"h", WHITEOUT, hidden=1)], "hidden"),
    "data outside a file": ([b"stray"], "outside a file"),
    "data after a dir": ([entry(b"d", DIR), b"x"], "outside a file"),
    "short data": ([entry(b"a", size=10), b"abc"], "short of its size"),
    "long data": ([entry(b"a", size=2), b"abc"], "more data than its size"),
    "entry inside data": ([entry(b"a", size=4), b"ab", entry(b"b")], "short of its size"),
}


@pytest.mark.parametrize("name", sorted(BAD_STREAMS))
def test_a_bad_stream_is_refused_and_leaves_nothing(name: str, tmp_path: Path) -> None:
    items, message = BAD_STREAMS[name]
    with pytest.raises(ProtocolError, match="the guest sent a bad change set") as info:
        export(items, tmp_path / "layer.tar.gz")
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_limits_of_the_caller(tmp_path: Path) -> None:
    many = [entry(b"f%d" % i) for i in range(5)]
    with pytest.raises(ProtocolError, match="more than 3 entries"):
        write_layer(iter(many), tmp_path / "l", max_bytes=1 << 20, max_entries=3)
    with pytest.raises(ExportError, match="more than 100 bytes"):
        write_layer(iter([entry(b"big", size=101), b"x" * 101]), tmp_path / "l", max_bytes=100)
    with pytest.raises(ExportError, match="mark deletions"):
        write_layer(iter([entry(b".wh.sneaky")]), tmp_path / "l", max_bytes=100)
    assert list(tmp_path.iterdir()) == []


def test_a_listing_refuses_file_data_from_the_agent(tmp_path: Path) -> None:
    """Through the real client on a socket: data frames are not part of a listing."""

    def behaviour(conn: FakeConnection) -> None:
        conn.read_request()
        conn.send_fields(0x89, [(1, b"a"), (2, FILE), (6, 3)])
        conn.send(0x85, b"abc")
        conn.drain()

    fake = FakeAgent(tmp_path / "vsock.sock", behaviour)
    try:
        with (
            connect_vsock_uds(fake.path, timeout=5) as client,
            pytest.raises(ProtocolError, match="unexpected frame of type 0x85"),
        ):
            list_changes(client.changes(with_data=False, timeout=10))
    finally:
        fake.close()


def _mutations() -> st.SearchStrategy[list[Item]]:
    field_value = st.one_of(
        st.integers(min_value=0, max_value=(1 << 64) - 1),
        st.binary(max_size=40),
        st.lists(st.binary(max_size=20), max_size=4),
    )
    names = st.sampled_from(
        [b"a", b"b", b"a/b", b"a/b/c", b"..", b".wh.x", b"a/.wh..wh..opq", b"/x", b"x" * 300]
    )
    an_entry = st.fixed_dictionaries(
        {1: names, 2: st.integers(min_value=0, max_value=9)},
        optional={i: field_value for i in range(3, 16)},
    )
    item: st.SearchStrategy[Item] = st.one_of(an_entry, st.binary(max_size=64))
    return st.lists(item, max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=_mutations())
def test_whatever_the_guest_sends_the_layer_stays_inside_its_root(items: list[Item], tmp_path: Path) -> None:
    out = io.BytesIO()
    try:
        write_layer(iter(items), out, max_bytes=1 << 16)
    except (ProtocolError, ExportError) as exc:
        assert "\n" not in str(exc)
        return
    root = tmp_path / f"root-{os.urandom(4).hex()}"
    (root / "inside").mkdir(parents=True)
    out.seek(0)
    with contextlib.suppress(SupermachineError):
        apply_layer(root / "inside", out)
    assert [p.name for p in root.iterdir()] == ["inside"]
