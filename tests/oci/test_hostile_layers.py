"""Hostile layers: tar streams written by an attacker must not reach the host, exhaust the disk,
expose setuid files while they are extracted, or end in a traceback.

Every layer here is a real tar file built with :mod:`tarfile`; images go through the real loopback
registry and the real ``supermachine`` command line where the behaviour is user-visible.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _support import LayoutWriter, Registry, run, skopeo_copy, unsquashfs_extract
from supermachine.errors import LayerError, LayerLimitError, LayerTooLargeError, UnsafeLayerError
from supermachine.oci import ImageStore, apply_layer, build_squashfs, pull
from supermachine.oci.rootfs import LayerLimits

YEAR_1971 = 31_536_000
NOW = 1_700_000_000
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ownership, mounts)")


@dataclass
class E:
    """One tar entry: ``kind`` is file, dir, symlink, hardlink, char or fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    mtime: int = NOW
    target: str = ""


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tar_layer(entries: list[E], *, gzip_it: bool = True) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type, info.mode, info.mtime, info.linkname = _TYPES[e.kind], e.mode, e.mtime, e.target
            info.size = len(e.data) if e.kind == "file" else 0
            tar.addfile(info, io.BytesIO(e.data) if e.kind == "file" else None)
    return gzip.compress(raw.getvalue(), mtime=0) if gzip_it else raw.getvalue()


def push(tmp: Path, registry: Registry, repo: str, layers: list[bytes]) -> str:
    layout = LayoutWriter(tmp / f"layout-{repo.replace('/', '-')}")
    layout.tag(layout.image([(layer, "gzip") for layer in layers], config={"Cmd": ["/x"]}), "v1")
    ref = f"{registry.host}/{repo}:v1"
    skopeo_copy(f"oci:{layout.path}:v1", f"docker://{ref}")
    return ref


def supermachine(*args: str, cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The real command line in a subprocess, on the cache ``cache``."""
    full_env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parents[2] / "python"),
        "SUPERMACHINE_CACHE_DIR": str(cache),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "supermachine", *args],
        capture_output=True,
        text=True,
        env=full_env,
        check=False,
        timeout=300,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    message = proc.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith("error: ")
    return message


@dataclass
class HostDir:
    """A directory outside every root that layers aim at; snapshot() records what must not change."""

    path: Path

    def snapshot(self) -> dict[str, tuple[int, int, int, bytes]]:
        out = {}
        for p in sorted([self.path, *self.path.rglob("*")]):
            st = os.lstat(p)
            data = p.read_bytes() if p.is_file() else b""
            out[str(p)] = (st.st_mtime_ns, stat.S_IMODE(st.st_mode), st.st_nlink, data)
        return out


@pytest.fixture
def host(tmp_path: Path) -> HostDir:
    path = tmp_path / "host"
    (path / "b").mkdir(parents=True)
    (path / "secret").write_text("host secret\n")
    return HostDir(path)


def tree_root(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    root.mkdir()
    return root


# ---- 11: every operation stays beneath the root -----------------------------------------------------------
def test_directory_times_are_not_set_through_a_swapped_in_symlink(tmp_path: Path, host: HostDir) -> None:
    before = host.snapshot()
    layer = tar_layer(
        [
            E("a", "dir", mode=0o755),
            E("a/b", "dir", mode=0o755, mtime=YEAR_1971),
            E("a", "symlink", target=str(host.path)),  # the same name, now pointing at the host
        ]
    )
    apply_layer(tree_root(tmp_path), io.BytesIO(layer), what="evil layer")
    assert host.snapshot() == before
    assert os.readlink(tmp_path / "rootfs/a") == str(host.path)


def test_directory_times_swap_across_layers_through_pull_rootfs(
    store: ImageStore, registry: Registry, tmp_path: Path, host: HostDir
) -> None:
    before = host.snapshot()
    lower = tar_layer([E("a", "dir", mode=0o755), E("a/b", "dir", mode=0o755, mtime=YEAR_1971)])
    upper = tar_layer([E(".wh.a"), E("a", "symlink", target=str(host.path))])
    ref = push(tmp_path, registry, "evil/dirtimes", [lower, upper])
    proc = supermachine("pull", "-q", "--rootfs", ref, cache=store.root)
    assert proc.returncode == 0, proc.stderr
    assert host.snapshot() == before


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param(lambda h: [E("a", "symlink", target=str(h)), E("a/pwned", data=b"x")], id="file-abs"),
        pytest.param(lambda h: [E("a", "symlink", target=str(h)), E("a/b/c", "dir")], id="dir-abs"),
        pytest.param(lambda h: [E("a", "symlink", target=str(h)), E("a/.wh.secret")], id="whiteout-abs"),
        pytest.param(lambda h: [E("a", "symlink", target=str(h)), E("a/.wh..wh..opq")], id="opaque-abs"),
        pytest.param(
            lambda h: [E("a", "symlink", target=str(h)), E("l", "hardlink", target="a/secret")],
            id="hardlink-through-symlink",
        ),
        pytest.param(
            lambda h: [E("s", "symlink", target=str(h / "secret")), E("l", "hardlink", target="s")],
            id="hardlink-to-symlink",
        ),
        pytest.param(
            lambda h: [E("d", "dir"), E("d/s", "symlink", target="../../host"), E("d/s/.wh.secret")],
            id="whiteout-rel",
        ),
        pytest.param(
            lambda h: [E("s", "symlink", target="../host/secret"), E("s", data=b"overwrite")],
            id="replace-symlink",
        ),
    ],
)
def test_nothing_is_created_or_removed_through_symlinks(
    tmp_path: Path, host: HostDir, entries: object
) -> None:
    root = tree_root(tmp_path)
    before = host.snapshot()
    try:
        apply_layer(root, io.BytesIO(tar_layer(entries(host.path))), what="evil layer")  # type: ignore[operator]
    except LayerError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("evil layer")
    assert host.snapshot() == before
    assert not list(tmp_path.glob("*/pwned"))


def test_hardlink_must_name_a_regular_file_in_the_tree(tmp_path: Path, host: HostDir) -> None:
    before = host.snapshot()
    layer = tar_layer([E("s", "symlink", target=str(host.path / "secret")), E("l", "hardlink", target="s")])
    with pytest.raises(LayerError, match=r"^evil layer: hard link 'l' points at 's', which is not a regular"):
        apply_layer(tree_root(tmp_path), io.BytesIO(layer), what="evil layer")
    assert host.snapshot() == before
    # A link to a regular file in the tree still works, also through an in-tree symlink.
    ok = tar_layer(
        [
            E("d", "dir"),
            E("d/f", data=b"data"),
            E("ln", "symlink", target="d"),
            E("h", "hardlink", target="ln/f"),
        ]
    )
    root = tmp_path / "ok"
    root.mkdir()
    apply_layer(root, io.BytesIO(ok))
    assert os.stat(root / "h").st_ino == os.stat(root / "d/f").st_ino


# ---- 12: extraction is private, and prune cleans up after a killed build ----------------------------------
def _big_layer_with_setuid() -> bytes:
    """A setuid file first, then enough data that extraction and squashfs take a while."""
    zeros = bytes(8 << 20)
    entries = [E("suid", data=b"#!/bin/sh\n", mode=0o4755), E("data", "dir", mode=0o755)]
    entries += [E(f"data/f{i}", data=zeros) for i in range(48)]
    return tar_layer(entries)


def _setuid_in_build(tmp_dir: Path) -> Path | None:
    for pattern in ("*/suid", "*/*/suid"):
        for hit in tmp_dir.glob(pattern):
            return hit
    return None


def test_tree_is_private_while_built_and_prune_reports_a_killed_build(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    ref = push(tmp_path, registry, "big/setuid", [_big_layer_with_setuid()])
    assert supermachine("pull", "-q", ref, cache=store.root).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "python")}
    env["SUPERMACHINE_CACHE_DIR"] = str(store.root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "supermachine", "pull", "-q", "--rootfs", ref],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        suid = None
        while suid is None and proc.poll() is None and time.monotonic() < deadline:
            suid = _setuid_in_build(store.tmp_dir)
            time.sleep(0.005)
        assert suid is not None, "the build never showed its tree"
        # Some directory between the cache and the setuid file keeps everyone else out.
        chain = [p for p in [suid.parent, *suid.parents] if store.root in p.parents]
        modes = {str(p): stat.S_IMODE(os.stat(p).st_mode) for p in chain}
        assert any(mode & 0o077 == 0 for mode in modes.values()), modes
        assert stat.S_IMODE(os.stat(store.tmp_dir).st_mode) & 0o077 == 0 or any(
            mode == 0o700 for path, mode in modes.items() if path != str(store.tmp_dir)
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list(store.tmp_dir.iterdir()), "the killed build left nothing to clean up"
    result = supermachine("prune", cache=store.root)
    assert result.returncode == 0, result.stderr
    assert "1 build trees" in result.stdout and " 0 B freed" not in result.stdout, result.stdout
    assert not list(store.tmp_dir.iterdir())


def test_prune_reports_partial_downloads_and_temp_files(store: ImageStore) -> None:
    store.blobs.dir.mkdir(parents=True)
    (store.blobs.dir / ("e" * 64 + ".partial")).write_bytes(b"half a blob")
    (store.root / ".images.json.tmp-123456").write_bytes(b"{")
    store.rootfs_dir.mkdir()
    (store.rootfs_dir / ".x.squashfs.tmp-abc").write_bytes(b"hsqs")
    result = store.prune()
    assert (result.blobs, result.partial_files, result.temp_trees) == (0, 3, 0)
    assert result.bytes_freed == len(b"half a blob") + 1 + 4
    assert not list(store.blobs.dir.iterdir()) and not list(store.rootfs_dir.iterdir())


# ---- 13: odd orderings give the tree docker would build, or one line ---------------------------------------
@pytest.mark.parametrize(
    ("entries", "expect"),
    [
        ([E("a", "dir"), E("a/b", "dir"), E("a", data=b"file")], {"a": b"file"}),
        (
            [E("a", "dir"), E("a/b", "dir"), E("a/b/c", data=b"x"), E("a", "symlink", target="t")],
            {"a": "->t"},
        ),
        ([E("a", data=b"file"), E("a", "dir"), E("a/b", data=b"in dir")], {"a/b": b"in dir"}),
        (
            [E("a", "symlink", target="x"), E("a/b", "dir"), E("a/b/c", data=b"c")],
            {"a": "->x", "x/b/c": b"c"},
        ),
        ([E("a", data=b"1"), E("a", data=b"2")], {"a": b"2"}),
        (
            [E("f", data=b"old"), E("h", "hardlink", target="f"), E("f", data=b"new")],
            {"f": b"new", "h": b"old"},
        ),
        ([E("a", "dir"), E("a", "fifo"), E("a", "dir"), E("a/x", data=b"x")], {"a/x": b"x"}),
        ([E("d", "dir"), E("d/f", data=b"x"), E("d", "hardlink", target="e")], LayerError),
        ([E("a", data=b"file"), E("a/b", data=b"under a file")], LayerError),
        ([E("l", "symlink", target="l"), E("l/x", data=b"loop")], UnsafeLayerError),
    ],
)
def test_odd_orderings_in_one_layer(tmp_path: Path, entries: list[E], expect: object) -> None:
    root = tree_root(tmp_path)
    layer = io.BytesIO(tar_layer(entries))
    if isinstance(expect, type):
        with pytest.raises(expect) as info:  # type: ignore[call-overload]
            apply_layer(root, layer, what="odd layer")
        assert "\n" not in str(info.value) and str(info.value).startswith("odd layer")
        assert f"'{entries[-1].name}'" in str(info.value)
        return
    apply_layer(root, layer, what="odd layer")
    assert isinstance(expect, dict)
    for rel, want in expect.items():
        if isinstance(want, str):
            assert os.readlink(root / rel) == want[2:]
        else:
            assert (root / rel).read_bytes() == want


def test_dir_replaced_by_file_through_pull_rootfs(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    layer = tar_layer([E("a", "dir"), E("a/b", "dir"), E("a", data=b"now a file\n")])
    ref = push(tmp_path, registry, "odd/dirfile", [layer])
    proc = supermachine("pull", "-q", "--rootfs", ref, cache=store.root)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    squashfs = next(store.rootfs_dir.glob("*.squashfs"))
    assert (unsquashfs_extract(squashfs, tmp_path / "x") / "a").read_bytes() == b"now a file\n"


# ---- 14: bounds on size, entries, names and depth; a full disk is one line ---------------------------------
def _bomb(zero_bytes: int) -> bytes:
    return tar_layer([E("zeros", data=bytes(zero_bytes))])


def test_gzip_bomb_is_refused_relative_to_its_compressed_size(tmp_path: Path) -> None:
    bomb = _bomb(16 << 20)
    assert len(bomb) < 64 << 10
    limits = LayerLimits(expansion_ratio=20, floor_bytes=1 << 20)
    root = tree_root(tmp_path)
    with pytest.raises(LayerTooLargeError, match=r"^bomb layer expands to more than 1\.0 MiB") as info:
        apply_layer(root, io.BytesIO(bomb), what="bomb layer", limits=limits)
    assert "\n" not in str(info.value)
    assert not (root / "zeros").exists() or (root / "zeros").stat().st_size == 0
    # Within the limits the same layer is fine.
    apply_layer(root, io.BytesIO(bomb), limits=LayerLimits(floor_bytes=32 << 20))
    assert (root / "zeros").stat().st_size == 16 << 20


def test_data_past_the_end_of_the_tar_counts_too(tmp_path: Path) -> None:
    tail = tar_layer([E("small", data=b"x")], gzip_it=False) + bytes(8 << 20)
    with pytest.raises(LayerTooLargeError):
        apply_layer(
            tree_root(tmp_path), io.BytesIO(gzip.compress(tail)), limits=LayerLimits(floor_bytes=1 << 20)
        )


@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar to write a sparse member")
def test_sparse_member_counts_its_expanded_size(tmp_path: Path) -> None:
    """A sparse member is a few bytes in the stream but its full size on the disk."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "holes", "wb") as f:
        f.truncate(64 << 20)
    run(["tar", "-C", str(src), "-cSf", str(tmp_path / "sparse.tar"), "holes"])
    layer = (tmp_path / "sparse.tar").read_bytes()
    assert len(layer) < 1 << 20
    with pytest.raises(LayerTooLargeError, match=r"^sparse layer expands to more than 8\.0 MiB"):
        apply_layer(
            tree_root(tmp_path),
            io.BytesIO(layer),
            what="sparse layer",
            limits=LayerLimits(floor_bytes=8 << 20),
        )
    assert not (tmp_path / "rootfs/holes").exists()


def test_gzip_bomb_through_the_cli_is_one_line_and_leaves_no_tree(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    ref = push(tmp_path, registry, "evil/bomb", [_bomb(24 << 20)])
    proc = supermachine("pull", "-q", "--rootfs", ref, cache=store.root, SUPERMACHINE_MAX_LAYER_BYTES="2M")
    message = assert_one_line_error(proc)
    assert message.startswith("error: layer 1/1 (sha256:") and "expands to more than 2.0 MiB" in message
    assert "SUPERMACHINE_MAX_LAYER_BYTES" in message
    assert not list(store.tmp_dir.iterdir()) and not list(store.rootfs_dir.glob("*"))
    bad = supermachine("pull", "-q", "--rootfs", ref, cache=store.root, SUPERMACHINE_MAX_LAYER_BYTES="lots")
    assert "SUPERMACHINE_MAX_LAYER_BYTES='lots' is not a size" in assert_one_line_error(bad)


def test_entry_count_name_length_and_depth_are_bounded(tmp_path: Path) -> None:
    many = tar_layer([E(f"f{i}") for i in range(101)])
    with pytest.raises(LayerLimitError, match=r"^layer has more than 100 entries$"):
        apply_layer(tree_root(tmp_path), io.BytesIO(many), limits=LayerLimits(max_entries=100))
    deep = "/".join(["d"] * 300)
    with pytest.raises(LayerLimitError, match="more than 256 levels deep"):
        apply_layer(tmp_path / "rootfs", io.BytesIO(tar_layer([E(deep, "dir")])))
    long_name = "n" * 5000
    with pytest.raises(LayerLimitError, match="longer than 4096 bytes"):
        apply_layer(tmp_path / "rootfs", io.BytesIO(tar_layer([E(long_name)])))
    # Depth built up through symlinks is bounded too, not just the names as written.
    chain = "/".join(["s"] * 200)
    via_links = tar_layer(
        [E(chain, "dir"), E("l", "symlink", target=chain), E("l/" + "/".join(["t"] * 100), "dir")]
    )
    with pytest.raises(LayerLimitError, match="resolves more than 256 levels deep"):
        apply_layer(tmp_path / "rootfs", io.BytesIO(via_links))


def _pax_layer(kind: bytes, **headers: str) -> bytes:
    """A file ``target``, then an entry ``e`` of type ``kind`` with extended header records, which
    can carry what no ustar field can (a NUL byte)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("target"), io.BytesIO(b""))
        info = tarfile.TarInfo("e")
        info.type, info.pax_headers = kind, headers
        tar.addfile(info, io.BytesIO(b""))
    return raw.getvalue()


@pytest.mark.parametrize(
    ("kind", "headers", "message"),
    [
        (tarfile.REGTYPE, {"path": "a\0b"}, r"layer: entry 'a\x00b' contains a NUL byte"),
        (tarfile.LNKTYPE, {"linkpath": "t\0t"}, r"layer: hard link target 't\x00t' contains a NUL byte"),
        (tarfile.SYMTYPE, {"linkpath": "t\0t"}, "layer: symlink 'e' has a target with a NUL byte"),
        (tarfile.REGTYPE, {"SCHILY.xattr.\0": "v"}, "layer: entry 'e' has an xattr name with a NUL byte"),
    ],
)
def test_nul_bytes_in_names_are_refused_as_unsafe(
    tmp_path: Path, kind: bytes, headers: dict[str, str], message: str
) -> None:
    """No file name can hold a NUL byte; the operating system refuses one with an exception, which
    used to escape as a bare ValueError (a traceback on the command line)."""
    with pytest.raises(UnsafeLayerError) as refused:
        apply_layer(tree_root(tmp_path), io.BytesIO(_pax_layer(kind, **headers)))
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"mtime": "1e23"}, "layer: entry 'e' has a modification time out of range (1e+23)"),
        ({"mtime": "-1e20"}, "layer: entry 'e' has a modification time out of range (-1e+20)"),
        ({"mtime": "nan"}, "layer: entry 'e' has a modification time out of range (nan)"),
        ({"uid": "4294967295"}, "layer: entry 'e' has uid 4294967295 (at most 4294967294)"),
        ({"gid": "-1"}, "layer: entry 'e' has gid -1 (at most 4294967294)"),
    ],
)
def test_owners_and_times_no_file_can_have_are_refused(
    tmp_path: Path, headers: dict[str, str], message: str
) -> None:
    """Extended headers give owners and times as any decimal text; out of range, the system calls
    raised OverflowError or ValueError (a traceback on the command line), or took -1 as "unchanged"."""
    with pytest.raises(UnsafeLayerError) as refused:
        apply_layer(tree_root(tmp_path), io.BytesIO(_pax_layer(tarfile.REGTYPE, **headers)))
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [
        ("mode", -5, tarfile.REGTYPE),
        ("mode", 2**40, tarfile.REGTYPE),
        ("devmajor", 2**40, tarfile.CHRTYPE),
        ("devminor", -3, tarfile.BLKTYPE),
        ("uid", 2**40, tarfile.DIRTYPE),
    ],
)
def test_base_256_numbers_out_of_range_are_refused(
    tmp_path: Path, field: str, value: int, kind: bytes
) -> None:
    """GNU headers give numbers in base 256, of any size and sign (a huge device number raised
    OverflowError; a negative mode was masked into setuid, setgid and sticky bits)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("e")
        info.type = kind
        if field != "mode":  # tarfile masks the mode it writes: patched into the header below
            setattr(info, field, value)
        tar.addfile(info, io.BytesIO(b""))
    if field == "mode":
        header = bytearray(raw.getvalue()[:512])
        header[100:108] = tarfile.itn(value, 8, tarfile.GNU_FORMAT)
        header[148:156] = b" " * 8
        header[148:155] = b"%06o\0" % tarfile.calc_chksums(bytes(header))[0]
        raw = io.BytesIO(bytes(header) + raw.getvalue()[512:])
    with pytest.raises(UnsafeLayerError) as refused:
        apply_layer(tree_root(tmp_path), io.BytesIO(raw.getvalue()))
    assert str(refused.value).startswith(f"layer: entry 'e' has {field} {value} (at most ")


def test_oversized_pax_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.pax_headers = {"comment": "x" * (2 << 20)}
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(LayerLimitError, match=r"^hdr layer has a \d+-byte extended header"):
        apply_layer(tree_root(tmp_path), io.BytesIO(gzip.compress(raw.getvalue())), what="hdr layer")


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)])
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@needs_root
def test_full_disk_while_downloading_is_one_line_with_detail(registry: Registry, tmp_path: Path) -> None:
    ref = push(tmp_path, registry, "big/random", [tar_layer([E("r", data=os.urandom(3 << 20))])])
    with tmpfs(tmp_path / "small-cache", "size=2m") as cache:
        proc = supermachine("pull", "-q", ref, cache=cache)
        message = assert_one_line_error(proc)
        assert "No space left on device" in message and f"{cache}/blobs" in message, message
        assert not list((cache / "blobs/sha256").glob("*.partial"))  # freed, not kept to resume


@needs_root
def test_full_disk_while_extracting_names_the_entry(registry: Registry, tmp_path: Path) -> None:
    layer = tar_layer([E("files", "dir")] + [E(f"files/f{i}", data=b"x") for i in range(200)])
    ref = push(tmp_path, registry, "many/files", [layer])
    with tmpfs(tmp_path / "few-inodes", "size=64m,nr_inodes=64") as cache:
        assert supermachine("pull", "-q", ref, cache=cache).returncode == 0
        message = assert_one_line_error(supermachine("pull", "-q", "--rootfs", ref, cache=cache))
        assert "No space left on device" in message and "cannot write entry 'files/f" in message, message
        assert f"{cache}/tmp/" in message
        assert not list((cache / "tmp").iterdir())


def test_squashfs_of_a_hostile_tree_has_no_escapes(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    """The same tricks through the whole pipeline: the image keeps its symlinks, the host keeps its files."""
    host = tmp_path / "victim"
    host.mkdir()
    layer = tar_layer(
        [
            E("etc", "dir"),
            E("out", "symlink", target=str(host)),
            E("out/planted", data=b"x"),
            E("etc", "symlink", target=str(host)),
            E("etc/.wh..wh..opq"),
        ]
    )
    image = pull(push(tmp_path, registry, "evil/pipeline", [layer]))
    out = unsquashfs_extract(build_squashfs(image), tmp_path / "x")
    assert list(host.iterdir()) == []
    assert os.readlink(out / "etc") == str(host)
    assert (out / str(host).lstrip("/") / "planted").read_bytes() == b"x"
