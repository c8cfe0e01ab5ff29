"""Offline image inputs: OCI image layouts (directory or tarball) and ``docker save`` tarballs.

Accepted spellings, wherever an image reference is:

* ``oci:PATH[:TAG]``: an OCI image layout directory (``oci-layout`` + ``index.json``) or a tarball of one;
* ``docker-archive:PATH[:NAME[:TAG]]``: a ``docker save`` (or ``skopeo copy docker-archive:``) tarball;
* a plain path (``/x``, ``./x``, ``../x``, ``~/x``, or an existing file or directory) whose contents
  say which of the two it is; ``PATH:TAG`` works too when ``PATH`` exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tarfile

from supermachine.errors import ImageReferenceError, InputError, ManifestError
from supermachine.oci.manifest import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_LAYER_TAR,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    OCI_LAYER_ZSTD,
    Descriptor,
    Index,
    Manifest,
    Platform,
    sniff_media_type,
)
from supermachine.oci.reference import Reference, validate_digest

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
_PATH_PREFIXES = ("/", "./", "../", "~/")


@dataclass(frozen=True)
class LocalSource:
    """An image on disk: ``kind`` is ``"oci"`` or ``"docker-archive"`` (or ``"auto"`` until opened)."""

    kind: str
    path: Path
    selector: str | None = None  # OCI: tag; docker-archive: image name

    def __str__(self) -> str:
        text = f"{self.kind}:{self.path}"
        return f"{text}:{self.selector}" if self.selector else text


def _split_existing(text: str) -> tuple[str, str | None]:
    """Split ``PATH[:SELECTOR]`` where ``PATH`` is the longest prefix that exists."""
    expanded = os.path.expanduser(text)
    if os.path.exists(expanded):
        return expanded, None
    pos = len(text)
    while (pos := text.rfind(":", 0, pos)) > 0:
        head = os.path.expanduser(text[:pos])
        if os.path.exists(head):
            return head, text[pos + 1 :] or None
    return expanded, None


def parse_source(text: str) -> Reference | LocalSource:
    """Decide whether ``text`` names a registry image or a local one, and parse it."""
    for prefix, kind in (("oci:", "oci"), ("oci-archive:", "oci"), ("docker-archive:", "docker-archive")):
        if text.startswith(prefix):
            path, selector = _split_existing(text[len(prefix) :])
            if not os.path.exists(path):
                raise InputError(f"{text}: {path} does not exist")
            return LocalSource(kind, Path(path).resolve(), selector)
    if text.startswith(_PATH_PREFIXES) or os.path.exists(os.path.expanduser(text)):
        path, selector = _split_existing(text)
        if not os.path.exists(path):
            raise InputError(f"{path} does not exist")
        return LocalSource("auto", Path(path).resolve(), selector)
    return Reference.parse(text)


def canonical_source(text: str) -> str:
    """The key an image from ``text`` is stored under in the image index."""
    parsed = parse_source(text)
    if isinstance(parsed, Reference):
        return str(parsed)
    with open_container(parsed.path) as container:
        kind = _kind_of(container, parsed)
    return str(LocalSource(kind, parsed.path, parsed.selector))


# ---- reading files out of a directory or a tarball ------------------------------------------------
class _Container:
    """Read access to named files in a layout directory or a tarball."""

    def __init__(self, path: Path) -> None:
        import tarfile  # only local images in tarballs need it; pulls from a registry start faster

        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if path.is_file():
            try:
                self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed in close()
                for m in self._tar.getmembers():
                    self._members[posixpath.normpath(m.name.lstrip("/"))] = m
            except (tarfile.TarError, OSError) as exc:
                raise InputError(f"{path} is not a readable tar archive: {exc}") from None
        elif not path.is_dir():
            raise InputError(f"{path} is neither a directory nor a tar archive")

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def _safe(self, name: str) -> str:
        norm = posixpath.normpath(name.lstrip("/"))
        if norm.startswith("../") or norm == "..":
            raise InputError(f"{self.path}: refers to {name!r} outside the archive")
        return norm

    def exists(self, name: str) -> bool:
        norm = self._safe(name)
        if self._tar is None:
            return (self.path / norm).is_file()
        return norm in self._members

    def open(self, name: str) -> IO[bytes]:
        norm = self._safe(name)
        if self._tar is None:
            try:
                return open(self.path / norm, "rb")
            except OSError as exc:
                raise InputError(f"{self.path}: cannot read {name}: {exc.strerror}") from None
        member = self._members.get(norm)
        f = self._tar.extractfile(member) if member is not None else None
        if f is None:
            raise InputError(f"{self.path}: {name} is missing from the archive")
        return f

    def read(self, name: str, limit: int = 16 << 20) -> bytes:
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise InputError(f"{self.path}: {name} is unreasonably large")
        return data


@contextlib.contextmanager
def open_container(path: Path) -> Iterator[_Container]:
    container = _Container(path)
    try:
        yield container
    finally:
        container.close()


def _kind_of(container: _Container, source: LocalSource) -> str:
    if source.kind != "auto":
        return source.kind
    if container.exists("oci-layout") and container.exists("index.json"):
        return "oci"
    if container.exists("manifest.json"):
        return "docker-archive"
    raise InputError(f"{source.path} is neither an OCI image layout nor a docker-save archive")


@dataclass(frozen=True)
class LocalImage:
    """What an importer found: the chosen manifest and where each blob comes from."""

    key: str
    manifest_raw: bytes
    manifest: Manifest
    config_raw: bytes
    index_raw: bytes | None
    source: str


def _blob_name(digest: str) -> str:
    validate_digest(digest)
    return "blobs/" + digest.replace(":", "/", 1)


def _read_verified(container: _Container, desc: Descriptor, what: str) -> bytes:
    data = container.read(_blob_name(desc.digest))
    actual = f"sha256:{hashlib.sha256(data).hexdigest()}"
    if actual != desc.digest or len(data) != desc.size:
        from supermachine.errors import DigestMismatchError

        raise DigestMismatchError(f"{what} {desc.digest} in {container.path}: content has digest {actual}")
    return data


def _pick_layout_entry(index: Index, source: LocalSource) -> Descriptor:
    tag = source.selector
    entries = list(index.manifests)
    if tag is not None:
        hits = [
            d
            for d in entries
            if d.annotations.get(REF_NAME_ANNOTATION) == tag
            or d.annotations.get("io.containerd.image.name", "").endswith(f":{tag}")
        ]
        if not hits:
            raise InputError(f"{source.path} has no image tagged {tag!r} (tags: {_tags(entries)})")
        return hits[0]
    if len(entries) == 1:
        return entries[0]
    if not entries:
        raise InputError(f"{source.path}: index.json lists no images")
    raise InputError(
        f"{source.path} holds {len(entries)} images; choose one with oci:PATH:TAG (tags: {_tags(entries)})"
    )


def _tags(entries: list[Descriptor]) -> str:
    return ", ".join(sorted({d.annotations.get(REF_NAME_ANNOTATION, "?") for d in entries})) or "none"


def read_oci_layout(container: _Container, source: LocalSource, platform: Platform) -> LocalImage:
    """Choose the image in an OCI layout (by tag, then platform) and read its manifest and config."""
    try:
        layout = json.loads(container.read("oci-layout"))
    except ValueError:
        raise InputError(f"{source.path}: oci-layout is not JSON") from None
    if not isinstance(layout, dict) or not str(layout.get("imageLayoutVersion", "")).startswith("1."):
        raise InputError(f"{source.path}: unsupported imageLayoutVersion in oci-layout")
    top = Index.parse(container.read("index.json"), f"{source.path}/index.json")
    desc = _pick_layout_entry(top, source)
    index_raw: bytes | None = None
    for _ in range(4):  # nested indexes are allowed; a few levels are plenty
        raw = _read_verified(container, desc, "manifest")
        media = sniff_media_type(raw, desc.media_type, f"manifest {desc.digest}")
        if media not in INDEX_TYPES:
            break
        index_raw = raw
        desc = Index.parse(raw, f"image index {desc.digest}").select(platform, f"image index {desc.digest}")
    else:
        raise ManifestError(f"{source.path}: image indexes nested too deeply")
    manifest = Manifest.parse(raw, f"manifest {desc.digest}")
    config_raw = _read_verified(container, manifest.config, "config")
    return LocalImage(
        str(LocalSource("oci", source.path, source.selector)), raw, manifest, config_raw, index_raw, "oci"
    )


def _layer_media_type(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return DOCKER_LAYER_GZIP
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return OCI_LAYER_ZSTD
    return DOCKER_LAYER_TAR


def read_docker_archive(
    container: _Container, source: LocalSource
) -> tuple[LocalImage, list[tuple[str, str]]]:
    """Choose the image in a ``docker save`` archive; returns it and ``(member name, digest)`` per layer.

    The archive has no manifest in registry form, so one is synthesised (Docker schema 2) from the
    config and the layer files; its digest identifies the image in the cache.
    """
    try:
        entries: Any = json.loads(container.read("manifest.json"))
    except ValueError:
        raise InputError(f"{source.path}: manifest.json is not JSON") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise InputError(f"{source.path}: manifest.json is not a list of images")
    chosen: dict[str, Any]
    if source.selector is None:
        if len(entries) != 1:
            raise InputError(
                f"{source.path} holds {len(entries)} images; choose one with docker-archive:PATH:NAME"
            )
        chosen = entries[0]
    elif source.selector.startswith("@") and source.selector[1:].isdigit():
        n = int(source.selector[1:])
        if n >= len(entries):
            raise InputError(f"{source.path} has no image number {n}")
        chosen = entries[n]
    else:
        try:
            wanted = str(Reference.parse(source.selector))
        except ImageReferenceError as exc:
            raise InputError(f"{source.path}: {exc}") from None
        hits = [e for e in entries if wanted in {_norm_tag(t) for t in e.get("RepoTags") or ()}]
        if not hits:
            raise InputError(f"{source.path} has no image named {source.selector!r}")
        chosen = hits[0]
    config_name, layer_names = chosen.get("Config"), chosen.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list):
        raise InputError(f"{source.path}: manifest.json entry lacks Config or Layers")
    config_raw = container.read(config_name)
    config_digest = f"sha256:{hashlib.sha256(config_raw).hexdigest()}"
    layers: list[Descriptor] = []
    sources: list[tuple[str, str]] = []
    for name in layer_names:
        h = hashlib.sha256()
        size = 0
        head = b""
        with container.open(str(name)) as f:
            while chunk := f.read(1 << 20):
                if not head:
                    head = chunk[:8]
                h.update(chunk)
                size += len(chunk)
        digest = f"sha256:{h.hexdigest()}"
        layers.append(Descriptor(_layer_media_type(head), digest, size))
        sources.append((str(name), digest))
    doc = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "size": len(config_raw), "digest": config_digest},
        "layers": [d.to_json() for d in layers],
    }
    raw = json.dumps(doc, indent=3).encode()
    manifest = Manifest.parse(raw, f"{source.path} manifest")
    key = str(LocalSource("docker-archive", source.path, source.selector))
    return LocalImage(key, raw, manifest, config_raw, None, "docker-archive"), sources


def _norm_tag(tag: str) -> str:
    try:
        return str(Reference.parse(tag))
    except ImageReferenceError:
        return tag
