"""Exception hierarchy. Every message is one line that names the problem."""

from __future__ import annotations


class SupermachineError(Exception):
    """Base class of every error supermachine raises on purpose."""


class InputError(SupermachineError):
    """An input file or directory is missing, unreadable or malformed."""


class ImageReferenceError(SupermachineError):
    """An image reference (``name[:tag][@digest]``, ``oci:PATH``, ...) cannot be parsed."""


class RegistryError(SupermachineError):
    """A registry refused a request, could not be reached, or answered something unusable."""


class AuthenticationError(RegistryError):
    """A registry rejected the credentials (or demanded credentials that were not given)."""


class ManifestError(SupermachineError):
    """A manifest, image index or image config is malformed, unsupported or has no matching platform."""


class DigestMismatchError(SupermachineError):
    """Content did not match the digest or size that refers to it."""


class LayerError(SupermachineError):
    """A layer cannot be read or applied to the root filesystem."""


class UnsafeLayerError(LayerError):
    """A layer entry would write outside the root filesystem."""


class ImageNotFoundError(SupermachineError):
    """No stored image matches the given reference."""


class RootfsError(SupermachineError):
    """Building a root filesystem image (squashfs) failed."""


class KernelError(SupermachineError):
    """The guest kernel could not be found or built."""
