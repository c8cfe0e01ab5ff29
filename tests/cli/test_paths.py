"""Where supermachine keeps its cache and its data: the XDG base directories, as the spec reads them."""

from __future__ import annotations

from pathlib import Path

import pytest
from supermachine import paths


@pytest.mark.parametrize(
    ("environ", "cache", "data"),
    [
        ({}, "/home/u/.cache/supermachine", "/home/u/.local/share/supermachine"),
        (
            {"XDG_CACHE_HOME": "/x/cache", "XDG_DATA_HOME": "/x/data"},
            "/x/cache/supermachine",
            "/x/data/supermachine",
        ),
        # Empty or relative values are ignored, as the spec says.
        (
            {"XDG_CACHE_HOME": "", "XDG_DATA_HOME": "  "},
            "/home/u/.cache/supermachine",
            "/home/u/.local/share/supermachine",
        ),
        (
            {"XDG_CACHE_HOME": "rel/cache", "XDG_DATA_HOME": "data"},
            "/home/u/.cache/supermachine",
            "/home/u/.local/share/supermachine",
        ),
        # Our own variables win over everything.
        (
            {"XDG_CACHE_HOME": "/x", "SUPERMACHINE_CACHE_DIR": "/c", "SUPERMACHINE_DATA_DIR": "/d"},
            "/c",
            "/d",
        ),
    ],
)
def test_cache_and_data_directories(
    environ: dict[str, str], cache: str, data: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "SUPERMACHINE_CACHE_DIR", "SUPERMACHINE_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", "/home/u")
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert paths.cache_dir() == Path(cache)
    assert paths.data_dir() == Path(data)
    assert paths.blob_dir() == Path(cache) / "blobs"
