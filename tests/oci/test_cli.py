"""The image commands (pull, images, rmi, prune) and cache housekeeping."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from _support import Entry, LayoutWriter, Registry, make_layer, skopeo_copy
from click.testing import CliRunner
from supermachine.cli import images as images_cli
from supermachine.errors import ImageNotFoundError
from supermachine.oci import ImageStore, build_squashfs, load_image, pull
from supermachine.snapshots import metadata


@pytest.fixture
def cli() -> click.Group:
    group = click.Group("supermachine")
    images_cli.register(group)
    return group


def _two_images(tmp: Path, registry: Registry) -> tuple[str, str]:
    """Two images sharing their first layer."""
    shared = make_layer([Entry("shared", data=os.urandom(50_000))])
    layout = LayoutWriter(tmp / "two")
    refs = []
    for name in ("one", "two"):
        own = make_layer([Entry(name, data=os.urandom(20_000))])
        layout.tag(layout.image([(shared, "gzip"), (own, "gzip")], config={"Cmd": [name]}), name)
        ref = f"{registry.host}/test/{name}:v1"
        skopeo_copy(f"oci:{layout.path}:{name}", f"docker://{ref}")
        refs.append(ref)
    return refs[0], refs[1]


def test_pull_images_rmi_prune_commands(
    cli: click.Group, store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    one, two = _two_images(tmp_path, registry)
    runner = CliRunner()
    result = runner.invoke(cli, ["pull", one], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"Pulled {one}" in result.output and "Digest: sha256:" in result.output
    result = runner.invoke(cli, ["pull", "-q", "--rootfs", two], catch_exceptions=False)
    image_two = load_image(two)
    assert result.output.strip() == image_two.record.image_id
    assert store.rootfs_path(image_two.config_digest).exists()

    table = runner.invoke(cli, ["images"], catch_exceptions=False).output
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["REPOSITORY", "TAG", "IMAGE", "ID"]
    assert any(
        line.split()[:3] == [f"{registry.host}/test/two", "v1", image_two.record.image_id] for line in lines
    )
    assert len(lines) == 3
    assert sorted(runner.invoke(cli, ["images", "-q"]).output.split()) == sorted(
        r.image_id for r in store.images()
    )

    shared_layer = image_two.record.layers[0]
    own_layer = image_two.record.layers[1]
    result = runner.invoke(cli, ["rmi", two], catch_exceptions=False)
    assert f"Untagged: {two}" in result.output and "1 root filesystems" in result.output
    assert store.blobs.has(shared_layer) and not store.blobs.has(own_layer)
    assert not store.rootfs_path(image_two.config_digest).exists()
    assert [r.ref for r in store.images()] == [one]

    result = runner.invoke(cli, ["rmi", "nothing:here"])
    assert isinstance(result.exception, ImageNotFoundError)
    assert "no stored image matches 'nothing:here'" in str(result.exception)

    # prune: removes unreferenced blobs and interrupted downloads, keeps what images use.
    stray = store.blobs.dir / ("f" * 64)
    stray.write_bytes(b"stray")
    (store.blobs.dir / ("e" * 64 + ".partial")).write_bytes(b"half")
    result = runner.invoke(cli, ["prune"], catch_exceptions=False)
    assert result.output.startswith("Deleted 1 blobs and 0 root filesystems")
    assert not stray.exists() and not (store.blobs.dir / ("e" * 64 + ".partial")).exists()
    assert all(store.blobs.has(d) for d in store.images()[0].blobs())
    assert load_image(one).config.cmd == ("one",)

    # rmi by image id prefix
    result = runner.invoke(cli, ["rmi", load_image(one).record.image_id[:8]], catch_exceptions=False)
    assert f"Untagged: {one}" in result.output
    assert store.images() == [] and list(store.blobs.digests()) == []


def test_rmi_keeps_rootfs_shared_with_another_ref(store: ImageStore, busybox_pushed: str) -> None:
    tagged = pull(busybox_pushed)
    pinned = pull(busybox_pushed.rsplit(":", 1)[0] + "@" + tagged.record.manifest_digest)
    squashfs = build_squashfs(tagged)
    store.remove(tagged.ref)
    assert squashfs.exists() and [r.ref for r in store.images()] == [pinned.ref]
    assert all(store.blobs.has(d) for d in pinned.record.blobs())


@pytest.mark.skipif(
    importlib.util.find_spec("supermachine.cli.probe") is None, reason="the top-level CLI is not complete yet"
)
def test_console_errors_are_one_line(store: ImageStore, registry: Registry) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "python")}
    proc = subprocess.run(
        [sys.executable, "-m", "supermachine", "pull", f"{registry.host}/does/not-exist:v1"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: manifest for ")


def _raw_snapshot(snap: Path, workdir: Path) -> None:
    """A real snapshot (memory.bin, vmstate.bin) of a tiny raw guest of 2 MiB, no metadata yet."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or shutil.which("as") is None:
        pytest.skip("needs /dev/kvm and binutils for the tiny raw guest")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "snapshot"))
    import snap_guests
    from supermachine import _core

    vm = _core.Vm.start({"raw": str(snap_guests.build(snap_guests.COUNTER, workdir)), "memory_mib": 2})
    try:
        vm.snapshot(str(snap))
    finally:
        vm.stop()


def test_rmi_keeps_a_rootfs_a_snapshot_boots_from(
    store: ImageStore, busybox_pushed: str, tmp_path: Path
) -> None:
    image = pull(busybox_pushed)
    squashfs = build_squashfs(image)
    # A snapshot in the store beside the cache that was baked on this root filesystem.
    snap = store.root / "snapshots" / "warm"
    snap.parent.mkdir(parents=True)
    _raw_snapshot(snap, tmp_path)
    ident = metadata.FileIdentity("/boot/vmlinux", "sha256:" + "0" * 64)
    metadata.save(
        snap,
        metadata.SnapshotMetadata(
            image=metadata.ImageIdentity(image.ref, image.config_digest),
            memory_mib=2,
            vcpus=1,
            kernel=ident,
            agent=ident,
            run=metadata.RunDefaults(rootfs=str(squashfs)),
        ),
    )
    result = store.remove(image.ref)[1]
    assert squashfs.exists() and result.rootfs_images == 0
    shutil.rmtree(snap)
    assert store.prune().rootfs_images == 1 and not squashfs.exists()
