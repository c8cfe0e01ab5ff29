"""Root filesystems: layer semantics (whiteouts, links, metadata), path safety, squashfs output."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest
from _support import (
    Entry,
    LayoutWriter,
    Registry,
    make_layer,
    run,
    skopeo_copy,
    unsquashfs_extract,
    unsquashfs_list,
)
from supermachine import kernel
from supermachine.errors import DigestMismatchError, LayerError, RootfsError, UnsafeLayerError
from supermachine.oci import ImageStore, apply_layer, build_rootfs, build_squashfs, pull
from supermachine.oci.rootfs import default_compression


def _push(tmp: Path, registry: Registry, repo: str, layers: list[tuple[bytes, str]], **config: object) -> str:
    layout = LayoutWriter(tmp / f"layout-{repo.replace('/', '-')}")
    layout.tag(layout.image(layers, config=dict(config)), "v1")
    ref = f"{registry.host}/{repo}:v1"
    skopeo_copy(f"oci:{layout.path}:v1", f"docker://{ref}")
    return ref


def test_busybox_squashfs_contents(store: ImageStore, busybox_pushed: str, tmp_path: Path) -> None:
    image = pull(busybox_pushed)
    squashfs = build_squashfs(image)
    assert squashfs == store.rootfs_path(image.config_digest) and squashfs.is_file()
    listing = unsquashfs_list(squashfs)
    assert "/bin/busybox" in listing
    assert listing["/bin/sh"].startswith("lrwxrwxrwx")
    assert "/etc/hostname" not in listing  # deleted in layer 2: umoci wrote a whiteout
    assert not any(".wh." in p for p in listing)
    assert listing["/tmp"].startswith("drwxrwxrwt")
    out = unsquashfs_extract(squashfs, tmp_path / "x")
    assert (out / "etc/motd").read_text() == "layer two\n"
    assert (out / "etc/motd").stat().st_ino == (out / "etc/motd.hardlink").stat().st_ino
    assert (out / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert os.readlink(out / "bin/sh") == "busybox"
    # Cached: a second build returns the same file without rebuilding.
    mtime = squashfs.stat().st_mtime_ns
    assert build_squashfs(image) == squashfs and squashfs.stat().st_mtime_ns == mtime
    assert not list(store.tmp_dir.iterdir()) and [p.name for p in store.rootfs_dir.iterdir()] == [
        squashfs.name
    ]


def _superblock(squashfs: Path) -> str:
    return run(["unsquashfs", "-s", str(squashfs)]).stdout


def test_the_default_compression_follows_the_kind_of_host(tmp_path: Path) -> None:
    assert default_compression(tmp_path) == "gzip"
    (tmp_path / "kvm_pvm").mkdir()
    assert default_compression(tmp_path) == "none"
    assert default_compression() == ("none" if kernel.emulating_host() else "gzip")


def test_root_filesystems_are_built_with_the_compression_asked_for_or_the_hosts(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    layer = make_layer([Entry("data.txt", data=b"squash me " * 50_000)])  # 500 kB, compresses well
    ref = _push(tmp_path, registry, "test/compressions", [(layer, "gzip")])
    image = pull(ref)
    refused = r"unknown root filesystem compression 'lz77': expected one of gzip, xz, zstd, none"
    with pytest.raises(RootfsError, match=refused):
        build_squashfs(image, compression="lz77")
    assert not store.rootfs_path(image.config_digest).exists()  # refused before any work
    built = _superblock(build_squashfs(image))
    if default_compression() == "none":
        assert "Data is uncompressed" in built and "Fragments are uncompressed" in built
    else:
        assert "Compression gzip" in built and "Data is compressed" in built
    for compression in ("gzip", "xz", "zstd"):
        squashfs = build_squashfs(image, compression=compression, force=True)
        assert f"Compression {compression}" in _superblock(squashfs)
        assert "Data is compressed" in _superblock(squashfs)
    uncompressed = build_squashfs(image, compression="none", force=True)
    assert "Data is uncompressed" in _superblock(uncompressed)
    extracted = unsquashfs_extract(uncompressed, tmp_path / "x")
    assert (extracted / "data.txt").read_bytes() == b"squash me " * 50_000


def test_whiteouts_opaque_dirs_hardlinks_and_compressions(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    lower = make_layer(
        [
            Entry("etc", "dir", mode=0o755),
            Entry("etc/keep", data=b"keep"),
            Entry("etc/gone", data=b"gone"),
            Entry("opq", "dir", mode=0o755),
            Entry("opq/old-a", data=b"a"),
            Entry("opq/sub", "dir", mode=0o755),
            Entry("opq/sub/old-b", data=b"b"),
            Entry("dir-gone", "dir", mode=0o755),
            Entry("dir-gone/x", data=b"x"),
            Entry("orig", data=b"linked content", mode=0o640),
            Entry("link-to-orig", "hardlink", target="orig"),
        ],
        "gzip",
    )
    upper = make_layer(
        [
            Entry("etc/.wh.gone"),
            Entry(".wh.dir-gone"),
            Entry("opq/new-before-marker", data=b"kept: same layer"),
            Entry("opq/.wh..wh..opq"),
            Entry("opq/new-after", data=b"new"),
            Entry("second-link", "hardlink", target="orig"),
        ],
        "zstd",
    )
    top = make_layer([Entry("plain.txt", data=b"uncompressed layer")], "none")
    ref = _push(tmp_path, registry, "test/whiteouts", [(lower, "gzip"), (upper, "zstd"), (top, "none")])
    out = unsquashfs_extract(build_squashfs(pull(ref)), tmp_path / "x")
    assert sorted(os.listdir(out)) == ["etc", "link-to-orig", "opq", "orig", "plain.txt", "second-link"]
    assert sorted(os.listdir(out / "etc")) == ["keep"]
    assert sorted(os.listdir(out / "opq")) == ["new-after", "new-before-marker"]
    inodes = {(out / n).stat().st_ino for n in ("orig", "link-to-orig", "second-link")}
    assert len(inodes) == 1 and (out / "orig").stat().st_nlink == 3
    assert (out / "second-link").read_bytes() == b"linked content"
    assert (out / "plain.txt").read_bytes() == b"uncompressed layer"


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership, device nodes and trusted xattrs need root")
def test_metadata_devices_owners_modes_xattrs(store: ImageStore, registry: Registry, tmp_path: Path) -> None:
    layer = make_layer(
        [
            Entry("dev", "dir", mode=0o755),
            Entry("dev/null", "char", mode=0o666, dev=(1, 3)),
            Entry("dev/loop9", "block", mode=0o660, gid=6, dev=(7, 9)),
            Entry("dev/fifo", "fifo", mode=0o600),
            Entry("suid", data=b"#!/bin/sh\n", mode=0o4755, uid=1234, gid=5678),
            Entry("capped", data=b"x", xattrs={"user.comment": "hello", "trusted.flag": "1"}),
            Entry("sym", "symlink", target="suid", uid=42, gid=43),
        ],
        "gzip",
    )
    ref = _push(tmp_path, registry, "test/metadata", [(layer, "gzip")])
    image = pull(ref)
    tree = build_rootfs(image, tmp_path / "tree")
    st = os.lstat(tree / "dev/null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stat.S_IMODE(st.st_mode) == 0o666
    st = os.lstat(tree / "dev/loop9")
    assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev), st.st_gid) == (7, 9, 6)
    assert stat.S_ISFIFO(os.lstat(tree / "dev/fifo").st_mode)
    st = os.lstat(tree / "suid")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4755, 1234, 5678)
    assert os.getxattr(tree / "capped", "user.comment") == b"hello"
    assert os.getxattr(tree / "capped", "trusted.flag") == b"1"
    st = os.lstat(tree / "sym")
    assert stat.S_ISLNK(st.st_mode) and (st.st_uid, st.st_gid) == (42, 43)

    squashfs = build_squashfs(image)
    listing = unsquashfs_list(squashfs)
    assert listing["/suid"].split()[:2] == ["-rwsr-xr-x", "1234/5678"]
    assert listing["/dev/null"].startswith("crw-rw-rw-")
    out = unsquashfs_extract(squashfs, tmp_path / "x")
    assert os.getxattr(out / "capped", "user.comment") == b"hello"
    assert os.lstat(out / "suid").st_uid == 1234


@pytest.mark.parametrize(
    ("entries", "pattern"),
    [
        ([Entry("../escape", data=b"x")], r"'\.\./escape' contains '\.\.'"),
        ([Entry("/etc/abs", data=b"x")], "is an absolute path"),
        ([Entry("a/../../escape", data=b"x")], "contains '..'"),
        (
            [Entry("up", "symlink", target="../../../../../../.."), Entry("up/escape", data=b"x")],
            "resolves outside the root through a symlink",
        ),
        (
            [Entry("d", "dir"), Entry("d/up", "symlink", target="../.."), Entry("d/up/escape", data=b"x")],
            "resolves outside the root through a symlink",
        ),
        (
            [Entry("hl", "hardlink", target="../../etc/passwd")],
            "hard link target '../../etc/passwd' contains",
        ),
        ([Entry("hl", "hardlink", target="/etc/passwd")], "is an absolute path"),
        ([Entry("dir/.wh...")], "names no file"),
        ([Entry(".wh..")], "names no file"),
    ],
)
def test_path_escapes_are_refused(tmp_path: Path, entries: list[Entry], pattern: str) -> None:
    root = tmp_path / "deep" / "er" / "root"
    root.mkdir(parents=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(UnsafeLayerError, match=pattern) as info:
        apply_layer(root, io.BytesIO(make_layer(entries)), what="evil layer")
    assert "\n" not in str(info.value) and str(info.value).startswith("evil layer: ")
    after = sorted(str(p) for p in tmp_path.rglob("*") if not str(p).startswith(str(root) + "/"))
    assert after == before  # nothing appeared outside the root


def test_absolute_symlink_resolves_inside_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    layer = make_layer(
        [Entry("etc", "dir"), Entry("link", "symlink", target="/etc"), Entry("link/inside", data=b"ok")]
    )
    apply_layer(root, io.BytesIO(layer))
    assert (root / "etc/inside").read_bytes() == b"ok"
    assert os.readlink(root / "link") == "/etc"
    # A file replacing a symlink replaces it; it is never written through it.
    apply_layer(root, io.BytesIO(make_layer([Entry("link", data=b"now a file")])))
    assert not (root / "link").is_symlink() and (root / "etc/inside").read_bytes() == b"ok"


def test_escape_through_full_pipeline_is_refused(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    layer = make_layer([Entry("x", "symlink", target="../../../../../../tmp"), Entry("x/pwned", data=b"x")])
    ref = _push(tmp_path, registry, "test/evil", [(layer, "gzip")])
    image = pull(ref)
    with pytest.raises(
        UnsafeLayerError, match=r"layer 1/1 \(sha256:[0-9a-f]{64}\): entry 'x/pwned' resolves outside"
    ):
        build_squashfs(image)
    assert not Path("/tmp/pwned").exists()
    assert not store.rootfs_path(image.config_digest).exists()
    assert not list(store.tmp_dir.iterdir()) and not list(store.rootfs_dir.iterdir())


def test_diff_id_mismatch_and_garbage_layers(tmp_path: Path) -> None:
    good = make_layer([Entry("f", data=b"x")], "gzip")
    with pytest.raises(DigestMismatchError, match="uncompressed content has digest sha256:"):
        apply_layer(tmp_path, io.BytesIO(good), diff_id="sha256:" + "1" * 64)
    with pytest.raises(LayerError, match="not a valid tar stream"):
        apply_layer(tmp_path, io.BytesIO(b"\x1f\x8b" + b"garbage" * 100))
    with pytest.raises(LayerError, match="not a valid tar stream"):
        apply_layer(tmp_path, io.BytesIO(b"\x28\xb5\x2f\xfd" + b"garbage" * 100))
