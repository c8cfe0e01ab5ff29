"""A hostile guest on a real Unix socket: it plays the VMM's vsock socket (``CONNECT 1024`` ->
``OK``) and an agent behind it that says the hello right and then does whatever the test wants:
nothing, too much, or garbage.

Each accepted connection runs the test's behaviour in a thread of its own; closing the fake closes
every connection, so a client that still waits on one wakes up (the test then fails instead of
hanging the suite).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from supermachine.agent import HELLO, FieldValue, _decode, _encode

#: How long the fake itself waits on a client before it gives up on the connection.
FAKE_PATIENCE = 60.0


class FakeConnection:
    """The agent's end of one connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received: list[tuple[int, bytes]] = []
        self.client_gone = threading.Event()

    def _exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionResetError("client closed the connection")
            data += chunk
        return bytes(data)

    def read_frame(self) -> tuple[int, bytes]:
        length, kind = struct.unpack("<IB", self._exact(5))
        frame = (kind, self._exact(length - 1))
        self.received.append(frame)
        return frame

    def read_request(self) -> tuple[int, dict[int, FieldValue]]:
        kind, payload = self.read_frame()
        return kind, _decode(payload) if kind not in (0x02, 0x06) else {}

    def send(self, kind: int, payload: bytes = b"") -> None:
        self.sock.sendall(struct.pack("<IB", len(payload) + 1, kind) + payload)

    def send_fields(self, kind: int, fields: list[tuple[int, FieldValue | None]]) -> None:
        self.send(kind, _encode(fields))

    def drain(self) -> None:
        """Reads (and records) whatever the client sends until it closes the connection."""
        with contextlib.suppress(OSError):
            while True:
                self.read_frame()
        self.client_gone.set()

    def drain_in_background(self) -> None:
        threading.Thread(target=self.drain, daemon=True).start()


Behaviour = Callable[[FakeConnection], None]


class FakeAgent:
    """Serves ``behaviour`` on ``path`` after the VMM handshake and the hello (``vmm=False``: the
    hello only, as ``supermachine-agent --listen unix:PATH`` does; ``hello=False``: a guest that
    accepts the connection and then says nothing at all)."""

    def __init__(self, path: Path, behaviour: Behaviour, *, vmm: bool = True, hello: bool = True) -> None:
        self.path = path
        self.behaviour = behaviour
        self.vmm = vmm
        self.hello = hello
        self.connections: list[FakeConnection] = []
        self.errors: list[BaseException] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            sock.settimeout(FAKE_PATIENCE)
            connection = FakeConnection(sock)
            self.connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: FakeConnection) -> None:
        try:
            if self.vmm:
                line = b""
                while not line.endswith(b"\n"):
                    line += connection._exact(1)
                assert line == b"CONNECT 1024\n", line
                connection.sock.sendall(b"OK 1073741824\n")
            if not self.hello:
                connection.drain()
                return
            connection.sock.sendall(HELLO)
            assert connection._exact(len(HELLO)) == HELLO
            self.behaviour(connection)
        except (OSError, AssertionError) as e:
            self.errors.append(e)

    def last(self) -> FakeConnection:
        assert self.connections, "no connection was made"
        return self.connections[-1]

    def close(self) -> None:
        self.server.close()
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)
            connection.sock.close()
