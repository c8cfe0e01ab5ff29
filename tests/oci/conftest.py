"""Fixtures for the OCI tests: real registries (plain, htpasswd, token auth) and real test images."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _support import (
    Registry,
    TokenServer,
    busybox_rootfs,
    missing_tools,
    run,
    skopeo_copy,
    start_registry,
    umoci_add_layer,
    umoci_image,
)
from supermachine.oci import ImageStore

USER, PASSWORD = "alice", "s3cret-pw"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes minutes (debootstrap); deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def tools() -> None:
    missing = missing_tools()
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")


@pytest.fixture(scope="session")
def registry(tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def auth_registry(tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("auth-registry")
    htpasswd = run(["htpasswd", "-Bbn", USER, PASSWORD]).stdout
    (root / "htpasswd").write_text(htpasswd)
    reg = start_registry(root, {"htpasswd": {"realm": "supermachine-test", "path": str(root / "htpasswd")}})
    reg.credentials = (USER, PASSWORD)
    yield reg
    reg.stop()


@dataclass
class TokenRegistry:
    registry: Registry
    server: TokenServer


@pytest.fixture(scope="session")
def token_registry(tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRegistry]:
    root = tmp_path_factory.mktemp("token-registry")
    server = TokenServer(root / "token", USER, PASSWORD)
    reg = start_registry(root, server.registry_auth())
    reg.credentials = (USER, PASSWORD)
    yield TokenRegistry(reg, server)
    reg.stop()
    server.stop()


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ImageStore:
    """An empty cache in a temp dir, also used by anything that calls ImageStore() itself."""
    monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))  # never the user's credentials
    return ImageStore()


@dataclass
class BusyboxImage:
    layout: Path
    tag: str


@pytest.fixture(scope="session")
def busybox_layout(tools: None, tmp_path_factory: pytest.TempPathFactory) -> BusyboxImage:
    """A two-layer busybox image made by umoci: the second layer deletes a file (whiteout) and adds one."""
    work = tmp_path_factory.mktemp("busybox")
    layout = work / "layout"
    umoci_image(
        layout,
        "v1",
        busybox_rootfs(work / "rootfs"),
        work,
        {"entrypoint": "/bin/sh", "cmd": "-c", "env": "GREETING=hello", "workingdir": "/tmp", "user": "0:0"},
    )

    def second(rootfs: Path) -> None:
        (rootfs / "etc" / "hostname").unlink()
        (rootfs / "etc" / "motd").write_text("layer two\n")
        os.link(rootfs / "etc" / "motd", rootfs / "etc" / "motd.hardlink")

    umoci_add_layer(layout, "v1", work, second)
    return BusyboxImage(layout, "v1")


@pytest.fixture(scope="session")
def busybox_pushed(registry: Registry, busybox_layout: BusyboxImage) -> str:
    """The busybox image pushed to the plain registry; returns its reference."""
    ref = f"{registry.host}/test/busybox:v1"
    skopeo_copy(f"oci:{busybox_layout.layout}:{busybox_layout.tag}", f"docker://{ref}")
    return ref


def manifest_digest(ref: str) -> str:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}", f"docker://{ref}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip()
