"""Host side of the guest agent's exec protocol (``guest/agent/PROTOCOL.md``).

An :class:`AgentClient` speaks the protocol over any connected stream socket: a Unix socket to an
agent started with ``--listen unix:PATH`` (:func:`connect_unix`), or the VMM's vsock Unix socket
after the ``CONNECT <port>`` handshake (:func:`connect_vsock_uds`). One connection carries one request
at a time; open several connections for concurrent requests.

Example::

    with connect_vsock_uds("/run/vm/vsock.sock") as agent:
        result = agent.exec(["uname", "-a"])
        print(result.stdout.decode())
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from supermachine.errors import AgentError, AgentRequestError, AgentUnreachable, ProtocolError

__all__ = [
    "DEFAULT_PORT",
    "PROTOCOL_VERSION",
    "AgentClient",
    "ExecResult",
    "Output",
    "Process",
    "SyncResult",
    "connect_unix",
    "connect_vsock_uds",
]

MAGIC = b"SMAG"
PROTOCOL_VERSION = 1
HELLO = MAGIC + struct.pack("<HH", PROTOCOL_VERSION, 0)
#: Largest value of a frame's length field (type byte + payload) either side accepts.
MAX_FRAME = 1 << 20
#: Data chunk size for stdin and file uploads.
CHUNK = 64 * 1024
#: The vsock port the agent listens on inside a VM.
DEFAULT_PORT = 1024

# Frame types: client to agent.
EXEC = 0x01
STDIN = 0x02
STDIN_CLOSE = 0x03
SIGNAL = 0x04
WRITE_FILE = 0x05
FILE_DATA = 0x06
FILE_END = 0x07
READ_FILE = 0x08
PING = 0x09
SHUTDOWN = 0x0A
SYNC = 0x0B
# Agent to client.
STARTED = 0x81
STDOUT = 0x82
STDERR = 0x83
EXIT = 0x84
DATA = 0x85
END = 0x86
PONG = 0x87
OK = 0x88
ERROR = 0x8F

#: Most entropy one ``sync`` request may carry (the agent refuses more).
MAX_SYNC_ENTROPY = 512

# Field value kinds.
_UINT = 1
_BYTES = 2
_LIST = 3

FieldValue = int | bytes | list[bytes]
Argument = str | bytes | os.PathLike[str]


def _encode(fields: Sequence[tuple[int, FieldValue | None]]) -> bytes:
    """Field-encodes ``(tag, value)`` pairs; ``None`` values are left out."""
    out = bytearray()
    for tag, value in fields:
        if value is None:
            continue
        if isinstance(value, bool | int):
            out += struct.pack("<BBQ", tag, _UINT, int(value))
        elif isinstance(value, bytes):
            out += struct.pack("<BBI", tag, _BYTES, len(value)) + value
        else:
            out += struct.pack("<BBI", tag, _LIST, len(value))
            for item in value:
                out += struct.pack("<I", len(item)) + item
    return bytes(out)


def _decode(payload: bytes) -> dict[int, FieldValue]:
    """Decodes a field-encoded message. Unknown tags are kept (and ignored by callers)."""
    fields: dict[int, FieldValue] = {}
    pos = 0
    try:
        while pos < len(payload):
            tag, kind = payload[pos], payload[pos + 1]
            pos += 2
            if kind == _UINT:
                (number,) = struct.unpack_from("<Q", payload, pos)
                fields[tag] = int(number)
                pos += 8
            elif kind == _BYTES:
                (length,) = struct.unpack_from("<I", payload, pos)
                pos += 4
                if pos + length > len(payload):
                    raise ProtocolError("agent sent a truncated field")
                fields[tag] = payload[pos : pos + length]
                pos += length
            elif kind == _LIST:
                (count,) = struct.unpack_from("<I", payload, pos)
                pos += 4
                items: list[bytes] = []
                for _ in range(count):
                    (length,) = struct.unpack_from("<I", payload, pos)
                    pos += 4
                    if pos + length > len(payload):
                        raise ProtocolError("agent sent a truncated field")
                    items.append(payload[pos : pos + length])
                    pos += length
                fields[tag] = items
            else:
                raise ProtocolError(f"agent sent a field of unknown kind {kind}")
    except (IndexError, struct.error):
        raise ProtocolError("agent sent a truncated field") from None
    return fields


def _uint(fields: Mapping[int, FieldValue], tag: int) -> int | None:
    value = fields.get(tag)
    return value if isinstance(value, int) else None


def _text(fields: Mapping[int, FieldValue], tag: int) -> str:
    value = fields.get(tag)
    if not isinstance(value, bytes):
        return ""
    return " ".join(value.decode("utf-8", "replace").split())


def _bytes_arg(value: Argument) -> bytes:
    return value if isinstance(value, bytes) else os.fsencode(value)


@dataclass(frozen=True)
class ExecResult:
    """How a process ended. Exactly one of ``status`` and ``signal`` is set."""

    status: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    duration: float
    """Seconds from start to exit, measured by the agent (guest clock)."""
    timed_out: bool
    """The agent killed the process group because the timeout passed."""

    @property
    def returncode(self) -> int:
        """``status``, or ``-signal`` like :mod:`subprocess`."""
        return self.status if self.status is not None else -(self.signal or 0)

    @property
    def ok(self) -> bool:
        return self.status == 0 and not self.timed_out


@dataclass(frozen=True)
class Output:
    """A chunk of a process's output."""

    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True)
class SyncResult:
    """What a ``sync`` request changed in the guest."""

    clock_set: bool
    """The agent set the guest's wall clock (only an agent that is PID 1 of a VM does)."""
    entropy_added: int
    """Bytes of entropy added to the guest kernel's pool and credited (0 outside a VM)."""
    guest_time_ns: int
    """The guest's wall-clock time (Unix time in ns) right after the request."""


class Process:
    """A process started with :meth:`AgentClient.spawn`; owns the connection until it has exited.

    Iterate over it for :class:`Output` events as they arrive; :meth:`wait` collects whatever output
    was not iterated over and returns the :class:`ExecResult`.
    """

    def __init__(self, client: AgentClient, pid: int, stdin: bool) -> None:
        self._client = client
        self.pid = pid
        self._stdin_open = stdin
        self._result: ExecResult | None = None

    @property
    def result(self) -> ExecResult | None:
        """The result once the process has exited and its exit was read, else ``None``."""
        return self._result

    def _events(self, out: bytearray, err: bytearray, collect: bool) -> Iterator[Output]:
        client = self._client
        while self._result is None:
            kind, payload = client._recv_frame()
            if kind == STDOUT:
                if collect:
                    out += payload
                else:
                    yield Output("stdout", payload)
            elif kind == STDERR:
                if collect:
                    err += payload
                else:
                    yield Output("stderr", payload)
            elif kind == EXIT:
                fields = _decode(payload)
                status = _uint(fields, 1)
                signal = _uint(fields, 2)
                self._result = ExecResult(
                    status=status if signal is None else None,
                    signal=signal,
                    stdout=bytes(out),
                    stderr=bytes(err),
                    duration=(_uint(fields, 4) or 0) / 1000,
                    timed_out=bool(_uint(fields, 3)),
                )
                client._busy = False
            else:
                client._unexpected(kind, payload, "while a process runs")

    def __iter__(self) -> Iterator[Output]:
        return self._events(bytearray(), bytearray(), collect=False)

    def wait(self) -> ExecResult:
        """Reads the remaining output and the exit; returns the result (again, if already known)."""
        if self._result is None:
            for _ in self._events(bytearray(), bytearray(), collect=True):
                pass
        assert self._result is not None
        return self._result

    def write_stdin(self, data: bytes) -> None:
        """Sends ``data`` to the process's stdin (ignored by the agent once the process has exited)."""
        if not self._stdin_open:
            raise AgentError("stdin is closed or was not requested (spawn(..., stdin=True))")
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            self._client._send(STDIN, bytes(view[start : start + CHUNK]))

    def close_stdin(self) -> None:
        """Closes the process's stdin once everything sent before has been written to it."""
        if self._stdin_open:
            self._stdin_open = False
            self._client._send(STDIN_CLOSE)

    def signal(self, sig: int) -> None:
        """Sends ``sig`` to the process's process group (it runs in a session of its own)."""
        if self._result is None:
            self._client._send(SIGNAL, _encode([(1, int(sig))]))


class AgentClient:
    """A connection to a guest agent. Sends the hello and checks the agent's on construction.

    Raises :class:`AgentUnreachable` when the connection breaks, :class:`ProtocolError` when the
    agent says something that is not protocol, and :class:`AgentRequestError` when it refuses a
    request (the connection then stays usable).
    """

    def __init__(self, sock: socket.socket, *, _initial: bytes = b"") -> None:
        self._sock = sock
        self._buf = bytearray(_initial)
        self._send_lock = threading.Lock()
        self._busy = False
        self._closed = False
        self._send_raw(HELLO)
        hello = self._recv_exact(len(HELLO), "the agent's hello")
        if hello[:4] != MAGIC:
            self.close()
            raise ProtocolError(f"peer is not a supermachine agent (hello {hello[:8]!r})")
        (version,) = struct.unpack_from("<H", hello, 4)
        if version != PROTOCOL_VERSION:
            self.close()
            raise ProtocolError(
                f"agent speaks protocol version {version}; this client speaks {PROTOCOL_VERSION}"
            )

    # -- plumbing ---------------------------------------------------------------------------------

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()

    def _broken(self, what: str) -> AgentUnreachable:
        self.close()
        return AgentUnreachable(f"connection to the agent broke {what}")

    def _send_raw(self, data: bytes) -> None:
        if self._closed:
            raise AgentUnreachable("connection to the agent is closed")
        try:
            with self._send_lock:
                self._sock.sendall(data)
        except TimeoutError:
            raise self._broken("(send timed out)") from None
        except OSError as e:
            raise self._broken(f"while sending ({e.strerror or e})") from None

    def _send(self, kind: int, payload: bytes = b"") -> None:
        if len(payload) + 1 > MAX_FRAME:
            raise AgentError(f"frame of {len(payload) + 1} bytes exceeds the limit of {MAX_FRAME} bytes")
        self._send_raw(struct.pack("<IB", len(payload) + 1, kind) + payload)

    def _recv_exact(self, n: int, what: str) -> bytes:
        while len(self._buf) < n:
            if self._closed:
                raise AgentUnreachable("connection to the agent is closed")
            try:
                chunk = self._sock.recv(max(n - len(self._buf), 256 * 1024))
            except TimeoutError:
                raise self._broken(f"(no answer in time while reading {what})") from None
            except OSError as e:
                raise self._broken(f"while reading {what} ({e.strerror or e})") from None
            if not chunk:
                raise self._broken(f"(closed by the agent while reading {what})")
            self._buf += chunk
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _recv_frame(self) -> tuple[int, bytes]:
        length, kind = struct.unpack("<IB", self._recv_exact(5, "a frame header"))
        if length == 0 or length > MAX_FRAME:
            self.close()
            raise ProtocolError(f"agent sent a frame of {length} bytes (limit {MAX_FRAME})")
        return kind, self._recv_exact(length - 1, "a frame")

    def _unexpected(self, kind: int, payload: bytes, when: str) -> None:
        """Raises for an error frame (as a request error unless fatal) or an unexpected frame."""
        if kind == ERROR:
            fields = _decode(payload)
            message = _text(fields, 3) or "unspecified error"
            if _uint(fields, 4):
                self.close()
                raise ProtocolError(f"agent closed the connection: {message}")
            self._busy = False
            raise AgentRequestError(message, kind=_text(fields, 1) or "request", errno=_uint(fields, 2))
        self.close()
        raise ProtocolError(f"agent sent an unexpected frame of type 0x{kind:02x} {when}")

    def _begin(self) -> None:
        if self._busy:
            raise AgentError("connection busy: a process started with spawn() has not been waited for")
        if self._closed:
            raise AgentUnreachable("connection to the agent is closed")

    # -- requests ---------------------------------------------------------------------------------

    def ping(self) -> str:
        """Round trip; returns the agent's version."""
        self._begin()
        self._send(PING)
        kind, payload = self._recv_frame()
        if kind != PONG:
            self._unexpected(kind, payload, "in reply to ping")
        return _text(_decode(payload), 1)

    def spawn(
        self,
        argv: Sequence[Argument],
        env: Mapping[str, str] | None = None,
        cwd: Argument | None = None,
        user: str | int | None = None,
        stdin: bool = False,
        timeout: float | None = None,
        keep_background: bool = False,
        pids_max: int | None = None,
    ) -> Process:
        """Starts a process and returns as soon as it runs.

        ``env`` replaces the whole environment (default: ``PATH`` and ``HOME``); ``cwd`` defaults to
        ``/``; ``user`` is ``name``, ``uid``, ``name:group`` or ``uid:gid`` (default: the agent's
        own, root in a VM); with ``stdin`` false the process reads ``/dev/null``. After ``timeout``
        seconds the agent kills the process group and reports ``timed_out``. When the process exits
        the agent kills every process it left behind unless ``keep_background``; ``pids_max`` bounds
        its process tree (agent default 1024, 0: no limit of its own). A program that is not found
        or not executable exits with status 127 or 126 (and a line on stderr); other start failures
        (bad ``cwd``, unknown ``user``) raise :class:`AgentRequestError`.
        """
        self._begin()
        if not argv:
            raise AgentError("exec needs a non-empty argv")
        if timeout is not None and timeout <= 0:
            raise AgentError(f"timeout must be positive, got {timeout}")
        if pids_max is not None and pids_max < 0:
            raise AgentError(f"pids_max must not be negative, got {pids_max}")
        env_list = None if env is None else [f"{k}={v}".encode() for k, v in env.items()]
        payload = _encode(
            [
                (1, [_bytes_arg(a) for a in argv]),
                (2, env_list),
                (3, None if cwd is None else _bytes_arg(cwd)),
                (4, None if user is None else str(user).encode()),
                (5, int(stdin)),
                (6, None if timeout is None else max(1, round(timeout * 1000))),
                (7, int(keep_background) if keep_background else None),
                (8, pids_max),
            ]
        )
        self._send(EXEC, payload)
        kind, reply = self._recv_frame()
        if kind != STARTED:
            self._unexpected(kind, reply, "in reply to exec")
        pid = _uint(_decode(reply), 1) or 0
        self._busy = True
        return Process(self, pid, stdin)

    def exec(
        self,
        argv: Sequence[Argument],
        env: Mapping[str, str] | None = None,
        cwd: Argument | None = None,
        user: str | int | None = None,
        input: bytes | None = None,
        timeout: float | None = None,
        keep_background: bool = False,
        pids_max: int | None = None,
    ) -> ExecResult:
        """Runs a process to completion and returns its output and exit (see :meth:`spawn`).

        ``input`` is written to its stdin (then closed) while its output is read. A timeout is
        reported in the result (``timed_out``), not raised.
        """
        process = self.spawn(
            argv,
            env=env,
            cwd=cwd,
            user=user,
            stdin=input is not None,
            timeout=timeout,
            keep_background=keep_background,
            pids_max=pids_max,
        )
        if input is None:
            return process.wait()
        stop = threading.Event()
        failure: list[BaseException] = []

        def feed() -> None:
            try:
                view = memoryview(input)
                for start in range(0, len(view), CHUNK):
                    if stop.is_set():
                        return
                    self._send(STDIN, bytes(view[start : start + CHUNK]))
                if not stop.is_set():
                    process.close_stdin()
            except AgentError as e:
                failure.append(e)

        writer = threading.Thread(target=feed, name="agent-stdin", daemon=True)
        writer.start()
        try:
            result = process.wait()
        finally:
            # Stale stdin must not reach the next request on this connection.
            stop.set()
            writer.join()
        return result

    def write_file(
        self, path: str, data: bytes, mode: int = 0o644, uid: int | None = None, gid: int | None = None
    ) -> None:
        """Writes ``data`` to the absolute ``path`` atomically (temporary file, then rename)."""
        self._begin()
        self._send(WRITE_FILE, _encode([(1, os.fsencode(path)), (2, mode), (3, uid), (4, gid)]))
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            self._send(FILE_DATA, bytes(view[start : start + CHUNK]))
        self._send(FILE_END)
        kind, payload = self._recv_frame()
        if kind != OK:
            self._unexpected(kind, payload, "in reply to write_file")

    def read_file(self, path: str) -> bytes:
        """The content of the absolute ``path``. Raises :class:`AgentRequestError` (with the errno)."""
        self._begin()
        self._send(READ_FILE, _encode([(1, os.fsencode(path))]))
        data = bytearray()
        while True:
            kind, payload = self._recv_frame()
            if kind == DATA:
                data += payload
            elif kind == END:
                return bytes(data)
            else:
                self._unexpected(kind, payload, "in reply to read_file")

    def sync(self, time_ns: int | None = None, entropy: bytes | None = None) -> SyncResult:
        """Sets the guest's wall clock and adds entropy to its kernel's random pool.

        Meant for a VM restored from a memory snapshot, whose clock lags and whose random state is
        shared with every other clone of the snapshot. ``time_ns`` (Unix time in ns) defaults to
        :func:`time.time_ns`, ``entropy`` (at most :data:`MAX_SYNC_ENTROPY` bytes) to 64 bytes of
        :func:`os.urandom`. An agent outside a VM changes nothing and says so in the result.
        Raises :class:`AgentRequestError` when the agent refuses the values or a system call
        fails, and :class:`ProtocolError` from an agent too old to know ``sync`` (it closes the
        connection).
        """
        self._begin()
        if time_ns is None:
            time_ns = time.time_ns()
        if entropy is None:
            entropy = os.urandom(64)
        if not 0 <= time_ns < 1 << 64:
            raise AgentError(f"time_ns must be a Unix time in ns between 0 and 2**64 - 1, got {time_ns}")
        self._send(SYNC, _encode([(1, time_ns), (2, entropy)]))
        kind, payload = self._recv_frame()
        if kind != OK:
            self._unexpected(kind, payload, "in reply to sync")
        fields = _decode(payload)
        return SyncResult(
            clock_set=bool(_uint(fields, 1)),
            entropy_added=_uint(fields, 2) or 0,
            guest_time_ns=_uint(fields, 3) or 0,
        )

    def shutdown(self, action: Literal["poweroff", "reboot"] = "poweroff") -> None:
        """Stops the VM (or, for an agent outside a VM, the agent). The connection is closed after."""
        self._begin()
        self._send(SHUTDOWN, _encode([(1, action.encode())]))
        kind, payload = self._recv_frame()
        if kind != OK:
            self._unexpected(kind, payload, "in reply to shutdown")
        self.close()


def connect_unix(path: str | Path, timeout: float | None = None) -> AgentClient:
    """Connects to an agent listening on a Unix socket (``supermachine-agent --listen unix:PATH``).

    With ``timeout``, keeps retrying while the socket is missing or refuses connections.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.01
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(path))
        except OSError as e:
            sock.close()
            if deadline is None or time.monotonic() >= deadline:
                raise AgentUnreachable(f"cannot connect to the agent at {path}: {e.strerror or e}") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
            continue
        return AgentClient(sock)


def _read_line(sock: socket.socket, limit: int = 128) -> bytes:
    """One line, read byte by byte so nothing after it (the agent's hello) is consumed."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            raise ConnectionResetError("closed before the handshake reply")
        line += byte
        if len(line) > limit:
            raise ConnectionError("handshake reply too long")
    return bytes(line)


def connect_vsock_uds(path: str | Path, port: int = DEFAULT_PORT, timeout: float = 10.0) -> AgentClient:
    """Connects to the agent in a VM through the VMM's vsock Unix socket.

    Performs the ``CONNECT <port>\\n`` / ``OK <n>\\n`` handshake, then the protocol hello; retries
    until ``timeout`` seconds have passed (the agent may still be starting), then raises
    :class:`AgentUnreachable` naming the last failure.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    last = "no attempt made"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AgentUnreachable(f"no agent on vsock port {port} via {path} within {timeout:g} s: {last}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(remaining)
        try:
            sock.connect(os.fspath(path))
            sock.sendall(f"CONNECT {port}\n".encode())
            reply = _read_line(sock)
            if not reply.startswith(b"OK "):
                raise ConnectionRefusedError(f"VMM answered {reply.decode('ascii', 'replace').strip()!r}")
            client = AgentClient(sock)
        except (OSError, AgentUnreachable) as e:
            sock.close()
            last = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.2)
            continue
        sock.settimeout(None)
        return client
