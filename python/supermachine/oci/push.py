"""Stored images out of the local store: pushed to a registry, or written as an OCI layout.

Pushing sends each blob the registry lacks (HEAD first, then one upload session per blob), the
config, then the manifest under the tag, with the same credentials, plain-HTTP rule (loopback
only unless asked), deadlines and retries as pulling (:class:`~supermachine.oci.registry.RegistryClient`).
Every blob is read from the store through its digest check, so a blob that rotted on disk is
never sent.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import IO

from supermachine.errors import ImageReferenceError, InputError
from supermachine.oci.image import Image
from supermachine.oci.manifest import OCI_INDEX, OCI_MANIFEST, Descriptor
from supermachine.oci.progress import ProgressReporter
from supermachine.oci.reference import Reference
from supermachine.oci.registry import RegistryClient
from supermachine.oci.sources import REF_NAME_ANNOTATION
from supermachine.oci.store import fsync_dir, hex_of

__all__ = ["push", "write_oci_layout"]


def _blobs(image: Image) -> list[Descriptor]:
    return [*image.layers, image.manifest.config]


def push(
    image: Image,
    destination: str,
    *,
    insecure: bool | None = None,
    progress: ProgressReporter | None = None,
) -> str:
    """Pushes ``image`` to the registry reference ``destination`` (its tag defaults to
    ``latest``); returns the manifest digest."""
    ref = Reference.parse(destination)
    if ref.digest is not None:
        raise InputError(f"cannot push to {destination!r}: give a tag, not a digest")
    manifest_raw = image.store.blobs.read_bytes(image.record.manifest_digest)
    with RegistryClient(ref, insecure=insecure) as client:
        for desc in _blobs(image):
            label = f"{desc.digest[7:19]}"
            if progress:
                progress.start(desc.digest, f"pushing {label}", desc.size)

            def opener(digest: str = desc.digest) -> IO[bytes]:
                if not image.store.blobs.verify(digest):
                    raise InputError(
                        f"blob {digest} in the local store is damaged; pull or build the image again"
                    )
                return image.store.blobs.open(digest)

            sent = client.push_blob(ref.repository, desc, opener)
            if progress:
                progress.finish(desc.digest, "pushed" if sent else "already there")
        media_type = image.manifest.media_type or OCI_MANIFEST
        return client.put_manifest(ref.repository, ref.tag or "latest", manifest_raw, media_type)


def _tag_of(ref: str) -> str | None:
    if ref.startswith("sha256:"):
        return None  # an untagged build, stored under its config digest
    try:
        return Reference.parse(ref).tag
    except ImageReferenceError:
        return None


def write_oci_layout(image: Image, directory: Path, *, name: str | None = None) -> Path:
    """Writes ``image`` as an OCI image layout in ``directory`` (which must not exist yet), its
    manifest named ``name`` (default: the image's tag) in ``index.json``. Written beside the
    target and renamed into place, so a killed write leaves no half layout."""
    if directory.exists() or directory.is_symlink():
        raise InputError(f"{directory} already exists; choose a new directory for the OCI layout")
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{directory.name}.tmp-{secrets.token_hex(6)}"
    try:
        blobs = tmp / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        manifest_raw = image.store.blobs.read_bytes(image.record.manifest_digest)
        for desc in _blobs(image):
            if not image.store.blobs.verify(desc.digest):
                raise InputError(f"blob {desc.digest} in the local store is damaged; build the image again")
            with image.store.blobs.open(desc.digest) as src, open(blobs / hex_of(desc.digest), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        (blobs / hex_of(image.record.manifest_digest)).write_bytes(manifest_raw)
        tag = name or _tag_of(image.ref)
        entry: dict[str, object] = {
            "mediaType": image.manifest.media_type or OCI_MANIFEST,
            "digest": image.record.manifest_digest,
            "size": len(manifest_raw),
        }
        if tag:
            entry["annotations"] = {REF_NAME_ANNOTATION: tag}
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
        (tmp / "index.json").write_text(json.dumps(index))
        (tmp / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        os.rename(tmp, directory)
        fsync_dir(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
