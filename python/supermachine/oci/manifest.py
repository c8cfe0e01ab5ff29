"""Manifests, image indexes, platforms and the image config, parsed into typed values.

Both the Docker (schema 2 / manifest list) and OCI media types are understood. Parsing is strict
about what is needed to build a root filesystem and lenient about everything else.
"""

from __future__ import annotations

import json
import platform as _host_platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from supermachine.errors import ImageReferenceError, ManifestError
from supermachine.oci.reference import validate_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
ACCEPT_MANIFESTS = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
LAYER_TYPES = (
    OCI_LAYER_TAR,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    DOCKER_LAYER_GZIP,
    DOCKER_LAYER_TAR,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)

CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)

MAX_MANIFEST_BYTES = 4 << 20
"""Largest manifest or image index accepted (the limit the distribution spec asks registries to take)."""
MAX_CONFIG_BYTES = 8 << 20
"""Largest image config accepted (it is read into memory whole)."""
MAX_LAYERS = 512
"""Most layers one image may have."""
MAX_INDEX_ENTRIES = 1024
"""Most entries one image index may have."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects accepted in any of these documents."""

_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")


def _shown(value: object) -> str:
    """A value from an untrusted document, quoted and capped for an error message."""
    text = str(value)
    return repr(text if len(text) <= 80 else text[:77] + "...")


_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm"}


@dataclass(frozen=True)
class Platform:
    """An ``os/architecture[/variant]`` triple, normalised (``x86_64`` → ``amd64``)."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``linux/arm64``, ``linux/arm/v7`` or just ``arm64`` (meaning linux)."""
        parts = [p for p in text.strip().lower().split("/")]
        if not parts or any(not p for p in parts) or len(parts) > 3:
            raise ImageReferenceError(f"invalid platform {text!r} (expected os/arch[/variant])")
        if len(parts) == 1:
            parts = ["linux", *parts]
        os_name, arch = parts[0], _ARCH_ALIASES.get(parts[1], parts[1])
        return cls(os_name, arch, parts[2] if len(parts) == 3 else None)

    @classmethod
    def default(cls) -> Platform:
        """linux/amd64 — what the microVMs run."""
        return cls("linux", "amd64")

    @classmethod
    def host(cls) -> Platform:
        """The platform of the machine this runs on."""
        return cls.parse(f"linux/{_host_platform.machine()}")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Platform:
        arch = str(data.get("architecture", ""))
        variant = data.get("variant")
        return cls(str(data.get("os", "")), _ARCH_ALIASES.get(arch, arch), str(variant) if variant else None)

    def matches(self, candidate: Platform) -> bool:
        """True if ``candidate`` (from an index) can serve a request for ``self``."""
        if (self.os, self.architecture) != (candidate.os, candidate.architecture):
            return False
        if self.variant is None:
            return True
        return _norm_variant(self) == _norm_variant(candidate)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def _norm_variant(p: Platform) -> str | None:
    if p.variant is None:
        return {"arm64": "v8", "arm": "v7"}.get(p.architecture)
    return p.variant


@dataclass(frozen=True)
class Descriptor:
    """A pointer to content: media type, digest, size (and, inside indexes, a platform)."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Any, where: str) -> Descriptor:
        if not isinstance(data, Mapping):
            raise ManifestError(f"{where}: descriptor is not an object")
        try:
            digest = validate_digest(str(data["digest"]))
            size = data["size"]
        except KeyError as exc:
            raise ManifestError(f"{where}: descriptor has no {exc.args[0]!r}") from None
        except ImageReferenceError as exc:
            raise ManifestError(f"{where}: {exc}") from None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{where}: descriptor {digest} has an invalid size {size!r}")
        media_type = data.get("mediaType", "")
        if media_type and (not isinstance(media_type, str) or not _MEDIA_TYPE.fullmatch(media_type)):
            raise ManifestError(f"{where}: descriptor {digest} has invalid media type {_shown(media_type)}")
        plat = data.get("platform")
        annotations = data.get("annotations") or {}
        urls = data.get("urls") or ()
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            platform=Platform.from_json(plat) if isinstance(plat, Mapping) else None,
            annotations={str(k): str(v) for k, v in annotations.items()}
            if isinstance(annotations, Mapping)
            else {},
            urls=tuple(str(u) for u in urls) if isinstance(urls, list) else (),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        return out


def _too_deep(value: Any, limit: int) -> bool:
    """True if ``value`` nests arrays/objects more than ``limit`` levels (checked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _load_json(raw: bytes, what: str, limit: int = MAX_MANIFEST_BYTES) -> dict[str, Any]:
    """Parse an untrusted JSON document: at most ``limit`` bytes and :data:`MAX_JSON_DEPTH` levels."""
    if len(raw) > limit:
        raise ManifestError(f"{what} is larger than {limit} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{what} is not valid JSON ({exc.__class__.__name__}: {exc})") from None
    except ValueError:  # a number with more digits than int() converts
        raise ManifestError(f"{what} holds a number too long to convert") from None
    except RecursionError:
        raise ManifestError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels") from None
    if _too_deep(data, MAX_JSON_DEPTH):
        raise ManifestError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(data, dict):
        raise ManifestError(f"{what} is not a JSON object")
    return data


def sniff_media_type(raw: bytes, declared: str | None, what: str) -> str:
    """The media type of a manifest document: the ``mediaType`` field, else ``declared``, else shape."""
    data = _load_json(raw, what)
    media = data.get("mediaType") or (declared or "").split(";")[0].strip()
    if media in DOCKER_SCHEMA1 or data.get("schemaVersion") == 1:
        raise ManifestError(f"{what} uses Docker schema 1, which is not supported")
    if media in MANIFEST_TYPES or media in INDEX_TYPES:
        return str(media)
    if "manifests" in data:
        return OCI_INDEX
    if "layers" in data and "config" in data:
        return OCI_MANIFEST
    raise ManifestError(f"{what} has unsupported media type {_shown(media or 'unknown')}")


@dataclass(frozen=True)
class Manifest:
    """An image manifest: one config and an ordered list of layers."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, raw: bytes, what: str = "manifest") -> Manifest:
        data = _load_json(raw, what)
        if data.get("schemaVersion") != 2:
            raise ManifestError(f"{what} has schemaVersion {data.get('schemaVersion')!r}, expected 2")
        media = str(data.get("mediaType") or OCI_MANIFEST)
        if media not in MANIFEST_TYPES:
            raise ManifestError(f"{what} is a {_shown(media)}, not an image manifest")
        layers = data.get("layers")
        if not isinstance(layers, list):
            raise ManifestError(f"{what} has no 'layers' list")
        if len(layers) > MAX_LAYERS:
            raise ManifestError(f"{what} has {len(layers)} layers, more than the {MAX_LAYERS} supported")
        config = Descriptor.from_json(data.get("config"), f"{what} config")
        if config.media_type and config.media_type not in CONFIG_TYPES:
            raise ManifestError(
                f"{what} is not a container image (config media type {_shown(config.media_type)})"
            )
        if config.size > MAX_CONFIG_BYTES:
            raise ManifestError(f"{what}: config is {config.size} bytes, more than {MAX_CONFIG_BYTES}")
        parsed = tuple(Descriptor.from_json(layer, f"{what} layer {i}") for i, layer in enumerate(layers))
        for layer in parsed:
            if layer.media_type and layer.media_type not in LAYER_TYPES:
                raise ManifestError(
                    f"{what}: layer {layer.digest} has unsupported media type {_shown(layer.media_type)}"
                )
        return cls(media, config, parsed)


@dataclass(frozen=True)
class Index:
    """An image index / manifest list: manifests for several platforms."""

    media_type: str
    manifests: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, raw: bytes, what: str = "image index") -> Index:
        data = _load_json(raw, what)
        if data.get("schemaVersion") != 2:
            raise ManifestError(f"{what} has schemaVersion {data.get('schemaVersion')!r}, expected 2")
        entries = data.get("manifests")
        if not isinstance(entries, list):
            raise ManifestError(f"{what} has no 'manifests' list")
        if len(entries) > MAX_INDEX_ENTRIES:
            raise ManifestError(
                f"{what} has {len(entries)} entries, more than the {MAX_INDEX_ENTRIES} supported"
            )
        media = str(data.get("mediaType") or OCI_INDEX)
        return cls(media, tuple(Descriptor.from_json(m, f"{what} entry {i}") for i, m in enumerate(entries)))

    def select(self, wanted: Platform, what: str = "image index") -> Descriptor:
        """The entry for ``wanted``; prefers an exact variant match, then no variant, then the first."""
        candidates = [d for d in self.manifests if d.platform is not None and wanted.matches(d.platform)]
        if not candidates:
            available = sorted(
                {str(d.platform) for d in self.manifests if d.platform and d.platform.os != "unknown"}
            )
            raise ManifestError(
                f"{what} has no image for {wanted} (available: {', '.join(available) or 'none'})"
            )
        chosen = next((d for d in candidates if d.platform and d.platform.variant == wanted.variant), None)
        chosen = chosen or candidates[0]
        if chosen.media_type and chosen.media_type not in MANIFEST_TYPES + INDEX_TYPES:
            raise ManifestError(
                f"{what}: the entry for {wanted} has unsupported media type {_shown(chosen.media_type)}"
            )
        if chosen.size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{what}: the manifest for {wanted} exceeds {MAX_MANIFEST_BYTES} bytes")
        return chosen


@dataclass(frozen=True)
class ImageConfig:
    """What the image says about how to run it (the ``config`` section of the image config blob)."""

    architecture: str
    os: str
    variant: str | None = None
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    working_dir: str = ""
    user: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    exposed_ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    stop_signal: str | None = None
    diff_ids: tuple[str, ...] = ()

    @classmethod
    def parse(cls, raw: bytes, what: str = "image config") -> ImageConfig:
        data = _load_json(raw, what, MAX_CONFIG_BYTES)
        cfg = data.get("config") or {}
        if not isinstance(cfg, Mapping):
            raise ManifestError(f"{what}: 'config' is not an object")
        rootfs = data.get("rootfs") or {}
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, Mapping) else None

        def strings(key: str, value: Any) -> tuple[str, ...] | None:
            if value is None:
                return None
            if isinstance(value, str):
                return (value,)
            if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
                raise ManifestError(f"{what}: {key} is not a list of strings")
            return tuple(value)

        def keys(key: str) -> tuple[str, ...]:
            value = cfg.get(key)
            return tuple(sorted(str(k) for k in value)) if isinstance(value, Mapping) else ()

        labels = cfg.get("Labels")
        variant = data.get("variant")
        return cls(
            architecture=_ARCH_ALIASES.get(
                str(data.get("architecture", "")), str(data.get("architecture", ""))
            ),
            os=str(data.get("os", "")),
            variant=str(variant) if variant else None,
            env=strings("Env", cfg.get("Env")) or (),
            entrypoint=strings("Entrypoint", cfg.get("Entrypoint")),
            cmd=strings("Cmd", cfg.get("Cmd")),
            working_dir=str(cfg.get("WorkingDir") or ""),
            user=str(cfg.get("User") or ""),
            labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {},
            exposed_ports=keys("ExposedPorts"),
            volumes=keys("Volumes"),
            stop_signal=str(cfg["StopSignal"]) if cfg.get("StopSignal") else None,
            diff_ids=strings("rootfs.diff_ids", diff_ids) or (),
        )

    @property
    def platform(self) -> Platform:
        return Platform(self.os, self.architecture, self.variant)

    def argv(self, command: Sequence[str] | None = None) -> list[str]:
        """The process to start: entrypoint + (``command`` if given, else the image's Cmd)."""
        return [*(self.entrypoint or ()), *(command if command is not None else (self.cmd or ()))]

    def environment(self) -> dict[str, str]:
        """``Env`` as a dict (later entries win, entries without ``=`` map to an empty string)."""
        out: dict[str, str] = {}
        for item in self.env:
            key, _, value = item.partition("=")
            out[key] = value
        return out
