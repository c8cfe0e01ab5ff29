"""Offline inputs: OCI layout directories, OCI archives and docker-save tarballs made by skopeo/umoci."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
from _support import Entry, LayoutWriter, make_layer, skopeo_copy, unsquashfs_list
from conftest import BusyboxImage
from supermachine.errors import InputError
from supermachine.oci import (
    ImageStore,
    LocalSource,
    Reference,
    build_squashfs,
    load_image,
    parse_source,
    pull,
)


def test_oci_layout_directory(store: ImageStore, busybox_layout: BusyboxImage, busybox_pushed: str) -> None:
    layout = busybox_layout.layout
    image = pull(f"oci:{layout}:v1")
    assert image.record.ref == f"oci:{layout}:v1" and image.record.source == "oci"
    from_registry = pull(busybox_pushed)
    assert image.config_digest == from_registry.config_digest
    assert image.record.layers == from_registry.record.layers  # shared, content-addressed blobs
    assert len({r.config_digest for r in store.images()}) == 1
    # Plain paths are detected, with or without a tag; the stored image is found by any spelling.
    assert pull(str(layout)).record.ref == f"oci:{layout}"
    assert pull(f"{layout}:v1").record.ref == f"oci:{layout}:v1"
    assert load_image(f"{layout}:v1").record.ref == f"oci:{layout}:v1"
    listing = unsquashfs_list(build_squashfs(image))
    assert "/etc/motd" in listing and "/etc/hostname" not in listing
    with pytest.raises(InputError, match="has no image tagged 'nope' \\(tags: v1\\)"):
        pull(f"oci:{layout}:nope")


def test_docker_archive_from_skopeo(store: ImageStore, busybox_layout: BusyboxImage, tmp_path: Path) -> None:
    archive = tmp_path / "busybox.tar"
    skopeo_copy(f"oci:{busybox_layout.layout}:v1", f"docker-archive:{archive}:example.com/busybox:v1")
    with tarfile.open(archive) as tar:
        assert "manifest.json" in tar.getnames()
    image = pull(f"docker-archive:{archive}")
    assert image.record.source == "docker-archive"
    assert image.config.entrypoint == ("/bin/sh",)
    assert len(image.layers) == 2
    for digest in image.record.blobs():
        assert store.blobs.has(digest)
    # Selecting by name, and plain-path detection.
    assert pull(f"docker-archive:{archive}:example.com/busybox:v1").config_digest == image.config_digest
    assert pull(str(archive)).record.ref == f"docker-archive:{archive}"
    with pytest.raises(InputError, match="has no image named 'other:v2'"):
        pull(f"docker-archive:{archive}:other:v2")
    listing = unsquashfs_list(build_squashfs(image))
    assert "/bin/busybox" in listing and "/etc/hostname" not in listing


def test_oci_archive_tarball_and_index(store: ImageStore, tmp_path: Path) -> None:
    layout = LayoutWriter(tmp_path / "layout")
    amd = layout.image([(make_layer([Entry("which", data=b"amd")]), "gzip")], arch="amd64")
    arm = layout.image([(make_layer([Entry("which", data=b"arm")]), "zstd")], arch="arm64")
    layout.tag(layout.index([amd, arm]), "both")
    archive = tmp_path / "layout.tar"
    with tarfile.open(archive, "w") as tar:
        for name in sorted(os.listdir(layout.path)):
            tar.add(layout.path / name, arcname=name)
    image = pull(str(archive), platform="linux/arm64")
    assert image.record.manifest_digest == arm["digest"]
    assert image.record.index_digest is not None
    assert pull(f"oci:{archive}:both").record.manifest_digest == amd["digest"]


def test_bad_local_inputs(store: ImageStore, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither an OCI image layout nor a docker-save archive"):
        pull(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="does not exist"):
        pull(f"oci:{tmp_path}/missing")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(InputError, match="not a readable tar archive"):
        pull(str(tmp_path / "junk.tar"))


def test_parse_source_dispatch(tmp_path: Path) -> None:
    assert parse_source("alpine") == Reference("docker.io", "library/alpine", "latest")
    assert parse_source(f"oci:{tmp_path}:tag") == LocalSource("oci", tmp_path.resolve(), "tag")
    assert parse_source(f"{tmp_path}") == LocalSource("auto", tmp_path.resolve(), None)
    assert parse_source(f"docker-archive:{tmp_path}:name:tag") == LocalSource(
        "docker-archive", tmp_path.resolve(), "name:tag"
    )
