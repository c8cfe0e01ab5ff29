"""The agent binary itself: static, self-describing, strict about its arguments."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from supermachine import initramfs


def test_binary_is_static(agent_binary: Path) -> None:
    if shutil.which("file") is not None:
        description = subprocess.run(["file", "-b", str(agent_binary)], capture_output=True, text=True).stdout
        assert "statically linked" in description, description
        assert "x86-64" in description, description
    ldd = subprocess.run(["ldd", str(agent_binary)], capture_output=True, text=True)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr
    # No program interpreter (PT_INTERP) and no dynamic section: the guest has no dynamic loader.
    assert _program_header_types(agent_binary.read_bytes()).isdisjoint({PT_INTERP, PT_DYNAMIC})


PT_DYNAMIC = 2
PT_INTERP = 3


def _program_header_types(elf: bytes) -> set[int]:
    assert elf[:4] == b"\x7fELF" and elf[4] == 2 and elf[5] == 1, "expected a 64-bit little-endian ELF file"
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return {struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)}


def test_build_is_cached(agent_binary: Path) -> None:
    assert initramfs.cached_agent_path() == agent_binary
    assert initramfs.agent_path(build=False) == agent_binary


def test_version(agent_binary: Path) -> None:
    result = subprocess.run([str(agent_binary), "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "supermachine-agent 0.1.0 (protocol 1)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "nothing to do: not PID 1 and no --listen"),
        (["--listen", "tcp:1"], 'bad listen address "tcp:1" (expected unix:PATH or vsock:PORT)'),
        (["--listen", "vsock:x"], 'bad vsock port "x"'),
        (["--frobnicate"], 'unknown argument "--frobnicate"'),
    ],
)
def test_bad_arguments(agent_binary: Path, args: list[str], message: str) -> None:
    result = subprocess.run([str(agent_binary), *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == f"supermachine-agent: {message}"


def test_unusable_socket_path_is_one_line_and_fatal(agent_binary: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(agent_binary), "--listen", f"unix:{tmp_path}/missing/agent.sock"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"supermachine-agent: fatal: cannot listen on unix:{tmp_path}/missing/agent.sock: "
        "No such file or directory\n"
    )
