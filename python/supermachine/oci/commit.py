"""New images in the local store: a parent image (or none) plus one layer, with a changed config.

What :meth:`Vm.commit <supermachine.vm.Vm.commit>` stores. The manifest is an OCI manifest (the
parent's Docker layer types are renamed to their OCI equivalents, the bytes are the same), the
config is the parent's config JSON with the requested changes, the new diff id and a history
entry appended, so fields this module does not know survive.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from supermachine.errors import ImageReferenceError, InputError
from supermachine.oci.image import Image, load_image
from supermachine.oci.manifest import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_LAYER_TAR,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
)
from supermachine.oci.reference import Reference
from supermachine.oci.store import ImageRecord, ImageStore

__all__ = ["ConfigChanges", "check_new_ref", "commit_layer", "store_image"]

_OCI_EQUIVALENT = {
    DOCKER_LAYER_GZIP: OCI_LAYER_GZIP,
    DOCKER_LAYER_TAR: OCI_LAYER_TAR,
    DOCKER_CONFIG: OCI_CONFIG,
}
#: The ``docker commit --change`` instructions :meth:`ConfigChanges.parse` accepts.
CHANGE_INSTRUCTIONS = (
    "CMD",
    "ENTRYPOINT",
    "ENV",
    "WORKDIR",
    "USER",
    "LABEL",
    "EXPOSE",
    "VOLUME",
    "STOPSIGNAL",
)


def _strings(value: object, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return ("/bin/sh", "-c", value)  # the shell form, as a Dockerfile's CMD "..." is
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InputError(f"{what} must be a string (run by /bin/sh -c) or a list of strings, got {value!r}")


def _mapping(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        raise InputError(f"{what} must be a mapping of names to strings, got {value!r}")
    return {k: str(v) for k, v in value.items()}


@dataclass(frozen=True)
class ConfigChanges:
    """Changes to an image's run config. ``None`` (or empty) keeps the parent's value; ``env`` and
    ``labels`` are merged into the parent's, ``exposed_ports`` and ``volumes`` added to them."""

    cmd: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    env: Mapping[str, str] | None = None
    workdir: str | None = None
    user: str | None = None
    labels: Mapping[str, str] | None = None
    exposed_ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    stop_signal: str | None = None

    @classmethod
    def of(cls, value: ConfigChanges | Mapping[str, object] | None) -> ConfigChanges:
        """``value`` as changes: a mapping takes the field names (``cmd``, ``entrypoint``, ``env``,
        ``workdir``, ``user``, ``labels``, ``exposed_ports``, ``volumes``, ``stop_signal``)."""
        if value is None:
            return cls()
        if isinstance(value, ConfigChanges):
            return value
        if not isinstance(value, Mapping):
            raise InputError(f"changes must be a mapping or ConfigChanges, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InputError(
                f"unknown image config change {unknown[0]!r} (known: {', '.join(sorted(known))})"
            )
        out: dict[str, Any] = {}
        for key, item in value.items():
            if item is None:
                continue
            if key in ("cmd", "entrypoint"):
                out[key] = _strings(item, key)
            elif key in ("env", "labels"):
                out[key] = _mapping(item, key)
            elif key in ("exposed_ports", "volumes"):
                items = [item] if isinstance(item, str) else item
                if not isinstance(items, Sequence) or not all(isinstance(v, str) and v for v in items):
                    raise InputError(f"{key} must be a list of strings, got {item!r}")
                out[key] = tuple(exposed_port(v) if key == "exposed_ports" else v for v in items)
            elif not isinstance(item, str):
                raise InputError(f"{key} must be a string, got {item!r}")
            else:
                out[key] = item
        return cls(**out)

    @classmethod
    def parse(cls, instructions: Sequence[str]) -> ConfigChanges:
        """``docker commit --change`` lines: ``CMD ["sh"]``, ``ENV K=V``, ``LABEL a=b``, ..."""
        merged: dict[str, Any] = {}
        for line in instructions:
            word, _, rest = line.strip().partition(" ")
            name, rest = word.upper(), rest.strip()
            if name not in CHANGE_INSTRUCTIONS:
                raise InputError(
                    f"--change {line!r}: expected one of {', '.join(CHANGE_INSTRUCTIONS)} and its arguments"
                )
            if not rest:
                raise InputError(f"--change {line!r}: {name} needs an argument")
            if name in ("CMD", "ENTRYPOINT"):
                merged[name.lower()] = _json_or_shell(rest, line)
            elif name in ("ENV", "LABEL"):
                key = "env" if name == "ENV" else "labels"
                merged[key] = {**merged.get(key, {}), **_pairs(rest, line)}
            elif name == "EXPOSE":
                merged["exposed_ports"] = (*merged.get("exposed_ports", ()), *rest.split())
            elif name == "VOLUME":
                volumes = _json_or_shell(rest, line) if rest.startswith("[") else tuple(rest.split())
                merged["volumes"] = (*merged.get("volumes", ()), *volumes)
            else:
                merged[{"WORKDIR": "workdir", "USER": "user", "STOPSIGNAL": "stop_signal"}[name]] = rest
        return cls.of(merged)


def exposed_port(value: str) -> str:
    """``PORT[/tcp|udp|sctp]`` as an image config key (``80`` -> ``80/tcp``); InputError else."""
    port, _, proto = value.partition("/")
    proto = proto or "tcp"
    if not port.isdigit() or not 1 <= int(port) <= 65535 or proto not in ("tcp", "udp", "sctp"):
        raise InputError(f"exposed port {value!r} is not PORT[/tcp|udp|sctp]")
    return f"{int(port)}/{proto}"


def _json_or_shell(text: str, line: str) -> tuple[str, ...]:
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            raise InputError(f"--change {line!r}: not a JSON list of strings") from None
        return _strings(value, line)
    return ("/bin/sh", "-c", text)


def _pairs(text: str, line: str) -> dict[str, str]:
    """``K=V K2="v 2"`` (or the old ``K value`` form) as a dict."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise InputError(f"--change {line!r}: {exc}") from None
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    out: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise InputError(f"--change {line!r}: {word!r} is not KEY=VALUE")
        out[key] = value
    return out


def apply_changes(config: dict[str, Any], changes: ConfigChanges) -> None:
    """Writes ``changes`` into the ``config`` section of an image config JSON object."""
    section = config.setdefault("config", {})
    if not isinstance(section, dict):
        section = config["config"] = {}
    if changes.entrypoint is not None:
        section["Entrypoint"] = list(changes.entrypoint)
        if changes.cmd is None:
            section.pop("Cmd", None)  # docker's rule: a new entrypoint resets the command
    if changes.cmd is not None:
        section["Cmd"] = list(changes.cmd)
    if changes.env:
        env: dict[str, str] = {}
        for item in section.get("Env") or ():
            key, _, value = str(item).partition("=")
            env[key] = value
        env.update(changes.env)
        section["Env"] = [f"{k}={v}" for k, v in env.items()]
    if changes.workdir is not None:
        section["WorkingDir"] = changes.workdir
    if changes.user is not None:
        section["User"] = changes.user
    if changes.labels:
        section["Labels"] = {**(section.get("Labels") or {}), **changes.labels}
    if changes.exposed_ports:
        section["ExposedPorts"] = {
            **(section.get("ExposedPorts") or {}),
            **{p: {} for p in changes.exposed_ports},
        }
    if changes.volumes:
        section["Volumes"] = {**(section.get("Volumes") or {}), **{v: {} for v in changes.volumes}}
    if changes.stop_signal is not None:
        section["StopSignal"] = changes.stop_signal


def _now() -> str:
    return datetime.fromtimestamp(time.time(), timezone.utc).isoformat().replace("+00:00", "Z")


def check_new_ref(ref: str) -> str:
    """``ref`` as stored (``app:1`` -> ``docker.io/library/app:1``); a one-line error for a
    malformed name or one with a digest."""
    try:
        parsed = Reference.parse(ref)
    except ImageReferenceError as exc:
        raise InputError(f"cannot name the new image {ref!r}: {exc}") from None
    if parsed.digest is not None:
        raise InputError(f"cannot name the new image {ref!r}: a digest names existing content, give a tag")
    return str(parsed)


def _base_config() -> dict[str, Any]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": []},
    }


def commit_layer(
    parent: Image | None,
    layer_file: Path,
    *,
    digest: str,
    diff_id: str,
    media_type: str,
    ref: str,
    changes: ConfigChanges,
    created_by: str,
    comment: str | None = None,
    store: ImageStore | None = None,
) -> Image:
    """Stores ``parent`` + the layer in ``layer_file`` (whose ``digest`` and ``diff_id`` the caller
    computed while writing it; the store checks the digest again) as the image ``ref``."""
    store = store or (parent.store if parent is not None else ImageStore())
    canonical = check_new_ref(ref)
    config: dict[str, Any]
    if parent is not None:
        config = copy.deepcopy(json.loads(store.blobs.read_bytes(parent.config_digest)))
        parent_layers = list(parent.manifest.layers)
    else:
        config, parent_layers = _base_config(), []
    apply_changes(config, changes)
    rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs["diff_ids"] = [*rootfs.get("diff_ids", []), diff_id]
    created = _now()
    config["created"] = created
    history = {"created": created, "created_by": created_by}
    if comment:
        history["comment"] = comment
    config["history"] = [*(config.get("history") or []), history]
    size = os.stat(layer_file).st_size
    with store.using():
        with open(layer_file, "rb") as f:
            store.blobs.put_stream(digest, size, f, "layer")
        layers = [*parent_layers, Descriptor(media_type, digest, size)]
        platform = parent.record.platform if parent is not None else "linux/amd64"
        return store_image(store, config, layers, [canonical], platform=platform, source="commit")


def store_image(
    store: ImageStore,
    config: dict[str, Any],
    layers: Sequence[Descriptor],
    refs: Sequence[str] | None,
    *,
    platform: str = "linux/amd64",
    source: str = "build",
) -> Image:
    """Stores an image whose layer blobs are already in ``store``: its config (with the layers'
    diff ids already in ``rootfs``), an OCI manifest, and an index record under each of ``refs``
    (canonical references; none: under its config digest, as docker keeps an untagged image).
    Returns the stored image."""
    config_raw = json.dumps(config, separators=(",", ":"), sort_keys=True).encode()
    config_digest = store.blobs.put_bytes(config_raw, None, "config")
    described: list[dict[str, Any]] = [
        {
            "mediaType": _OCI_EQUIVALENT.get(d.media_type, d.media_type) or OCI_LAYER_GZIP,
            "digest": d.digest,
            "size": d.size,
        }
        for d in layers
    ]
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_raw)},
        "layers": described,
    }
    manifest_raw = json.dumps(manifest, separators=(",", ":")).encode()
    Manifest.parse(manifest_raw, "the new manifest")  # the same checks as a pulled one
    manifest_digest = store.blobs.put_bytes(manifest_raw, None, "manifest")
    names = list(refs) if refs else [config_digest]
    for name in names:
        store.add(
            ImageRecord(
                ref=name,
                manifest_digest=manifest_digest,
                config_digest=config_digest,
                layers=tuple(str(m["digest"]) for m in described),
                size=len(config_raw) + sum(int(m["size"]) for m in described),
                platform=platform,
                source=source,
                pulled_at=time.time(),
            )
        )
    return load_image(names[0], store)
