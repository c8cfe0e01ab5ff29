"""The PEP 517 build backend of ``pip install .`` and of building from the sdist: maturin's, with
the guest artefacts and the VMM worker staged into the package first (``stage_wheel_artefacts``),
so every wheel carries them. Editable installs and metadata hooks go to maturin unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import maturin
import stage_wheel_artefacts
from maturin import (  # noqa: F401  (hooks this backend passes through unchanged)
    build_editable,
    build_sdist,
    get_requires_for_build_editable,
    get_requires_for_build_sdist,
    get_requires_for_build_wheel,
    prepare_metadata_for_build_wheel,
)


def build_wheel(
    wheel_directory: str,
    config_settings: Mapping[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    if stage_wheel_artefacts.main() != 0:
        raise SystemExit("error: the wheel's guest artefacts could not be staged (reason above)")
    return str(maturin.build_wheel(wheel_directory, config_settings, metadata_directory))
