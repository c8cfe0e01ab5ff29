"""Shared set-up for the guest agent tests: the real static agent, run on the host on a Unix socket."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from supermachine import initramfs
from supermachine.agent import AgentClient, connect_unix


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: boots a guest kernel or builds one (minutes)")


@pytest.fixture(scope="session")
def agent_binary() -> Path:
    """The static agent binary for the current sources (built on first use, about ten seconds)."""
    return initramfs.agent_path()


@dataclass
class AgentServer:
    """An agent process serving ``--listen unix:<socket>``."""

    process: subprocess.Popen[bytes]
    socket: Path
    log: Path

    def connect(self) -> AgentClient:
        return connect_unix(self.socket, timeout=5)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_agent(binary: Path, directory: Path) -> AgentServer:
    sock = directory / "agent.sock"
    log = directory / "agent.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(binary), "--listen", f"unix:{sock}"], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    # Listening means accepting a connection: the socket file appears at bind(), a moment before
    # listen(), and a connect in between is refused (seen on a loaded host).
    deadline = time.monotonic() + 10
    while not _accepts(sock):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"agent did not start listening; log:\n{log.read_text()}")
        time.sleep(0.005)
    return AgentServer(process, sock, log)


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


def serving(server: AgentServer) -> Iterator[AgentServer]:
    """Yields ``server`` for a test, fails the test if the agent died during it, and ends it."""
    try:
        yield server
        assert server.alive(), f"agent exited with {server.process.returncode}; log:\n{server.log_text()}"
    finally:
        if server.process.poll() is None:
            server.process.terminate()
            server.process.wait(timeout=10)


@pytest.fixture
def agent(agent_binary: Path, tmp_path: Path) -> Iterator[AgentServer]:
    """A fresh agent per test; the test fails if the agent died during it."""
    yield from serving(start_agent(agent_binary, tmp_path))


@pytest.fixture
def client(agent: AgentServer) -> Iterator[AgentClient]:
    with agent.connect() as connected:
        yield connected
