"""Where supermachine keeps its data on the host."""

from __future__ import annotations

import os
from pathlib import Path

APP = "supermachine"


def _xdg(variable: str, fallback: str) -> Path:
    """An XDG base directory: ``$variable`` when it holds an absolute path (the spec ignores other
    values), else ``fallback`` under the home directory. Spelled out rather than imported, as every
    command needs it at start-up."""
    value = os.environ.get(variable, "").strip()
    return Path(value) if os.path.isabs(value) else Path(os.path.expanduser(fallback))


def xdg_cache_home() -> Path:
    """The user's cache directory (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    return _xdg("XDG_CACHE_HOME", "~/.cache")


def xdg_config_home() -> Path:
    """The user's configuration directory (``$XDG_CONFIG_HOME``, else ``~/.config``)."""
    return _xdg("XDG_CONFIG_HOME", "~/.config")


def xdg_data_home() -> Path:
    """The user's data directory (``$XDG_DATA_HOME``, else ``~/.local/share``)."""
    return _xdg("XDG_DATA_HOME", "~/.local/share")


def cache_dir() -> Path:
    """The root of supermachine's cache (layers, kernels, images).

    ``SUPERMACHINE_CACHE_DIR`` overrides the XDG default (``~/.cache/supermachine``).
    """
    override = os.environ.get("SUPERMACHINE_CACHE_DIR")
    return Path(override) if override else xdg_cache_home() / APP


def blob_dir() -> Path:
    """The content-addressed blob store shared by all images: ``<cache>/blobs/sha256/<hex>``."""
    return cache_dir() / "blobs"


def data_dir() -> Path:
    """Where supermachine keeps what users make and must not lose with a cache (named volumes).

    ``SUPERMACHINE_DATA_DIR`` overrides the XDG default (``~/.local/share/supermachine``).
    """
    override = os.environ.get("SUPERMACHINE_DATA_DIR")
    return Path(override) if override else xdg_data_home() / APP
