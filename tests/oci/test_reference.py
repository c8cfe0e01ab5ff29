"""Reference and platform parsing, manifest/config parsing (pure functions, real inputs)."""

from __future__ import annotations

import json

import pytest
from supermachine.errors import ImageReferenceError, ManifestError
from supermachine.oci import ImageConfig, Index, Manifest, Platform, Reference


@pytest.mark.parametrize(
    ("text", "canonical", "api_host", "loopback"),
    [
        ("alpine", "docker.io/library/alpine:latest", "registry-1.docker.io", False),
        ("alpine:3.20", "docker.io/library/alpine:3.20", "registry-1.docker.io", False),
        ("library/alpine", "docker.io/library/alpine:latest", "registry-1.docker.io", False),
        ("index.docker.io/user/app:v1", "docker.io/user/app:v1", "registry-1.docker.io", False),
        ("ghcr.io/o/img/sub:tag", "ghcr.io/o/img/sub:tag", "ghcr.io", False),
        ("localhost/app", "localhost/app:latest", "localhost", True),
        ("localhost:5000/app:1", "localhost:5000/app:1", "localhost:5000", True),
        ("127.0.0.1:5000/a/b", "127.0.0.1:5000/a/b:latest", "127.0.0.1:5000", True),
        ("[::1]:5000/a", "[::1]:5000/a:latest", "[::1]:5000", True),
        ("user/app", "docker.io/user/app:latest", "registry-1.docker.io", False),
    ],
)
def test_reference_normalisation(text: str, canonical: str, api_host: str, loopback: bool) -> None:
    ref = Reference.parse(text)
    assert str(ref) == canonical
    assert ref.api_host == api_host
    assert ref.is_loopback is loopback
    assert str(Reference.parse(str(ref))) == canonical  # idempotent


def test_reference_digests_and_familiar_names() -> None:
    digest = "sha256:" + "ab" * 32
    ref = Reference.parse(f"alpine@{digest}")
    assert (ref.tag, ref.digest, ref.reference) == (None, digest, digest)
    both = Reference.parse(f"alpine:3.20@{digest}")
    assert both.reference == digest and str(both) == f"docker.io/library/alpine:3.20@{digest}"
    assert both.familiar() == f"alpine:3.20@{digest}"
    assert Reference.parse("user/app:v1").familiar() == "user/app:v1"


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("", "empty"),
        ("Alpine", "invalid repository name"),
        ("alpine:", "invalid tag"),
        ("alpine@sha256:abc", "malformed digest"),
        ("alpine@md5:" + "a" * 64, "unsupported or malformed digest"),
        ("https://ghcr.io/x", "drop the URL scheme"),
        ("ghcr.io/a//b", "invalid repository name"),
    ],
)
def test_reference_errors(text: str, pattern: str) -> None:
    with pytest.raises(ImageReferenceError, match=pattern) as info:
        Reference.parse(text)
    assert "\n" not in str(info.value)


def test_platforms() -> None:
    assert Platform.parse("linux/amd64") == Platform("linux", "amd64")
    assert Platform.parse("x86_64") == Platform("linux", "amd64")
    assert Platform.parse("linux/arm/v7") == Platform("linux", "arm", "v7")
    assert Platform.parse("linux/arm64").matches(Platform("linux", "arm64", "v8"))
    assert Platform.parse("linux/arm64/v8").matches(Platform("linux", "arm64"))
    assert not Platform.parse("linux/arm/v6").matches(Platform("linux", "arm", "v7"))
    with pytest.raises(ImageReferenceError):
        Platform.parse("linux//")


def _desc(n: int, **extra: object) -> dict[str, object]:
    return {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": f"sha256:{n:064x}",
        "size": 1,
        **extra,
    }


def test_index_selection_prefers_exact_variant_and_skips_attestations() -> None:
    raw = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                _desc(1, platform={"os": "unknown", "architecture": "unknown"}),
                _desc(2, platform={"os": "linux", "architecture": "arm", "variant": "v6"}),
                _desc(3, platform={"os": "linux", "architecture": "arm", "variant": "v7"}),
                _desc(4, platform={"os": "linux", "architecture": "amd64"}),
            ],
        }
    ).encode()
    index = Index.parse(raw)
    assert index.select(Platform.parse("linux/arm/v7")).digest == f"sha256:{3:064x}"
    assert index.select(Platform.default()).digest == f"sha256:{4:064x}"
    with pytest.raises(ManifestError, match=r"available: linux/amd64, linux/arm/v6, linux/arm/v7\)"):
        index.select(Platform.parse("linux/riscv64"))


def test_manifest_and_config_parsing() -> None:
    layer = {
        "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "digest": "sha256:" + "1" * 64,
        "size": 10,
    }
    raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {**layer, "mediaType": "application/vnd.docker.container.image.v1+json"},
            "layers": [layer],
        }
    ).encode()
    assert Manifest.parse(raw).layers[0].size == 10
    config_desc = {**layer, "mediaType": "application/vnd.oci.image.config.v1+json"}
    bad = json.dumps({"schemaVersion": 2, "config": config_desc, "layers": [{**layer, "size": -1}]}).encode()
    with pytest.raises(ManifestError, match="invalid size -1"):
        Manifest.parse(bad)
    config = ImageConfig.parse(
        json.dumps(
            {
                "architecture": "x86_64",
                "os": "linux",
                "config": {
                    "Env": ["A=1", "B=x=y", "C"],
                    "Entrypoint": ["/init"],
                    "Cmd": ["serve", "--port=80"],
                    "WorkingDir": "/srv",
                    "User": "1000:1000",
                    "ExposedPorts": {"80/tcp": {}},
                },
                "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "2" * 64]},
            }
        ).encode()
    )
    assert config.platform == Platform("linux", "amd64")
    assert config.environment() == {"A": "1", "B": "x=y", "C": ""}
    assert config.argv() == ["/init", "serve", "--port=80"]
    assert config.argv(["sh"]) == ["/init", "sh"]
    assert (config.working_dir, config.user, config.exposed_ports) == ("/srv", "1000:1000", ("80/tcp",))
    with pytest.raises(ManifestError, match="Cmd is not a list of strings"):
        ImageConfig.parse(b'{"config": {"Cmd": [1, 2]}}')
