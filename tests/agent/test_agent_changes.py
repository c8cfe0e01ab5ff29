"""The ``changes`` request against a real overlay: the agent walks the upper directory of an overlay
mounted on the host exactly as the guest's root is (tmpfs upper, the same mount options), and the
layer it exports, applied to the lower tree by the image builder's own layer code, must give the
overlay's merged view back, file for file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import AgentServer, _accepts, serving

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "oci"))
from _support import tree_metadata
from supermachine.changes import Change, list_changes, write_layer
from supermachine.errors import AgentRequestError, ExportError
from supermachine.oci.rootfs import apply_layer

# The guest's overlay options (guest/agent/src/init.rs, OVERLAY_OPTIONS).
OVERLAY_OPTIONS = "redirect_dir=off,metacopy=off"


@dataclass
class Overlay:
    lower: Path
    upper: Path
    merged: Path


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[Overlay]:
    if os.geteuid() != 0:
        pytest.skip("mounting an overlay needs root")
    base = tmp_path / "fs"
    base.mkdir()
    _mount("-t", "tmpfs", "tmpfs", str(base))
    try:
        lower, upper, work, merged = (base / n for n in ("lower", "upper", "work", "merged"))
        for d in (lower, upper, work, merged):
            d.mkdir()
        _populate_image(lower)
        _mount(
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={lower},upperdir={upper},workdir={work},{OVERLAY_OPTIONS}",
            str(merged),
        )
        try:
            yield Overlay(lower, upper, merged)
        finally:
            subprocess.run(["umount", str(merged)], check=False)
    finally:
        subprocess.run(["umount", "-l", str(base)], check=False)


def _populate_image(root: Path) -> None:
    for d in ("etc", "data/sub", "usr/bin", "keep/deep"):
        (root / d).mkdir(parents=True)
    (root / "etc/keep").write_text("unchanged\n")
    (root / "etc/modify").write_text("old\n")
    (root / "etc/delete").write_text("gone soon\n")
    (root / "data/a").write_text("a\n")
    (root / "data/sub/b").write_text("b\n")
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (root / "usr/bin/tool").chmod(0o755)
    (root / "chmod-me").write_text("mode\n")
    (root / "chown-me").write_text("owner\n")
    (root / "keep/deep/file").write_text("deep\n")


def _change_things(m: Path) -> None:
    """What a RUN step might do: add, modify, delete, replace a directory, chmod, chown, links."""
    (m / "new/nested/deeper").mkdir(parents=True)
    (m / "new/file").write_bytes(os.urandom(200_000))
    (m / "new/empty").write_bytes(b"")
    os.link(m / "new/file", m / "new/hard")
    os.symlink("../etc/keep", m / "new/sym")
    os.mkfifo(m / "new/fifo", 0o640)
    os.mknod(m / "new/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.setxattr(m / "new/file", "user.origin", b"test\x00\xff")
    (m / "new/suid").write_text("x")
    os.chmod(m / "new/suid", 0o4755)
    (m / "new/nested/deeper/leaf").write_text("leaf\n")
    os.chown(m / "new/nested", 1234, 5678)
    (m / "etc/modify").write_text("new\n")
    (m / "etc/delete").unlink()
    shutil.rmtree(m / "data")
    (m / "data").mkdir()
    (m / "data/other").write_text("replaced\n")
    os.chmod(m / "chmod-me", 0o600)
    os.chown(m / "chown-me", 1000, 1000)
    (m / "usr/bin/tool").unlink()
    os.symlink("/bin/sh", m / "usr/bin/tool")


def _agent(binary: Path, tmp_path: Path, ov: Overlay) -> AgentServer:
    sock, log = tmp_path / "agent.sock", tmp_path / "agent.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(binary), "--listen", f"unix:{sock}", "--upper", str(ov.upper), "--lower", str(ov.lower)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    deadline = time.monotonic() + 10
    while not _accepts(sock):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)
    return AgentServer(process, sock, log)


@pytest.fixture
def changed(agent_binary: Path, tmp_path: Path, overlay: Overlay) -> Iterator[tuple[AgentServer, Overlay]]:
    _change_things(overlay.merged)
    for server in serving(_agent(agent_binary, tmp_path, overlay)):
        yield server, overlay


def _snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything the comparison checks, by path: times and user xattrs too."""
    return tree_metadata(root, xattrs=True, mtimes=True)


def test_changes_lists_additions_modifications_and_deletions(changed: tuple[AgentServer, Overlay]) -> None:
    server, _ = changed
    with server.connect() as client:
        rows = list_changes(client.changes(with_data=False, timeout=60))
    shown = {str(c) for c in rows}
    for line in (
        "A /new",
        "A /new/file",
        "A /new/hard",
        "A /new/sym",
        "A /new/fifo",
        "A /new/null",
        "A /new/nested/deeper/leaf",
        "C /etc",
        "C /etc/modify",
        "D /etc/delete",
        "C /data",  # deleted and made again: replaced as a whole
        "A /data/other",
        "D /data/a",  # hidden by the new /data: listed as deleted
        "D /data/sub",
        "C /chmod-me",
        "C /chown-me",
        "C /usr/bin/tool",
    ):
        assert line in shown, f"{line!r} missing from {sorted(shown)}"
    assert not any(c.path.startswith("/keep") or c.path == "/etc/keep" for c in rows)
    by_path = {c.path: c for c in rows}
    assert by_path["/new/file"] == Change("/new/file", "added", "file", 200_000)
    assert by_path["/new/hard"].type == "hardlink"
    assert by_path["/usr/bin/tool"].type == "symlink"
    assert by_path["/etc/delete"].type is None
    # Walk order: each directory before what it holds.
    order = [c.path for c in rows]
    assert order.index("/new") < order.index("/new/nested") < order.index("/new/nested/deeper/leaf")


def test_exported_layer_applied_to_the_image_gives_the_merged_tree(
    changed: tuple[AgentServer, Overlay], tmp_path: Path
) -> None:
    server, ov = changed
    layer_path = tmp_path / "layer.tar.gz"
    with server.connect() as client:
        layer = write_layer(client.changes(with_data=True, timeout=60), layer_path, max_bytes=1 << 30)
    assert layer.path == layer_path and layer.media_type.endswith("tar+gzip")
    assert layer.digest == "sha256:" + hashlib.sha256(layer_path.read_bytes()).hexdigest()
    assert layer.size == layer_path.stat().st_size

    with tarfile.open(layer_path) as tar:
        names = {m.name: m for m in tar.getmembers()}
    assert "etc/.wh.delete" in names and "data/.wh..wh..opq" in names
    assert names["new/hard"].islnk() and names["new/hard"].linkname == "new/file"
    assert names["new/suid"].mode == 0o4755
    assert (names["new/nested"].uid, names["new/nested"].gid) == (1234, 5678)
    assert (
        names["new/file"].pax_headers["SCHILY.xattr.user.origin"].encode("utf-8", "surrogateescape")
        == b"test\x00\xff"
    )
    assert not any(".wh." in n and "keep" in n for n in names)

    result = tmp_path / "result"
    subprocess.run(["cp", "-a", str(ov.lower), str(result)], check=True)
    with open(layer_path, "rb") as f:
        apply_layer(result, f, diff_id=layer.diff_id)
    expected, got = _snapshot(ov.merged), _snapshot(result)
    assert got.keys() == expected.keys()
    for path in expected:
        assert got[path] == expected[path], path


def test_the_same_changes_export_to_the_same_digest(
    changed: tuple[AgentServer, Overlay], tmp_path: Path
) -> None:
    server, _ = changed
    digests = set()
    for i in range(2):
        with server.connect() as client:
            layer = write_layer(
                client.changes(with_data=True, timeout=60), tmp_path / f"{i}.tar.gz", max_bytes=1 << 30
            )
        digests.add((layer.digest, layer.diff_id))
    assert len(digests) == 1


def test_an_agent_without_an_overlay_refuses(agent: AgentServer) -> None:
    with agent.connect() as client:
        with pytest.raises(AgentRequestError, match="not an overlay") as info:
            list(client.changes(with_data=False, timeout=30))
        assert info.value.kind == "request"


def test_a_file_that_shrinks_while_exported_ends_the_export(
    changed: tuple[AgentServer, Overlay], tmp_path: Path
) -> None:
    server, ov = changed
    big = ov.merged / "new/big"
    big.write_bytes(b"x" * (32 << 20))  # far more than the socket buffers hold
    with server.connect() as client:
        stream = client.changes(with_data=True, timeout=60)
        with pytest.raises(AgentRequestError, match="shrank"):
            for item in stream:
                if isinstance(item, dict) and item.get(1) == b"new/big":
                    os.truncate(big, 10)  # after the agent sent the size


def test_a_layer_is_not_left_half_written(changed: tuple[AgentServer, Overlay], tmp_path: Path) -> None:
    server, _ = changed
    dest = tmp_path / "out" / "layer.tar.gz"
    dest.parent.mkdir()
    with server.connect() as client, pytest.raises(ExportError, match="max_bytes"):
        write_layer(client.changes(with_data=True, timeout=60), dest, max_bytes=1000)
    assert list(dest.parent.iterdir()) == []


def _layer_names(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return {m.name for m in tar.getmembers()}


def test_chained_layers_hold_each_step_and_rebuild_the_merged_tree(
    changed: tuple[AgentServer, Overlay], tmp_path: Path
) -> None:
    """A build exports one layer per step: the second holds only what changed after the first
    (deletions of paths the first added, a directory made again, a file added to a directory the
    first replaced), and both applied in order give the merged tree."""
    server, ov = changed
    m = ov.merged
    with server.connect() as client:
        stream = client.changes(with_data=True, timeout=60, keep_mark=True)
        first = write_layer(stream, tmp_path / "1.tar.gz", max_bytes=1 << 30)
        mark = stream.mark
    assert mark is not None
    (m / "new/empty").unlink()  # added by the first step
    (m / "etc/keep").unlink()  # from the image
    (m / "data/more").write_text("more\n")  # into the directory the first step replaced
    shutil.rmtree(m / "new/nested")  # made again: replaces the first step's directory
    (m / "new/nested").mkdir()
    (m / "new/nested/fresh").write_text("fresh\n")
    (m / "etc/modify").write_text("newer\n")
    with server.connect() as client:
        stream = client.changes(with_data=True, timeout=60, since=mark, keep_mark=True)
        second = write_layer(stream, tmp_path / "2.tar.gz", max_bytes=1 << 30)
        assert stream.mark is not None and stream.mark != mark
    names = _layer_names(tmp_path / "2.tar.gz")
    assert {"new/.wh.empty", "etc/.wh.keep", "data/more", "new/nested/.wh..wh..opq", "etc/modify"} <= names
    assert "new/nested/fresh" in names and "new/file" not in names and "chmod-me" not in names
    assert "data/.wh..wh..opq" not in names  # /data was replaced in the first step, not again
    assert {"data", "etc", "new"} <= names  # the directories of what changed come along
    result = tmp_path / "result"
    subprocess.run(["cp", "-a", str(ov.lower), str(result)], check=True)
    for layer in (first, second):
        assert layer.path is not None
        with open(layer.path, "rb") as f:
            apply_layer(result, f, diff_id=layer.diff_id)
    expected, got = _snapshot(m), _snapshot(result)
    assert got.keys() == expected.keys()
    for path in expected:
        assert got[path] == expected[path], path
    # Nothing changed since: an empty layer.
    with server.connect() as client:
        rows = list_changes(client.changes(with_data=False, timeout=60, since=stream.mark))
    assert rows == []


def test_an_unknown_mark_is_refused(changed: tuple[AgentServer, Overlay]) -> None:
    server, _ = changed
    with server.connect() as client:
        with pytest.raises(AgentRequestError, match="no mark 12345"):
            list(client.changes(with_data=False, timeout=30, since=12345))
        assert client.ping()
