"""The snapshot store: per-snapshot metadata, golden-base selection and reflink dedup of RAM files.

A store is a directory of snapshot directories, each holding ``memory.bin``, ``vmstate.bin`` and
``metadata.json``. By default it lives at ``<cache>/snapshots``.
"""

from __future__ import annotations

from pathlib import Path

from supermachine import paths


def store_dir() -> Path:
    """The default snapshot store: ``<cache>/snapshots`` (see ``SUPERMACHINE_CACHE_DIR``)."""
    return paths.cache_dir() / "snapshots"
