"""New images from a parent + one layer (what ``vm.commit`` stores), without a VM: the layer comes
from a change stream written by :func:`supermachine.changes.write_layer`, the parent from a real
registry on loopback. The result must be a well-formed image whose root file system is the parent's
plus the changes, and whose config carries the requested changes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from supermachine.agent import FieldValue
from supermachine.changes import write_layer
from supermachine.errors import InputError
from supermachine.oci import ImageStore, build_rootfs, load_image, pull
from supermachine.oci.commit import ConfigChanges, apply_changes, check_new_ref, commit_layer
from supermachine.oci.manifest import OCI_LAYER_GZIP, OCI_MANIFEST


def _stream() -> list[dict[int, FieldValue] | bytes]:
    return [
        {1: b"etc", 2: 1, 3: 0o755, 13: 1},
        {1: b"etc/motd", 2: 0, 3: 0o600, 4: 7, 5: 8, 6: 9, 13: 1},
        b"committed",
        {1: b"etc/passwd", 2: 4, 13: 1},
        {1: b"opt", 2: 1, 3: 0o700},
        {1: b"opt/app", 2: 2, 3: 0o777, 8: b"/bin/busybox"},
    ]


def test_commit_stores_parent_plus_layer(busybox_pushed: str, store: ImageStore, tmp_path: Path) -> None:
    parent = pull(busybox_pushed)
    layer_file = tmp_path / "layer.tar.gz"
    layer = write_layer(iter(_stream()), layer_file, max_bytes=1 << 20)
    changes = ConfigChanges.parse(
        ['CMD ["cat", "/etc/motd"]', "ENV A=1 B='two words'", "LABEL x=y", "EXPOSE 80"]
    )
    new = commit_layer(
        parent,
        layer_file,
        digest=layer.digest,
        diff_id=layer.diff_id,
        media_type=layer.media_type,
        ref="localhost/committed:1",
        changes=changes,
        created_by="test",
        comment="a comment",
    )
    assert new.ref == "localhost/committed:1"
    assert load_image("localhost/committed:1").config_digest == new.config_digest
    assert new.manifest.media_type == OCI_MANIFEST
    assert [d.digest for d in new.layers] == [*(d.digest for d in parent.layers), layer.digest]
    assert new.layers[-1].media_type == OCI_LAYER_GZIP
    assert new.config.diff_ids == (*parent.config.diff_ids, layer.diff_id)
    assert new.config.cmd == ("cat", "/etc/motd")
    assert new.config.entrypoint == parent.config.entrypoint
    env = new.config.environment()
    assert env["A"] == "1" and env["B"] == "two words" and env["GREETING"] == "hello"
    assert new.config.labels == {"x": "y"} and new.config.exposed_ports == ("80/tcp",)
    raw = json.loads(store.blobs.read_bytes(new.config_digest))
    assert raw["history"][-1]["created_by"] == "test" and raw["history"][-1]["comment"] == "a comment"

    tree = build_rootfs(new, tmp_path / "tree")
    motd = tree / "etc/motd"
    assert motd.read_bytes() == b"committed"
    assert (motd.stat().st_mode & 0o7777, motd.stat().st_uid, motd.stat().st_gid) == (0o600, 7, 8)
    assert not (tree / "etc/passwd").exists()
    assert (tree / "opt/app").readlink() == Path("/bin/busybox")
    assert (tree / "bin/busybox").is_file()


def test_a_committed_image_is_a_valid_oci_image_for_skopeo(
    busybox_pushed: str, store: ImageStore, tmp_path: Path
) -> None:
    """skopeo reads the stored blobs as an OCI layout and copies them, checking every digest."""
    parent = pull(busybox_pushed)
    layer = write_layer(iter(_stream()), tmp_path / "l.tar.gz", max_bytes=1 << 20)
    new = commit_layer(
        parent,
        tmp_path / "l.tar.gz",
        digest=layer.digest,
        diff_id=layer.diff_id,
        media_type=layer.media_type,
        ref="localhost/committed:2",
        changes=ConfigChanges(),
        created_by="test",
    )
    layout = tmp_path / "layout"
    (layout / "blobs").mkdir(parents=True)
    (layout / "blobs" / "sha256").symlink_to(store.blobs.dir)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    manifest = store.blobs.read_bytes(new.record.manifest_digest)
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": new.record.manifest_digest,
                        "size": len(manifest),
                        "annotations": {"org.opencontainers.image.ref.name": "x"},
                    }
                ],
            }
        )
    )
    out = tmp_path / "copy"
    subprocess.run(["skopeo", "copy", f"oci:{layout}:x", f"oci:{out}:x"], check=True, capture_output=True)
    copied = json.loads((out / "index.json").read_text())["manifests"][0]["digest"]
    assert copied == new.record.manifest_digest


def test_config_changes_follow_docker_rules() -> None:
    config: dict[str, object] = {"config": {"Entrypoint": ["/e"], "Cmd": ["c"], "Env": ["A=1", "PATH=/bin"]}}
    apply_changes(config, ConfigChanges.of({"entrypoint": ["/new"], "env": {"A": "2"}}))
    section = config["config"]
    assert isinstance(section, dict)
    assert section["Entrypoint"] == ["/new"] and "Cmd" not in section  # a new entrypoint drops Cmd
    assert section["Env"] == ["A=2", "PATH=/bin"]
    assert ConfigChanges.of({"cmd": "echo hi"}).cmd == ("/bin/sh", "-c", "echo hi")
    assert ConfigChanges.parse(["ENV K v w"]).env == {"K": "v w"}
    assert ConfigChanges.parse(["VOLUME /data /logs"]).volumes == ("/data", "/logs")
    assert ConfigChanges.parse(['VOLUME ["/a"]']).volumes == ("/a",)
    assert ConfigChanges.parse(['VOLUME ["/bin/sh", "-c"]']).volumes == ("/bin/sh", "-c")
    assert ConfigChanges.parse(["USER 1000:1000", "WORKDIR /srv"]).user == "1000:1000"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"cmmd": ["x"]}, "unknown image config change 'cmmd'"),
        ({"cmd": 5}, "cmd must be a string"),
        ({"env": ["A=1"]}, "env must be a mapping"),
        ({"exposed_ports": ["http"]}, "not PORT"),
        ({"user": 0}, "user must be a string"),
    ],
)
def test_bad_config_changes_are_one_line(value: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        ConfigChanges.of(value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("RUN echo", "expected one of CMD"),
        ("CMD", "needs an argument"),
        ('CMD ["a"', "not a JSON list"),
        ("ENV =x", "is not KEY=VALUE"),
        ("EXPOSE 99999", "not PORT"),
    ],
)
def test_bad_change_lines_are_one_line(line: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        ConfigChanges.parse([line])


def test_new_refs_are_checked() -> None:
    assert check_new_ref("app:1") == "docker.io/library/app:1"
    for bad in ("UPPER:1", "app@sha256:" + "0" * 64, ""):
        with pytest.raises(InputError, match="cannot name the new image"):
            check_new_ref(bad)
