"""Image commands (pull, images, rmi, run). Filled in by the OCI work."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Attach the image commands to the top-level group."""
    del group
