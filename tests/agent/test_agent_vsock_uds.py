"""connect_vsock_uds: the Firecracker-style ``CONNECT <port>`` handshake over the VMM's Unix socket.

A small relay plays the VMM's part: it accepts on a Unix socket, reads ``CONNECT <port>\\n``, and for
the agent's port answers ``OK <n>\\n`` and relays bytes to a real agent; for other ports it closes the
connection, as a VMM does when nothing listens in the guest.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AgentServer, start_agent
from supermachine.agent import connect_vsock_uds
from supermachine.errors import AgentUnreachable


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class Relay:
    def __init__(self, path: Path, agent_socket: Path, port: int = 1024, answer: bytes | None = None) -> None:
        self.path = path
        self.agent_socket = agent_socket
        self.port = port
        self.answer = answer
        self.lines: list[bytes] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n"):
            byte = conn.recv(1)
            if not byte:
                conn.close()
                return
            line += byte
        self.lines.append(line)
        if line != f"CONNECT {self.port}\n".encode():
            conn.close()
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(str(self.agent_socket))
        except OSError:
            # Nothing listens in the "guest" yet: the VMM drops the connection.
            upstream.close()
            conn.close()
            return
        conn.sendall(self.answer if self.answer is not None else b"OK 1073741824\n")
        threading.Thread(target=_pump, args=(upstream, conn), daemon=True).start()
        _pump(conn, upstream)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def relay(agent: AgentServer, tmp_path: Path) -> Iterator[Relay]:
    r = Relay(tmp_path / "vsock.sock", agent.socket)
    yield r
    r.close()


def test_handshake_then_protocol(relay: Relay) -> None:
    with connect_vsock_uds(relay.path, timeout=5) as client:
        assert client.ping() == "0.1.0"
        assert client.exec(["echo", "through the relay"]).stdout == b"through the relay\n"
        client.write_file(f"{relay.path.parent}/f", b"data")
        assert client.read_file(f"{relay.path.parent}/f") == b"data"
    assert relay.lines == [b"CONNECT 1024\n"]


def test_no_listener_on_the_port(relay: Relay) -> None:
    started = time.monotonic()
    with pytest.raises(AgentUnreachable) as info:
        connect_vsock_uds(relay.path, port=2000, timeout=0.5)
    assert time.monotonic() - started < 3
    message = str(info.value)
    assert message.startswith(f"no agent on vsock port 2000 via {relay.path} within 0.5 s: ")
    assert "\n" not in message
    assert len(relay.lines) >= 2, "expected retries"
    assert set(relay.lines) == {b"CONNECT 2000\n"}


def test_refusing_vmm_answer(agent: AgentServer, tmp_path: Path) -> None:
    relay = Relay(tmp_path / "vsock.sock", agent.socket, answer=b"ERR no such port\n")
    try:
        with pytest.raises(AgentUnreachable, match="VMM answered 'ERR no such port'"):
            connect_vsock_uds(relay.path, timeout=0.3)
    finally:
        relay.close()


def test_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(AgentUnreachable, match=r"within 0.2 s: No such file or directory$"):
        connect_vsock_uds(tmp_path / "absent.sock", timeout=0.2)


def test_agent_started_after_the_client(agent_binary: Path, tmp_path: Path) -> None:
    # The VMM socket exists but the agent is not up yet: the client keeps trying until it is.
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    relay = Relay(tmp_path / "vsock.sock", agent_dir / "agent.sock")
    result: list[str] = []

    def late_start() -> None:
        time.sleep(0.3)
        result.append("started")
        servers.append(start_agent(agent_binary, agent_dir))

    servers: list[AgentServer] = []
    starter = threading.Thread(target=late_start)
    starter.start()
    try:
        with connect_vsock_uds(relay.path, timeout=10) as client:
            assert client.ping()
    finally:
        starter.join()
        relay.close()
        for server in servers:
            server.process.terminate()
            server.process.wait(timeout=10)
    assert result == ["started"]
