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


def data_dir() -> Path:
    """Where supermachine keeps what users make and must not lose with a cache (named volumes).

    ``SUPERMACHINE_DATA_DIR`` overrides the platform default (``~/.local/share/supermachine``).
    """
    override = os.environ.get("SUPERMACHINE_DATA_DIR")
    return Path(override) if override else Path(platformdirs.user_data_dir("supermachine"))
