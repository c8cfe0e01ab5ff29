"""Authentication against real registries: htpasswd basic auth and JWT token auth."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from _support import Registry, busybox_rootfs, skopeo_copy, umoci_image
from conftest import PASSWORD, USER, TokenRegistry
from supermachine.errors import AuthenticationError
from supermachine.oci import (
    Credentials,
    ImageStore,
    Reference,
    load_credentials,
    parse_www_authenticate,
    pull,
)


@pytest.fixture(scope="session")
def small_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("small")
    umoci_image(work / "layout", "v1", busybox_rootfs(work / "rootfs", applets=("sh",)), work)
    return work / "layout"


def _docker_config(path: Path, host: str, user: str, password: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    (path / "config.json").write_text(json.dumps({"auths": {f"http://{host}": {"auth": token}}}))


def test_basic_auth_good_and_bad_credentials(
    store: ImageStore,
    auth_registry: Registry,
    small_layout: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = f"{auth_registry.host}/private/img:v1"
    skopeo_copy(f"oci:{small_layout}:v1", f"docker://{ref}", creds=(USER, PASSWORD))

    with pytest.raises(AuthenticationError, match="requires a login") as info:
        pull(ref)
    assert "\n" not in str(info.value)
    with pytest.raises(AuthenticationError, match=r"rejected user 'alice' \(401 Unauthorized\)"):
        pull(ref, credentials=Credentials(USER, "wrong"))
    assert store.images() == []

    assert pull(ref, credentials=Credentials(USER, PASSWORD)).record.ref == ref
    # The same credentials from a Docker config file, found through DOCKER_CONFIG.
    config_dir = tmp_path / "dockercfg"
    _docker_config(config_dir, auth_registry.host, USER, PASSWORD)
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    other = ImageStore(tmp_path / "other-cache")
    assert pull(ref, store=other).record.manifest_digest == store.images()[0].manifest_digest


def test_token_auth_flow(store: ImageStore, token_registry: TokenRegistry, small_layout: Path) -> None:
    registry, server = token_registry.registry, token_registry.server
    ref = f"{registry.host}/team/app:v1"
    skopeo_copy(f"oci:{small_layout}:v1", f"docker://{ref}", creds=(USER, PASSWORD))
    server.requests.clear()

    image = pull(ref, credentials=Credentials(USER, PASSWORD))
    assert image.record.ref == ref
    assert server.requests, "the token server was never asked"
    first = server.requests[0]
    assert first["user"] == USER
    assert first["query"]["service"] == [server.service]
    assert "repository:team/app:pull" in first["query"]["scope"]
    assert len(server.requests) == 1  # the token is cached and reused for every blob

    with pytest.raises(AuthenticationError, match="rejected user 'alice'"):
        pull(ref, credentials=Credentials(USER, "nope"), store=ImageStore(store.root / "x"))
    with pytest.raises(AuthenticationError, match="rejected anonymous access"):
        pull(ref, store=ImageStore(store.root / "y"))


def test_parse_www_authenticate() -> None:
    [bearer] = parse_www_authenticate(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )
    assert bearer.scheme == "bearer"
    assert bearer.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/alpine:pull",
    }
    basic, token = parse_www_authenticate(
        'Basic realm="Registry Realm", Bearer realm="https://x/t",error="a\\"b"'
    )
    assert (basic.scheme, basic.params) == ("basic", {"realm": "Registry Realm"})
    assert token.params == {"realm": "https://x/t", "error": 'a"b'}
    assert parse_www_authenticate("") == []


def test_docker_config_credentials(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    hub = base64.b64encode(b"hubuser:hubpass").decode()
    cfg.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": hub},
                    "ghcr.io": {"username": "u", "password": "p"},
                    "https://quay.io/v2/": {"identitytoken": "refresh-me"},
                }
            }
        )
    )
    assert load_credentials(Reference.parse("alpine").registry, cfg) == Credentials("hubuser", "hubpass")
    assert load_credentials("ghcr.io", cfg) == Credentials("u", "p")
    assert load_credentials("quay.io", cfg) == Credentials("", "", "refresh-me")
    assert load_credentials("example.com", cfg) is None
    assert load_credentials("example.com", tmp_path / "missing.json") is None
    assert "p" not in repr(Credentials("u", "p")).replace("password", "")
