"""Pulling from real registries: tags, digests, indexes, corruption, dropped connections, concurrency."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _support import Entry, FaultyProxy, LayoutWriter, Registry, make_layer, sha256_file, skopeo_copy
from conftest import manifest_digest
from supermachine.errors import CorruptBlobError, DigestMismatchError, ManifestError, RegistryError
from supermachine.oci import ImageStore, Platform, build_squashfs, load_image, pull


def _random_image(
    tmp: Path, registry: Registry, repo: str, sizes: list[int], tag: str = "v1"
) -> tuple[str, dict]:
    """Push an image whose layers are random files of ``sizes`` bytes; returns (ref, manifest desc)."""
    layout = LayoutWriter(tmp / f"layout-{repo.replace('/', '-')}")
    layers = [
        (make_layer([Entry(f"data/blob{i}.bin", data=os.urandom(size))], "gzip"), "gzip")
        for i, size in enumerate(sizes)
    ]
    desc = layout.image(layers, config={"Cmd": ["/bin/true"]})
    layout.tag(desc, tag)
    ref = f"{registry.host}/{repo}:{tag}"
    skopeo_copy(f"oci:{layout.path}:{tag}", f"docker://{ref}")
    return ref, desc


def _cache_files(store: ImageStore) -> list[str]:
    return sorted(p.name for p in store.blobs.dir.iterdir()) if store.blobs.dir.exists() else []


def test_pull_by_tag_records_image_and_verified_blobs(store: ImageStore, busybox_pushed: str) -> None:
    image = pull(busybox_pushed)
    assert image.record.ref == busybox_pushed
    assert image.record.platform == "linux/amd64"
    assert image.config.entrypoint == ("/bin/sh",)
    assert image.config.environment()["GREETING"] == "hello"
    assert image.config.working_dir == "/tmp"
    assert len(image.layers) == 2 and len(image.config.diff_ids) == 2
    for digest in image.record.blobs():
        assert sha256_file(store.blobs.path(digest)) == digest
    assert image.record.manifest_digest == manifest_digest(busybox_pushed)
    assert [r.ref for r in store.images()] == [busybox_pushed]
    assert not [n for n in _cache_files(store) if not n.isalnum()]  # no partial or temp files
    again = load_image(busybox_pushed)
    assert again.record == image.record and again.config == image.config
    assert load_image(image.record.image_id).record == image.record


def test_pull_by_digest(store: ImageStore, busybox_pushed: str) -> None:
    digest = manifest_digest(busybox_pushed)
    by_digest = busybox_pushed.rsplit(":", 1)[0] + "@" + digest
    image = pull(by_digest)
    assert image.record.manifest_digest == digest
    assert image.record.ref == by_digest
    with pytest.raises(RegistryError, match="not found"):
        pull(busybox_pushed.rsplit(":", 1)[0] + "@sha256:" + "0" * 64)


def test_second_pull_uses_cache(store: ImageStore, busybox_pushed: str, registry: Registry) -> None:
    pull(busybox_pushed)
    blobs = {p: p.stat().st_mtime_ns for p in store.blobs.dir.iterdir()}
    registry_blobs = registry.storage / "docker/registry/v2/blobs"
    image = pull(busybox_pushed)
    assert {p: p.stat().st_mtime_ns for p in store.blobs.dir.iterdir()} == blobs
    assert registry_blobs.exists() and image.record.ref == busybox_pushed


def test_a_store_can_be_named_by_a_string(busybox_pushed: str, tmp_path: Path) -> None:
    """As every other path the API takes: a str or any os.PathLike."""
    image = pull(busybox_pushed, store=ImageStore(str(tmp_path / "cache")))
    assert (tmp_path / "cache" / "images.json").is_file()
    assert load_image(busybox_pushed, ImageStore(str(tmp_path / "cache"))).record == image.record


def test_multi_arch_index_selects_platform(store: ImageStore, registry: Registry, tmp_path: Path) -> None:
    layout = LayoutWriter(tmp_path / "multi")
    amd = layout.image([(make_layer([Entry("arch", data=b"amd64\n")]), "gzip")], arch="amd64")
    arm = layout.image([(make_layer([Entry("arch", data=b"arm64\n")]), "gzip")], arch="arm64")
    arm["platform"]["variant"] = "v8"
    layout.tag(layout.index([amd, arm]), "multi")
    ref = f"{registry.host}/test/multi:latest"
    skopeo_copy(f"oci:{layout.path}:multi", f"docker://{ref}", "--all")

    default = pull(ref)
    assert default.record.platform == "linux/amd64"
    assert default.record.manifest_digest == amd["digest"]
    assert default.record.index_digest is not None
    arm_image = pull(ref, platform="linux/arm64")
    assert arm_image.record.manifest_digest == arm["digest"]
    assert arm_image.config.platform == Platform("linux", "arm64")
    assert pull(ref, platform=Platform.parse("aarch64")).record.manifest_digest == arm["digest"]
    with pytest.raises(
        ManifestError, match=r"no image for linux/s390x \(available: linux/amd64, linux/arm64/v8\)"
    ):
        pull(ref, platform="linux/s390x")


def test_corrupt_blob_is_one_line_error_and_leaves_nothing(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    ref, desc = _random_image(tmp_path, registry, "test/corrupt", [300_000, 200_000])
    manifest = json.loads(
        (tmp_path / "layout-test-corrupt" / "blobs/sha256" / desc["digest"][7:]).read_bytes()
    )
    bad = manifest["layers"][1]["digest"]
    data = registry.blob_data(bad)
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0xFF  # same size, different bytes
    data.write_bytes(bytes(content))

    with pytest.raises(DigestMismatchError) as info:
        pull(ref)
    message = str(info.value)
    assert "\n" not in message
    assert bad in message
    assert not store.blobs.has(bad)
    assert not [n for n in _cache_files(store) if n.endswith(".partial") or n.startswith(".")]
    assert store.images() == []


def test_dropped_connection_resumes_with_range(store: ImageStore, registry: Registry, tmp_path: Path) -> None:
    ref, _ = _random_image(tmp_path, registry, "test/flaky", [2_000_000])
    proxy = FaultyProxy(registry.host, cut_after=700_000).start()
    try:
        image = pull(ref.replace(registry.host, proxy.host))
    finally:
        proxy.stop()
    layer = image.layers[0].digest
    blob_requests = [(rng, status) for path, rng, status in proxy.log if path.endswith(layer)]
    assert blob_requests[0] == (None, 200)
    assert blob_requests[1][0] is not None and blob_requests[1][0].startswith("bytes=")
    assert int(blob_requests[1][0][6:].rstrip("-")) >= 600_000  # resumed, not restarted
    assert blob_requests[1][1] == 206
    assert sha256_file(store.blobs.path(layer)) == layer


def test_malformed_manifest_is_one_line_error(
    store: ImageStore, busybox_pushed: str, registry: Registry
) -> None:
    for body, pattern in (
        (b'{"schemaVersion": 2, "layers": [', "not valid JSON"),
        (
            b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": {}, '
            b'"layers": "nope"}',
            "no 'layers' list",
        ),
        (b'{"schemaVersion": 1, "fsLayers": []}', "schema 1"),
    ):
        proxy = FaultyProxy(registry.host, manifest_body=body).start()
        try:
            with pytest.raises(ManifestError, match=pattern) as info:
                pull(busybox_pushed.replace(registry.host, proxy.host))
        finally:
            proxy.stop()
        assert "\n" not in str(info.value)
    assert store.images() == []


def test_unreachable_registry_is_one_line_error(store: ImageStore) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RegistryError) as info:
        pull(f"127.0.0.1:{port}/nothing/here:v1", retries=1)
    assert "\n" not in str(info.value) and "failed after 2 attempts" in str(info.value)


def test_two_concurrent_pulls_share_the_cache(store: ImageStore, registry: Registry, tmp_path: Path) -> None:
    ref, _ = _random_image(tmp_path, registry, "test/concurrent", [4_000_000, 3_000_000, 2_000_000])
    script = textwrap.dedent(
        f"""
        from supermachine.oci import pull
        image = pull({ref!r}, jobs=2)
        print(image.record.manifest_digest)
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "python"), *sys.path]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1].decode()[-500:] for o in outputs]
    assert outputs[0][0] == outputs[1][0]
    files = _cache_files(store)
    assert all(len(n) == 64 for n in files), files
    for name in files:
        assert hashlib.sha256((store.blobs.dir / name).read_bytes()).hexdigest() == name
    assert [r.ref for r in store.images()] == [ref]


# ---- a cached blob that rotted on disk is never trusted ---------------------------------------------------
class NoteRecorder:
    """A real progress reporter that keeps the final note of every blob."""

    def __init__(self) -> None:
        self.notes: dict[str, str] = {}

    def start(self, key: str, description: str, total: int) -> None:
        pass

    def update(self, key: str, completed: int) -> None:
        pass

    def finish(self, key: str, note: str) -> None:
        self.notes[key] = note


def _flip_a_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(content))


def test_pull_discards_a_corrupt_cached_blob_and_fetches_it_again(
    store: ImageStore, registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ref, _ = _random_image(tmp_path, registry, "test/rot", [300_000])
    image = pull(ref)
    layer = image.layers[0].digest
    _flip_a_byte(store.blobs.path(layer))
    notes = NoteRecorder()
    with caplog.at_level(logging.WARNING, logger="supermachine.oci.store"):
        again = pull(ref, progress=notes)
    assert "corrupt" in notes.notes[layer] and "fetched again" in notes.notes[layer]
    assert notes.notes[image.config_digest] == "cached"
    assert any(layer in r.getMessage() and "discarded" in r.getMessage() for r in caplog.records)
    assert sha256_file(store.blobs.path(layer)) == layer
    assert build_squashfs(again).is_file()


def test_build_discards_a_corrupt_layer_and_the_next_pull_heals_it(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    ref, _ = _random_image(tmp_path, registry, "test/rot-build", [300_000])
    image = pull(ref)
    layer = image.layers[0].digest
    _flip_a_byte(store.blobs.path(layer))
    with pytest.raises(CorruptBlobError) as info:
        build_squashfs(image)
    message = str(info.value)
    assert (
        "\n" not in message
        and message.startswith(f"layer 1/1 ({layer})")
        and "pull the image again" in message
    )
    assert not store.blobs.has(layer)
    assert not list(store.tmp_dir.iterdir()) and not store.rootfs_path(image.config_digest).exists()
    assert build_squashfs(pull(ref)).is_file()


def test_cli_pull_heals_a_corrupt_cache_and_says_so(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    ref, _ = _random_image(tmp_path, registry, "test/rot-cli", [200_000])
    image = pull(ref)
    for digest in (image.config_digest, image.layers[0].digest):
        _flip_a_byte(store.blobs.path(digest))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "python")}
    proc = subprocess.run(
        [sys.executable, "-m", "supermachine", "pull", "-q", "--rootfs", ref],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == image.record.image_id
    for digest in (image.config_digest, image.layers[0].digest):
        assert f"discarded cached blob {digest}" in proc.stderr
        assert sha256_file(store.blobs.path(digest)) == digest
    assert store.rootfs_path(image.config_digest).is_file()
