"""The agent under malformed input: bad hellos, oversized frames, unknown types, garbage.

Each case must end in an error frame and/or a closed connection, and the agent must keep serving
other connections.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from pathlib import Path

import pytest
from conftest import AgentServer
from supermachine.agent import HELLO, MAX_FRAME, AgentClient, _decode
from supermachine.errors import ProtocolError


def _raw(agent: AgentServer, timeout: float = 10) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(agent.socket))
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the agent sends until it closes the connection."""
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    frames = []
    pos = 0
    while pos + 5 <= len(data):
        length, kind = struct.unpack_from("<IB", data, pos)
        frames.append((kind, data[pos + 5 : pos + 4 + length]))
        pos += 4 + length
    return frames


def _fatal_error(data: bytes) -> str:
    """The message of the single fatal error frame after the agent's hello."""
    assert data[:8] == HELLO
    frames = _frames(data[8:])
    assert len(frames) == 1, frames
    kind, payload = frames[0]
    assert kind == 0x8F
    fields = _decode(payload)
    assert fields[4] == 1, "error should be fatal"
    assert fields[1] == b"protocol"
    message = fields[3]
    assert isinstance(message, bytes)
    return message.decode()


def _still_serving(agent: AgentServer) -> None:
    assert agent.alive()
    with agent.connect() as client:
        assert client.exec(["echo", "alive"]).stdout == b"alive\n"


def _exchange(agent: AgentServer, data: bytes) -> bytes:
    with _raw(agent) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return _read_all(sock)


def test_bad_magic(agent: AgentServer) -> None:
    message = _fatal_error(_exchange(agent, b"GET / HTTP/1.1\r\n\r\n"))
    assert "bad hello" in message
    _still_serving(agent)


def test_wrong_version(agent: AgentServer) -> None:
    message = _fatal_error(_exchange(agent, b"SMAG" + struct.pack("<HH", 99, 0)))
    assert message == "unsupported protocol version 99; this agent speaks version 1"
    _still_serving(agent)


def test_oversized_frame(agent: AgentServer) -> None:
    # Only the header is sent: the agent must refuse before waiting for a megabyte of body.
    with _raw(agent) as sock:
        sock.sendall(HELLO + struct.pack("<IB", MAX_FRAME + 1, 0x01))
        data = _read_all(sock)
    assert _fatal_error(data) == f"frame of {MAX_FRAME + 1} bytes exceeds the limit of {MAX_FRAME} bytes"
    _still_serving(agent)


def test_zero_length_frame(agent: AgentServer) -> None:
    assert _fatal_error(_exchange(agent, HELLO + b"\0\0\0\0")) == "frame with length 0"
    _still_serving(agent)


@pytest.mark.parametrize("kind", [0x00, 0x17, 0x81, 0x8F, 0xFF])
def test_unknown_frame_type(agent: AgentServer, kind: int) -> None:
    message = _fatal_error(_exchange(agent, HELLO + struct.pack("<IB", 1, kind)))
    assert message == f"unknown frame type 0x{kind:02x}"
    _still_serving(agent)


def test_malformed_exec_fields(agent: AgentServer) -> None:
    # A list claiming 2^32-1 elements in a 10-byte payload.
    payload = bytes([1, 3]) + struct.pack("<I", 0xFFFFFFFF) + b"abcd"
    message = _fatal_error(_exchange(agent, HELLO + struct.pack("<IB", len(payload) + 1, 0x01) + payload))
    assert message.startswith("malformed exec request: ")
    _still_serving(agent)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (bytes([9, 1]) + struct.pack("<Q", 0), "unknown field 9"),
        (bytes([1, 2]) + struct.pack("<I", 1) + b"x", "field 1 has kind 2, expected 1"),
        (bytes([2, 2]) + struct.pack("<I", 64) + b"short", "truncated byte string"),
        (struct.pack("<BBQBBQ", 1, 1, 1, 1, 1, 2), "field 1 appears twice"),
    ],
)
def test_malformed_sync_fields(agent: AgentServer, payload: bytes, problem: str) -> None:
    message = _fatal_error(_exchange(agent, HELLO + struct.pack("<IB", len(payload) + 1, 0x0B) + payload))
    assert message == f"malformed sync request: {problem}"
    _still_serving(agent)


def test_unexpected_frame_outside_a_request(agent: AgentServer) -> None:
    message = _fatal_error(_exchange(agent, HELLO + struct.pack("<IB", 1, 0x07)))
    assert message == "unexpected file_end frame outside a request"
    _still_serving(agent)


def test_close_inside_a_frame(agent: AgentServer) -> None:
    data = _exchange(agent, HELLO + struct.pack("<IB", 100, 0x01) + b"partial")
    assert _fatal_error(data) == "connection closed inside a frame"
    _still_serving(agent)


def test_client_rejects_a_peer_that_is_not_an_agent(tmp_path: Path) -> None:
    path = tmp_path / "fake.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        client_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client_sock.connect(str(path))
        peer, _ = server.accept()
        with peer:
            peer.sendall(b"SSH-2.0-OpenSSH\r\n")
            with pytest.raises(ProtocolError, match="not a supermachine agent"):
                AgentClient(client_sock)


def test_random_garbage_never_kills_the_agent(agent: AgentServer) -> None:
    rng = random.Random(1234)
    for i in range(150):
        blob = rng.randbytes(rng.randrange(0, 300))
        if i % 3 == 0:
            blob = HELLO + blob
        elif i % 3 == 1:
            # Plausible frames with random types and bodies.
            kind = rng.randrange(256)
            body = rng.randbytes(rng.randrange(0, 40))
            blob = HELLO + struct.pack("<IB", len(body) + 1, kind) + body
        _exchange(agent, blob)
        assert agent.alive(), f"agent died on input {i}: {blob!r}"
    _still_serving(agent)


def test_abrupt_disconnects(agent: AgentServer) -> None:
    for _ in range(20):
        with _raw(agent) as sock:
            sock.sendall(HELLO + os.urandom(3))
    _still_serving(agent)


def test_a_connection_without_a_hello_is_closed_after_10_s(agent: AgentServer) -> None:
    # One client says nothing, the other stops halfway through its hello. The socket timeout makes
    # the test fail instead of hanging should the agent never close them.
    with _raw(agent, timeout=20) as silent, _raw(agent, timeout=20) as partial:
        partial.sendall(HELLO[:4])
        started = time.monotonic()
        for sock in (silent, partial):
            assert _fatal_error(_read_all(sock)) == "no hello within 10 s"
        elapsed = time.monotonic() - started
    assert 9 < elapsed < 15, f"closed after {elapsed:.1f} s"
    _still_serving(agent)


def test_the_hello_timeout_ends_with_the_hello(agent: AgentServer) -> None:
    # A hello after 1 s is in time. After it the connection may idle for longer than the hello timeout
    # (the agent then blocks reading the next request) and still be served.
    sock = _raw(agent, timeout=30)
    time.sleep(1)
    with AgentClient(sock) as client:
        time.sleep(11)
        result = client.exec(["sh", "-c", "sleep 1; echo done"])
        assert (result.status, result.stdout) == (0, b"done\n")
        client.ping()
