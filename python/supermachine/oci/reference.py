"""Image references: ``[registry/]repository[:tag][@digest]`` with Docker Hub normalisation.

``alpine`` means ``docker.io/library/alpine:latest``; the first path component is a registry host only
when it contains a ``.`` or a ``:``, or is ``localhost`` (the rule the Docker CLI uses).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from supermachine.errors import ImageReferenceError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[A-Za-z0-9=_-]{32,}")
_SHA256_HEX = re.compile(r"[a-f0-9]{64}")
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` (and ``*.localhost``) and loopback addresses; ``host`` has no port."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed ``sha256:<64 hex>`` digest, else raise."""
    algorithm, _, hex_part = digest.partition(":")
    if algorithm != "sha256" or not _SHA256_HEX.fullmatch(hex_part):
        shown = digest if len(digest) <= 80 else digest[:77] + "..."  # may come from an untrusted manifest
        raise ImageReferenceError(f"unsupported or malformed digest {shown!r} (expected sha256:<64 hex>)")
    return digest


@dataclass(frozen=True)
class Reference:
    """A parsed, normalised registry reference.

    ``registry`` is the name users see (``docker.io``); :attr:`api_host` is where the API lives.
    At least one of ``tag`` and ``digest`` is set; when both are, the digest wins for fetching.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse and normalise ``text``; raises :class:`ImageReferenceError` with the reason."""
        original = text
        text = text.strip()
        if not text:
            raise ImageReferenceError("empty image reference")
        if "://" in text:
            raise ImageReferenceError(f"invalid image reference {original!r}: drop the URL scheme")
        digest: str | None = None
        if "@" in text:
            text, digest = text.split("@", 1)
            validate_digest(digest)
        registry = DOCKER_HUB
        first, sep, rest = text.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            registry, text = first, rest
            if not _HOST.fullmatch(registry):
                raise ImageReferenceError(f"invalid registry host {registry!r} in {original!r}")
        tag: str | None = None
        last_slash = text.rfind("/")
        colon = text.rfind(":")
        if colon > last_slash:
            text, tag = text[:colon], text[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise ImageReferenceError(f"invalid tag {tag!r} in {original!r}")
        if registry in (DOCKER_HUB, "index.docker.io", DOCKER_HUB_API_HOST):
            registry = DOCKER_HUB
            if "/" not in text:
                text = f"library/{text}"
        for component in text.split("/"):
            if not _COMPONENT.fullmatch(component):
                raise ImageReferenceError(
                    f"invalid repository name {text!r} in {original!r} (lowercase letters, digits, . _ -)"
                )
        if len(text) > 255:
            raise ImageReferenceError(f"repository name too long in {original!r}")
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry=registry, repository=text, tag=tag, digest=digest)

    @property
    def api_host(self) -> str:
        """The host (and port) that serves the registry API for this reference."""
        return DOCKER_HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

    @property
    def hostname(self) -> str:
        """The registry host without port or IPv6 brackets."""
        host = self.registry
        if host.startswith("["):
            return host[1 : host.index("]")]
        return host.rsplit(":", 1)[0] if ":" in host else host

    @property
    def is_loopback(self) -> bool:
        """True for ``localhost`` and loopback addresses (these default to plain HTTP)."""
        return is_loopback_host(self.hostname)

    @property
    def reference(self) -> str:
        """What to put after ``/manifests/``: the digest if known, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def with_digest(self, digest: str) -> Reference:
        """The same repository pinned to ``digest`` (the tag is kept for display)."""
        return Reference(self.registry, self.repository, self.tag, validate_digest(digest))

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def familiar(self) -> str:
        """The short form people type: ``alpine:latest`` rather than ``docker.io/library/alpine:latest``."""
        text = str(self)
        if self.registry == DOCKER_HUB:
            text = text[len(DOCKER_HUB) + 1 :]
            if text.startswith("library/"):
                text = text[len("library/") :]
        return text


def parse_reference(text: str) -> Reference:
    """Shorthand for :meth:`Reference.parse`."""
    return Reference.parse(text)
