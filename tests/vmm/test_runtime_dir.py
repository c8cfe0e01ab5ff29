"""A VM's runtime directory holds its Unix sockets, whose paths have at most 107 bytes: a long
temporary directory must not make a VM unable to start."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from supermachine.vm import RUNTIME_DIR_MAX_BYTES, _new_runtime_dir

SOCKET_PATH_MAX = 107
LONGEST_SOCKET = "/vsock.sock_4294967295"
"""The longest name the VMM gives a socket in the runtime directory (a guest-opened port)."""


def test_the_longest_socket_path_fits_beneath_the_longest_runtime_dir() -> None:
    assert RUNTIME_DIR_MAX_BYTES + len(LONGEST_SOCKET) <= SOCKET_PATH_MAX


@pytest.mark.parametrize("long", [False, True])
def test_runtime_dirs_stay_short_whatever_the_temporary_directory(
    long: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))
    if long:
        base = base / ("t" * 150)
        base.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    made = _new_runtime_dir()
    try:
        assert len(os.fsencode(made)) <= RUNTIME_DIR_MAX_BYTES
        assert made.is_dir() and (made.stat().st_mode & 0o777) == 0o700
        assert made.parent == (Path("/tmp") if long else base)
    finally:
        made.rmdir()
        shutil.rmtree(base if not long else base.parent)
