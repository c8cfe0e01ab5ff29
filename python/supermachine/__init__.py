"""supermachine: run OCI/Docker images as hardware-isolated KVM microVMs.

The Rust core (``supermachine._core``) does the heavy lifting; this package is the product API.
"""

from __future__ import annotations

from supermachine.errors import SupermachineError

__all__ = ["SupermachineError", "__version__"]
__version__ = "0.1.0"
