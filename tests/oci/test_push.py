"""Pushing stored images to a real registry on loopback (plain and with basic auth) and writing OCI
layouts; what was pushed is read back by skopeo and by supermachine's own pull."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
from _support import Registry
from conftest import PASSWORD, USER
from supermachine.errors import AuthenticationError, InputError
from supermachine.oci import ImageStore, build_rootfs, pull
from supermachine.oci.push import push, write_oci_layout


def _skopeo_digest(ref: str, *creds: str) -> str:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", *creds, "--format", "{{.Digest}}", f"docker://{ref}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_push_then_skopeo_and_pull_read_it_back(
    busybox_pushed: str, registry: Registry, store: ImageStore, tmp_path: Path
) -> None:
    image = pull(busybox_pushed)
    dest = f"{registry.host}/pushed/busybox:copy"
    digest = push(image, dest)
    assert digest == image.record.manifest_digest
    assert _skopeo_digest(dest) == digest
    copied = tmp_path / "copied"
    subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{dest}", f"oci:{copied}:x"], check=True
    )
    # Pushing again sends nothing new and gives the same digest.
    assert push(image, dest) == digest
    other = ImageStore(tmp_path / "other")
    back = pull(dest, store=other)
    assert back.record.manifest_digest == digest
    a, b = build_rootfs(image, tmp_path / "a"), build_rootfs(back, tmp_path / "b")
    assert sorted(p.name for p in a.rglob("*")) == sorted(p.name for p in b.rglob("*"))


def test_push_with_credentials(
    busybox_pushed: str,
    auth_registry: Registry,
    store: ImageStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = pull(busybox_pushed)
    dest = f"{auth_registry.host}/private/busybox:v1"
    with pytest.raises(AuthenticationError, match="requires a login"):
        push(image, dest)
    config_dir = tmp_path / "dockercfg"
    config_dir.mkdir()
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (config_dir / "config.json").write_text(
        json.dumps({"auths": {f"http://{auth_registry.host}": {"auth": token}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    digest = push(image, dest)
    assert _skopeo_digest(dest, f"--creds={USER}:{PASSWORD}") == digest


def test_oci_layout_output_is_read_by_skopeo_and_pull(
    busybox_pushed: str, store: ImageStore, tmp_path: Path
) -> None:
    image = pull(busybox_pushed)
    layout = tmp_path / "layout"
    write_oci_layout(image, layout, name="v9")
    out = subprocess.run(
        ["skopeo", "inspect", "--format", "{{.Digest}}", f"oci:{layout}:v9"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == image.record.manifest_digest
    assert pull(f"oci:{layout}:v9", store=ImageStore(tmp_path / "other")).config_digest == image.config_digest
    with pytest.raises(InputError, match="already exists"):
        write_oci_layout(image, layout)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".layout")] == []


def test_cli_push_bad_destination_is_one_line(busybox_pushed: str, store: ImageStore) -> None:
    pull(busybox_pushed)
    result = subprocess.run(
        [sys.executable, "-m", "supermachine", "push", busybox_pushed, "Bad Name"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
