"""Where supermachine keeps its data on the host."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """The root of supermachine's cache (layers, kernels, images).

    ``SUPERMACHINE_CACHE_DIR`` overrides the platform default (``~/.cache/supermachine`` on Linux).
    """
    override = os.environ.get("SUPERMACHINE_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir("supermachine"))


def blob_dir() -> Path:
    """The content-addressed blob store shared by all images: ``<cache>/blobs/sha256/<hex>``."""
    return cache_dir() / "blobs"
