"""OCI/Docker images: references, registry pulls, the layer cache, offline inputs and root filesystems.

Typical use::

    from supermachine.oci import pull, build_squashfs

    image = pull("alpine:3.20", platform="linux/amd64")   # cached, verified, recorded
    rootfs = build_squashfs(image)                         # <cache>/rootfs/<config hex>.squashfs
    argv, env = image.config.argv(), image.config.environment()

Modules, by concern: :mod:`~supermachine.oci.reference` (names), :mod:`~supermachine.oci.auth`
(credentials and challenges), :mod:`~supermachine.oci.registry` (HTTP API client),
:mod:`~supermachine.oci.manifest` (manifests, indexes, platforms, image config),
:mod:`~supermachine.oci.store` (blob store and image index), :mod:`~supermachine.oci.sources`
(OCI layouts and docker-save archives), :mod:`~supermachine.oci.image` (pull and load),
:mod:`~supermachine.oci.rootfs` (layers to directory to squashfs).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from supermachine.oci.auth import Credentials, load_credentials, parse_www_authenticate
    from supermachine.oci.image import Image, load_image, pull
    from supermachine.oci.manifest import Descriptor, ImageConfig, Index, Manifest, Platform
    from supermachine.oci.progress import ProgressReporter, RichProgress
    from supermachine.oci.reference import Reference, parse_reference
    from supermachine.oci.registry import RegistryClient
    from supermachine.oci.rootfs import apply_layer, build_rootfs, build_squashfs
    from supermachine.oci.sources import LocalSource, parse_source
    from supermachine.oci.store import BlobStore, ImageRecord, ImageStore, PruneResult

# Each name's module, imported on first use (PEP 562): a command that only pulls does not pay for
# the root filesystem builder, and one that only lists images does not pay for the HTTP stack.
_HOMES = {
    "auth": ("Credentials", "load_credentials", "parse_www_authenticate"),
    "image": ("Image", "load_image", "pull"),
    "manifest": ("Descriptor", "ImageConfig", "Index", "Manifest", "Platform"),
    "progress": ("ProgressReporter", "RichProgress"),
    "reference": ("Reference", "parse_reference"),
    "registry": ("RegistryClient",),
    "rootfs": ("apply_layer", "build_rootfs", "build_squashfs"),
    "sources": ("LocalSource", "parse_source"),
    "store": ("BlobStore", "ImageRecord", "ImageStore", "PruneResult"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "BlobStore",
    "Credentials",
    "Descriptor",
    "Image",
    "ImageConfig",
    "ImageRecord",
    "ImageStore",
    "Index",
    "LocalSource",
    "Manifest",
    "Platform",
    "ProgressReporter",
    "PruneResult",
    "Reference",
    "RegistryClient",
    "RichProgress",
    "apply_layer",
    "build_rootfs",
    "build_squashfs",
    "load_credentials",
    "load_image",
    "parse_reference",
    "parse_source",
    "parse_www_authenticate",
    "pull",
]
