"""What `probe density` of a Dockerfile has each VM read by default: the regular files a build's own
layers leave in the root file system, with later layers' deletions, opaque directories and
replacements applied as overlayfs applies them. Checked against a hand-made expectation and against
the image unpacker (`apply_layer`), which applies the same layers to a real directory."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest
from supermachine.build.cache import LayerRef
from supermachine.oci.rootfs import apply_layer
from supermachine.oci.store import BlobStore
from supermachine.probes.density import built_files, check_read_path

Entry = tuple[str, str, bytes | str]  # name, kind (dir, file, link, hard), data or target


def layer(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.mode = 0o755 if kind == "dir" else 0o644
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
                tar.addfile(info)
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, str(data)
                tar.addfile(info)
            else:
                assert isinstance(data, bytes)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return gzip.compress(out.getvalue(), mtime=0)


LOWER: list[Entry] = [
    ("a", "dir", b""),
    ("a/x", "file", b"x"),
    ("a/sub", "dir", b""),
    ("a/sub/y", "file", b"y"),
    ("b", "file", b"b"),
    ("c", "dir", b""),
    ("c/z", "file", b"z"),
    ("d", "dir", b""),
    ("d/keep", "file", b"keep"),
    ("e", "file", b"e"),
    ("empty", "file", b""),
    ("g", "dir", b""),
    ("g/gone", "file", b"gone"),
]
UPPER: list[Entry] = [
    ("a", "dir", b""),
    ("a/.wh..wh..opq", "file", b""),  # /a/x and /a/sub/y are hidden ...
    ("a/new", "file", b"new"),  # ... but not what this layer puts there
    (".wh.b", "file", b""),
    ("c", "link", "d"),  # a link replaces the directory and all in it
    ("d", "dir", b""),
    ("d/more", "file", b"more"),  # a directory merges with the one below
    ("e", "dir", b""),  # a directory replaces a file
    ("e/inner", "file", b"inner"),
    ("g/.wh.gone", "file", b""),
]


def store(tmp_path: Path, layers: list[list[Entry]]) -> tuple[BlobStore, list[LayerRef]]:
    blobs = BlobStore(tmp_path / "blobs", tmp_path / "locks")
    refs = []
    for entries in layers:
        data = layer(entries)
        digest = blobs.put_bytes(data)
        refs.append(LayerRef("application/vnd.oci.image.layer.v1.tar+gzip", digest, len(data), digest))
    return blobs, refs


def unpacked_files(tmp_path: Path, blobs: BlobStore, refs: list[LayerRef]) -> list[str]:
    root = tmp_path / "root"
    root.mkdir()
    for ref in refs:
        with blobs.open(ref.digest) as f:
            apply_layer(root, f)
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink() and path.stat().st_size > 0:
                out.append("/" + str(path.relative_to(root)))
    return sorted(out)


def test_later_layers_delete_hide_and_replace_what_earlier_ones_made(tmp_path: Path) -> None:
    blobs, refs = store(tmp_path, [LOWER, UPPER])
    expected = ["/a/new", "/d/keep", "/d/more", "/e/inner"]
    assert built_files(refs, blobs) == expected
    assert unpacked_files(tmp_path, blobs, refs) == expected


def test_one_layer_gives_its_non_empty_regular_files_and_a_hard_links_first_path(tmp_path: Path) -> None:
    blobs, refs = store(tmp_path, [[*LOWER, ("a/twin", "hard", "a/x"), ("l", "link", "a/x")]])
    assert built_files(refs, blobs) == ["/a/sub/y", "/a/x", "/b", "/c/z", "/d/keep", "/e", "/g/gone"]
    assert built_files([], blobs) == []


def test_a_file_put_back_after_its_deletion_is_read(tmp_path: Path) -> None:
    blobs, refs = store(tmp_path, [LOWER, UPPER, [("b", "file", b"again"), ("a/x", "file", b"x2")]])
    expected = ["/a/new", "/a/x", "/b", "/d/keep", "/d/more", "/e/inner"]
    assert built_files(refs, blobs) == expected
    assert unpacked_files(tmp_path, blobs, refs) == expected


@pytest.mark.parametrize("path", ["etc/passwd", "/a/../etc/shadow", "/x\ny", "", "/a/..", "../x"])
def test_read_paths_must_be_absolute_without_dot_dot_or_newlines(path: str) -> None:
    from supermachine.errors import InputError

    with pytest.raises(InputError, match="expected an absolute guest path"):
        check_read_path(path)


def test_plain_absolute_read_paths_are_taken_as_given() -> None:
    assert check_read_path("/srv/a b/c..d") == "/srv/a b/c..d"
