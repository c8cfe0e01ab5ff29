"""The agent's ``tcp_connect`` request, the relay behind ``Vm.expose_tcp``: the real agent on a
Unix socket connects to TCP servers on this machine's loopback, as it would inside a guest.

Covered: bytes both ways with each side's half-close passed on, a large transfer intact, a
refused port, a guest socket reset mid-stream, a host peer that goes away, and a client that
breaks the protocol during a stream. Then :class:`PortForward` end to end: listener, relays,
the connection cap and ``close``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
from conftest import AgentServer
from supermachine import forward
from supermachine.agent import HELLO, AgentClient, _decode, _encode
from supermachine.errors import AgentError, AgentRequestError, NetworkError
from supermachine.forward import PortForward

TIMEOUT = 30.0


class Server:
    """A one-connection TCP server on loopback running ``handler`` in a thread."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(TIMEOUT)
        self.port: int = self._listener.getsockname()[1]
        self.error: BaseException | None = None
        self._handler = handler
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
            conn.settimeout(TIMEOUT)
            with conn:
                self._handler(conn)
        except BaseException as e:  # reported by join()
            self.error = e

    def join(self) -> None:
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "server still running"
        self._listener.close()
        if self.error is not None:
            raise self.error


def read_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


@contextlib.contextmanager
def peer_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair on loopback: (the relay's peer, the test's end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outside = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        inside, _ = listener.accept()
    inside.settimeout(TIMEOUT)
    with inside, outside:
        yield inside, outside


def relay_in_thread(client: AgentClient, port: int, peer: socket.socket) -> dict[str, object]:
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = client.relay_tcp(port, peer)
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    box["thread"] = thread
    return box


def finished(box: dict[str, object]) -> dict[str, object]:
    thread = box["thread"]
    assert isinstance(thread, threading.Thread)
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "relay still running"
    return box


def test_relays_both_ways_and_passes_each_half_close_on(client: AgentClient) -> None:
    # The server reads to end of stream before it answers: only a relayed half-close lets it.
    def answer_after_eof(conn: socket.socket) -> None:
        request = read_to_eof(conn)
        conn.sendall(b"got " + request)

    server = Server(answer_after_eof)
    with peer_pair() as (inside, outside):
        box = relay_in_thread(client, server.port, inside)
        outside.sendall(b"hello")
        outside.shutdown(socket.SHUT_WR)
        assert read_to_eof(outside) == b"got hello"
        box = finished(box)
    server.join()
    assert "error" not in box, box
    result = box["result"]
    assert (result.to_guest, result.from_guest) == (5, 9)  # type: ignore[attr-defined]


def test_a_large_stream_arrives_intact_in_both_directions(client: AgentClient) -> None:
    size = 8 << 20
    sent = os.urandom(size)

    def echo_digest(conn: socket.socket) -> None:
        digest = hashlib.sha256(read_to_eof(conn)).digest()
        conn.sendall(digest * (size // len(digest)))

    server = Server(echo_digest)
    with peer_pair() as (inside, outside):
        box = relay_in_thread(client, server.port, inside)
        writer = threading.Thread(target=lambda: (outside.sendall(sent), outside.shutdown(socket.SHUT_WR)))
        writer.start()
        back = read_to_eof(outside)
        writer.join(TIMEOUT)
        box = finished(box)
    server.join()
    assert "error" not in box, box
    assert back == hashlib.sha256(sent).digest() * (size // 32)


def test_a_port_nothing_listens_on_is_refused_and_the_peer_reset(agent: AgentServer) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    # `probe` is closed: nothing listens on `port` any more.
    with agent.connect() as client, peer_pair() as (inside, outside):
        with pytest.raises(AgentRequestError) as refused:
            client.relay_tcp(port, inside)
        assert refused.value.errno == errno.ECONNREFUSED
        assert f"tcp_connect 127.0.0.1:{port}" in str(refused.value)
        inside.close()
        with pytest.raises(ConnectionResetError):
            read_to_eof(outside)
    with agent.connect() as other:
        assert other.ping()


@pytest.mark.parametrize("port", [0, 65536, -1, True, "80"])
def test_a_bad_port_is_refused_before_anything_is_sent(client: AgentClient, port: object) -> None:
    with peer_pair() as (inside, _), pytest.raises(AgentError, match="is not between 1 and 65535"):
        client.relay_tcp(port, inside)  # type: ignore[arg-type]
    assert client.ping()


def test_a_guest_socket_reset_mid_stream_resets_the_peer(client: AgentClient) -> None:
    def reset_after_greeting(conn: socket.socket) -> None:
        conn.sendall(b"hi")
        assert conn.recv(5) == b"ready"
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    server = Server(reset_after_greeting)
    with peer_pair() as (inside, outside):
        box = relay_in_thread(client, server.port, inside)
        assert outside.recv(2) == b"hi"
        outside.sendall(b"ready")
        server.join()
        box = finished(box)
        assert isinstance(box.get("error"), AgentRequestError), box
        assert box["error"].errno == errno.ECONNRESET  # type: ignore[attr-defined]
        inside.close()  # what the relay's caller does: the reset reaches the host peer
        with pytest.raises(ConnectionResetError):
            read_to_eof(outside)


def test_a_peer_that_goes_away_ends_the_guest_connection(client: AgentClient) -> None:
    seen: list[bytes] = []

    def wait_for_the_end(conn: socket.socket) -> None:
        seen.append(read_to_eof(conn))

    server = Server(wait_for_the_end)
    with peer_pair() as (inside, outside):
        box = relay_in_thread(client, server.port, inside)
        outside.sendall(b"partial")
        outside.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        outside.close()
        finished(box)
    server.join()
    assert seen == [b"partial"] or seen == [b""]


def test_a_frame_other_than_data_during_a_stream_is_a_violation(agent: AgentServer) -> None:
    server = Server(read_to_eof)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(TIMEOUT)
        raw.connect(str(agent.socket))
        request = _encode([(1, server.port)])
        raw.sendall(HELLO + struct.pack("<IB", len(request) + 1, 0x0D) + request)
        raw.sendall(struct.pack("<IB", 1, 0x09))  # a ping inside the stream
        data = read_to_eof(raw)
    server.join()
    assert data[:8] == HELLO
    frames = []
    pos = 8
    while pos < len(data):
        length, kind = struct.unpack_from("<IB", data, pos)
        frames.append((kind, data[pos + 5 : pos + 4 + length]))
        pos += 4 + length
    assert [k for k, _ in frames] == [0x88, 0x8F]
    fields = _decode(frames[1][1])
    assert fields[4] == 1 and fields[3] == b"unexpected ping frame during a tcp_connect stream"
    assert agent.alive()


# -- PortForward: the host side of Vm.expose_tcp ----------------------------------------------


def test_a_forward_serves_connections_one_after_another_and_at_once(agent: AgentServer) -> None:
    with socket.create_server(("127.0.0.1", 0)) as guest_service:
        guest_service.settimeout(TIMEOUT)
        port = guest_service.getsockname()[1]

        def serve(count: int) -> None:
            for _ in range(count):
                conn, _ = guest_service.accept()
                threading.Thread(target=lambda c=conn: (c.sendall(c.recv(100).upper()), c.close())).start()

        serving = threading.Thread(target=serve, args=(4,), daemon=True)
        serving.start()
        fwd = PortForward(agent.connect, port)
        try:
            assert fwd.address.host == "127.0.0.1" and fwd.address.port != port

            def fetch(word: bytes) -> bytes:
                with socket.create_connection(fwd.address, timeout=TIMEOUT) as c:
                    c.sendall(word)
                    return read_to_eof(c)

            assert fetch(b"one") == b"ONE"
            results: list[bytes] = []
            threads = [
                threading.Thread(target=lambda w=w: results.append(fetch(w))) for w in (b"a", b"b", b"c")
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT)
            assert sorted(results) == [b"A", b"B", b"C"]
        finally:
            fwd.close()
        serving.join(TIMEOUT)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(fwd.address, timeout=TIMEOUT)


def test_a_forward_resets_connections_to_a_closed_guest_port(agent: AgentServer) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    fwd = PortForward(agent.connect, port)
    try:
        with pytest.raises(ConnectionResetError), socket.create_connection(fwd.address, timeout=TIMEOUT) as c:
            read_to_eof(c)
    finally:
        fwd.close()


def test_connections_beyond_the_cap_are_reset_and_close_ends_the_rest(
    agent: AgentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(forward, "MAX_CONNECTIONS", 2)
    with socket.create_server(("127.0.0.1", 0)) as guest_service:
        port = guest_service.getsockname()[1]
        fwd = PortForward(agent.connect, port)
        held = []
        try:
            for _ in range(2):
                c = socket.create_connection(fwd.address, timeout=TIMEOUT)
                c.sendall(b"x")  # the relay is up once the guest side has it
                guest_side, _ = guest_service.accept()
                assert guest_side.recv(1) == b"x"
                held.append((c, guest_side))
            assert fwd.connections == 2
            # The reset may come so fast that connect() itself reports it.
            with (
                pytest.raises(ConnectionResetError),
                socket.create_connection(fwd.address, timeout=TIMEOUT) as third,
            ):
                read_to_eof(third)
        finally:
            fwd.close()
        # Closing the forward ended the relayed connections at both ends.
        for c, guest_side in held:
            with c, guest_side:
                guest_side.settimeout(TIMEOUT)
                with contextlib.suppress(ConnectionResetError):
                    assert read_to_eof(guest_side) == b""
                with contextlib.suppress(ConnectionResetError):
                    assert read_to_eof(c) == b""
        assert fwd.connections == 0


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"guest_port": 0}, "guest port 0 is not a port number (1 to 65535)"),
        ({"guest_port": 80, "host_port": 70000}, "host port 70000 is not a port number (0 to 65535)"),
        ({"guest_port": 80, "host": "localhost"}, "host 'localhost' is not an IP address to listen on"),
        ({"guest_port": 80, "host": "192.0.2.1"}, "cannot publish guest port 80 on 192.0.2.1:0"),
    ],
)
def test_bad_forward_arguments_are_one_line_errors(
    agent: AgentServer, kwargs: dict[str, object], problem: str
) -> None:
    with pytest.raises(NetworkError) as refused:
        PortForward(agent.connect, **kwargs)  # type: ignore[arg-type]
    assert str(refused.value).startswith(problem)
    assert "\n" not in str(refused.value)
