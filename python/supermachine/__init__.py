"""supermachine: run OCI/Docker images as hardware-isolated KVM microVMs.

The Rust core (``supermachine._core``) does the heavy lifting; this package is the product API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from supermachine.errors import SupermachineError

if TYPE_CHECKING:
    from supermachine.image import Image
    from supermachine.pool import Pool
    from supermachine.vm import Vm, VmConfig

__all__ = ["Image", "Pool", "SupermachineError", "Vm", "VmConfig", "__version__"]


def __getattr__(name: str) -> Any:
    # The VM API is imported on first use, so `import supermachine` stays cheap for the probes.
    if name == "Image":
        from supermachine.image import Image

        return Image
    if name == "Pool":
        from supermachine.pool import Pool

        return Pool
    if name in ("Vm", "VmConfig"):
        from supermachine import vm

        return getattr(vm, name)
    raise AttributeError(f"module 'supermachine' has no attribute {name!r}")


__version__ = "0.1.0"
