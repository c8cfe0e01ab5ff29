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
import io
import ipaddress
import math
import os
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, NoReturn

from supermachine.errors import (
    AgentError,
    AgentRequestError,
    AgentTimeoutError,
    AgentUnreachable,
    OutputLimitError,
    ProtocolError,
)

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_PORT",
    "EXEC_GRACE",
    "MAX_LIST_ENTRIES",
    "MAX_OUTPUT",
    "MAX_READ",
    "PROTOCOL_VERSION",
    "REQUEST_TIMEOUT",
    "AgentClient",
    "ArchiveStream",
    "ChangeStream",
    "ExecResult",
    "GuestDirEntry",
    "GuestStat",
    "NetworkResult",
    "Output",
    "Process",
    "SyncResult",
    "TcpRelayResult",
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

# Every wait on the guest has a deadline: the guest is untrusted and may answer slowly or never.
#: Seconds to connect, pass the VMM's ``CONNECT`` handshake and exchange hellos.
CONNECT_TIMEOUT = 10.0
#: Default seconds of every request that is not a running command: ``ping``, ``sync``,
#: ``shutdown``, ``read_file``, ``write_file`` and the start of an ``exec``.
REQUEST_TIMEOUT = 60.0
#: Seconds the host waits past a command's ``timeout`` for the agent to report its end. The agent
#: kills the command at the timeout; the grace covers the kill, output still in flight and slow
#: guests: on hosts that emulate guest kernel code, tearing down a process group on a cold path
#: was measured at 20 s. An agent silent beyond it is stuck or hostile: the host gives up.
EXEC_GRACE = 30.0
#: Default limit, in bytes, of each output stream (stdout, stderr) that ``exec`` collects.
MAX_OUTPUT = 64 << 20
#: Default limit, in bytes, of a file that ``read_file`` reads.
MAX_READ = 64 << 20
#: Default limit of the entries ``list_dir`` accepts for one directory.
MAX_LIST_ENTRIES = 100_000
#: Most characters of text (error messages, versions) taken from the agent.
MAX_TEXT = 500
#: Bytes asked of the socket per read.
_RECV_SIZE = 256 * 1024

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
NET = 0x0C
TCP_CONNECT = 0x0D
CHANGES = 0x0E
PUT_ARCHIVE = 0x0F
STAT = 0x10
REMOVE = 0x11
LIST_DIR = 0x12
GET_ARCHIVE = 0x13
RESIZE = 0x14
MOUNT = 0x15
UNMOUNT = 0x16
# Agent to client.
STARTED = 0x81
STDOUT = 0x82
STDERR = 0x83
EXIT = 0x84
DATA = 0x85
END = 0x86
PONG = 0x87
OK = 0x88
ENTRY = 0x89
ERROR = 0x8F

#: Most entropy one ``sync`` request may carry (the agent refuses more).
MAX_SYNC_ENTROPY = 512
#: Limits of a ``net`` request (the agent refuses more).
MAX_NET_DNS = 3
MAX_NET_HOSTS = 64
MAX_NET_HOSTS_ENTRY = 255
MAX_NET_HOSTNAME = 64
#: A DNS host name (RFC 1123): dot-separated labels of letters, digits and inner hyphens.
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*", re.ASCII)
#: Highest signal number an ``exit`` may report (Linux real-time signals end at 64).
_MAX_SIGNAL = 64
_SIGKILL = 9

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
    """Decodes a field-encoded message. Unknown tags are kept (and ignored by callers).

    Every length and count is checked against the bytes that are left before anything is
    allocated for it, so a message never costs more than a small multiple of its own size.
    """
    fields: dict[int, FieldValue] = {}
    end = len(payload)
    pos = 0
    try:
        while pos < end:
            tag, kind = payload[pos], payload[pos + 1]
            pos += 2
            if tag in fields:
                raise ProtocolError(f"agent sent field {tag} twice in one message")
            if kind == _UINT:
                (number,) = struct.unpack_from("<Q", payload, pos)
                fields[tag] = int(number)
                pos += 8
            elif kind == _BYTES:
                (length,) = struct.unpack_from("<I", payload, pos)
                pos += 4
                if length > end - pos:
                    raise ProtocolError("agent sent a truncated field")
                fields[tag] = payload[pos : pos + length]
                pos += length
            elif kind == _LIST:
                (count,) = struct.unpack_from("<I", payload, pos)
                pos += 4
                if count > (end - pos) // 4:
                    raise ProtocolError(f"agent sent a list of {count} items in {end - pos} bytes")
                items: list[bytes] = []
                for _ in range(count):
                    (length,) = struct.unpack_from("<I", payload, pos)
                    pos += 4
                    if length > end - pos:
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


def printable_line(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` from the guest made safe to show: one line, no control characters (no terminal
    escape sequences), at most ``limit`` characters."""
    shown = " ".join("".join(c if c.isprintable() else " " for c in text[: limit * 2]).split())
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def _text(fields: Mapping[int, FieldValue], tag: int) -> str:
    value = fields.get(tag)
    if not isinstance(value, bytes):
        return ""
    return printable_line(value[: MAX_TEXT * 4].decode("utf-8", "replace"))


def _bytes_arg(value: Argument) -> bytes:
    return value if isinstance(value, bytes) else os.fsencode(value)


def _shown(argv: Sequence[Argument]) -> str:
    """The command for messages: quoted, shortened."""
    text = " ".join(os.fsdecode(a) for a in argv)
    return repr(text if len(text) <= 80 else text[:79] + "…")


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB" if size >= 1 << 20 else f"{size} bytes"


@dataclass(frozen=True)
class _Deadline:
    """When the host stops waiting (``time.monotonic``); ``seconds`` is the budget, for messages."""

    at: float
    seconds: float

    @classmethod
    def after(cls, seconds: float) -> _Deadline:
        return cls(time.monotonic() + seconds, seconds)

    @classmethod
    def at_time(cls, at: float) -> _Deadline:
        return cls(at, max(0.0, at - time.monotonic()))

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def earliest(self, other: _Deadline | None) -> _Deadline:
        return self if other is None or self.at <= other.at else other


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


@dataclass(frozen=True)
class TcpRelayResult:
    """What one relayed TCP connection carried (see :meth:`AgentClient.relay_tcp`)."""

    to_guest: int
    """Bytes from the host peer written towards the guest socket."""
    from_guest: int
    """Bytes the guest socket sent to the host peer."""


@dataclass(frozen=True)
class NetworkResult:
    """What a ``net`` request configured in the guest."""

    interface: str
    """Name of the guest's network interface that was configured (e.g. ``eth0``)."""
    reset: int
    """TCP connections destroyed (``reset_connections``; 0 otherwise)."""


def _host_name(name: str, what: str) -> str:
    if not isinstance(name, str) or len(name) > 253 or not _HOST_NAME.fullmatch(name):
        raise AgentError(f"{what} {name!r} is not a valid host name")
    return name


def _ipv4(value: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except (ipaddress.AddressValueError, ValueError, TypeError):
        raise AgentError(f"{what} {value!r} is not an IPv4 address") from None


def _mac(value: str) -> bytes:
    parts = value.split(":") if isinstance(value, str) else []
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9A-Fa-f]{2}", p, re.ASCII) for p in parts):
        raise AgentError(f"mac {value!r} is not a MAC address like 02:00:00:00:00:01")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise AgentError(f"mac {value} is a multicast address; the interface needs a unicast one")
    if mac == bytes(6):
        raise AgentError(f"mac {value} is not an interface address")
    return mac


def _host_address(address: ipaddress.IPv4Address, what: str, network: ipaddress.IPv4Network) -> None:
    """``address`` must be a host of ``network``: inside it, not its network or broadcast address."""
    if address not in network:
        raise AgentError(f"{what} {address} is outside {network}")
    if address in (network.network_address, network.broadcast_address):
        raise AgentError(f"{what} {address} is the network or broadcast address of {network}")


def _unicast(address: ipaddress.IPv4Address, what: str, *, loopback_ok: bool = False) -> None:
    first = address.packed[0]
    if first == 0 or first >= 224 or (first == 127 and not loopback_ok):
        raise AgentError(f"{what} {address} is not a unicast host address")


def _hosts_entries(hosts: Mapping[str, Sequence[str]]) -> list[bytes]:
    if len(hosts) > MAX_NET_HOSTS:
        raise AgentError(f"hosts has {len(hosts)} entries; at most {MAX_NET_HOSTS} are allowed")
    entries = []
    for address, names in hosts.items():
        ip = _ipv4(address, "hosts address")
        if isinstance(names, str) or not names:
            raise AgentError(f"hosts entry {address}: names must be a non-empty sequence of host names")
        entry = " ".join([str(ip), *(_host_name(n, "hosts name") for n in names)])
        if len(entry) > MAX_NET_HOSTS_ENTRY:
            raise AgentError(
                f"hosts entry {address} has {len(entry)} bytes; at most {MAX_NET_HOSTS_ENTRY} are allowed"
            )
        entries.append(entry.encode())
    return entries


class Process:
    """A process started with :meth:`AgentClient.spawn`; owns the connection until it has exited.

    Iterate over it for :class:`Output` events as they arrive (unbounded: the caller decides what
    to keep); :meth:`wait` collects whatever output was not iterated over, up to a limit, and
    returns the :class:`ExecResult`. When the spawn had a ``timeout``, neither waits past it plus
    :data:`EXEC_GRACE`.
    """

    def __init__(
        self,
        client: AgentClient,
        pid: int,
        stdin: bool,
        *,
        deadline: _Deadline | None = None,
        command: str = "the command",
        waiting: str | None = None,
    ) -> None:
        self._client = client
        self.pid = pid
        self._stdin_open = stdin
        self._result: ExecResult | None = None
        self._deadline = deadline
        self._command = command
        self._waiting = waiting or f"waiting for {command} to end"

    @property
    def result(self) -> ExecResult | None:
        """The result once the process has exited and its exit was read, else ``None``."""
        return self._result

    def _next_event(self) -> Output | ExecResult:
        """The next output chunk, or the exit (an :class:`ExecResult` without output)."""
        client = self._client
        kind, payload = client._recv_frame(self._deadline, self._waiting)
        if kind == STDOUT:
            return Output("stdout", payload)
        if kind == STDERR:
            return Output("stderr", payload)
        if kind == EXIT:
            result = client._exit_result(payload)
            client._busy = False
            return result
        client._unexpected(kind, payload, "while a process runs")

    def __iter__(self) -> Iterator[Output]:
        while self._result is None:
            event = self._next_event()
            if isinstance(event, Output):
                yield event
            else:
                self._result = event

    def wait(self, max_output: int | None = MAX_OUTPUT) -> ExecResult:
        """Reads the remaining output and the exit; returns the result (again, if already known).

        Each stream keeps at most ``max_output`` bytes (``None``: no limit). Past it the process
        is killed, the connection closed and :class:`OutputLimitError` raised with the output
        collected up to the limit.
        """
        if self._result is not None:
            return self._result
        collected: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        while True:
            event = self._next_event()
            if isinstance(event, ExecResult):
                self._result = replace(
                    event, stdout=bytes(collected["stdout"]), stderr=bytes(collected["stderr"])
                )
                return self._result
            buffer = collected[event.stream]
            if max_output is not None and len(buffer) + len(event.data) > max_output:
                buffer += event.data[: max_output - len(buffer)]
                self._client._kill_and_close()
                raise OutputLimitError(
                    f"{event.stream} of {self._command} exceeded the limit of {_mib(max_output)} "
                    "(max_output); the command was killed",
                    limit=max_output,
                    stdout=bytes(collected["stdout"]),
                    stderr=bytes(collected["stderr"]),
                )
            buffer += event.data

    def write_stdin(self, data: bytes) -> None:
        """Sends ``data`` to the process's stdin (ignored by the agent once the process has exited)."""
        if not self._stdin_open:
            raise AgentError("stdin is closed or was not requested (spawn(..., stdin=True))")
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            self._client._send(STDIN, bytes(view[start : start + CHUNK]), self._deadline, "sending stdin")

    def close_stdin(self) -> None:
        """Closes the process's stdin once everything sent before has been written to it."""
        if self._stdin_open:
            self._stdin_open = False
            self._client._send(STDIN_CLOSE, b"", self._deadline, "closing stdin")

    def signal(self, sig: int) -> None:
        """Sends ``sig`` to the process's process group (it runs in a session of its own)."""
        if self._result is None:
            self._client._send(SIGNAL, _encode([(1, int(sig))]), self._deadline, "sending a signal")

    def resize(self, rows: int, cols: int) -> None:
        """Sets the size of the process's terminal (``spawn(..., tty=True)``); the guest kernel
        tells its foreground process group with SIGWINCH. Ignored for a process without one."""
        _check_tty_size(rows, cols)
        if self._result is None:
            self._client._send(
                RESIZE, _encode([(1, rows), (2, cols)]), self._deadline, "resizing the terminal"
            )


def _check_tty_size(rows: int, cols: int) -> None:
    if not (1 <= rows <= 0xFFFF and 1 <= cols <= 0xFFFF):
        raise AgentError(f"a terminal size is rows and columns of 1 to 65535, got {rows}x{cols}")


_STAT_TYPES = ("file", "dir", "symlink", "hardlink", "whiteout", "char", "block", "fifo", "socket")


@dataclass(frozen=True)
class GuestStat:
    """What a path in the guest is (:meth:`AgentClient.stat`)."""

    type: str
    """``file``, ``dir``, ``symlink``, ``char``, ``block``, ``fifo`` or ``socket``."""
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    link: str | None = None
    """A symbolic link's target."""


@dataclass(frozen=True, kw_only=True)
class GuestDirEntry(GuestStat):
    """One entry of a guest directory (:meth:`AgentClient.list_dir`): its name and what it is
    (``lstat``: a link is described, not its target)."""

    name: str


class ArchiveStream(io.RawIOBase):
    """The tar stream of one ``get_archive`` reply, read as a file (see
    :meth:`AgentClient.get_archive`). Reading past ``max_bytes`` raises
    :class:`OutputLimitError`; an error the agent reports midway raises
    :class:`AgentRequestError`. Closing it before the end closes the connection, which stops the
    agent."""

    def __init__(self, client: AgentClient, path: str, max_bytes: int | None, deadline: _Deadline) -> None:
        super().__init__()
        self._client = client
        self._path = path
        self._max_bytes = max_bytes
        self._deadline = deadline
        self._chunk = b""
        self._at = 0
        self.received = 0
        self.finished = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while self._at >= len(self._chunk):
            if self.finished:
                return 0
            self._next_chunk()
        n = min(len(view), len(self._chunk) - self._at)
        view[:n] = self._chunk[self._at : self._at + n]
        self._at += n
        return n

    def _next_chunk(self) -> None:
        client = self._client
        kind, payload = client._recv_frame(self._deadline, f"reading the archive of {self._path}")
        if kind == DATA:
            self.received += len(payload)
            if self._max_bytes is not None and self.received > self._max_bytes:
                client.close()  # the agent stops sending when the connection goes
                raise OutputLimitError(
                    f"the archive of {self._path} is larger than the limit of {_mib(self._max_bytes)}"
                    " (max_bytes); copying stopped",
                    limit=self._max_bytes,
                )
            self._chunk, self._at = payload, 0
        elif kind == END:
            size = _uint(client._fields(payload), 1)
            if size != self.received:
                raise client._violation(f"agent said it sent {size} archive bytes but sent {self.received}")
            self.finished = True
        else:
            self.finished = kind == ERROR  # a reported error leaves the connection usable
            client._unexpected(kind, payload, "in reply to get_archive")

    def close(self) -> None:
        if not self.finished and not self.closed:
            self._client.close()
        super().close()


class ChangeStream:
    """The frames of one ``changes`` reply (see :meth:`AgentClient.changes`); iterate it once."""

    def __init__(self, client: AgentClient, with_data: bool, deadline: _Deadline) -> None:
        self._client = client
        self._with_data = with_data
        self._deadline = deadline
        self.count: int | None = None
        """Entries the agent says it sent (once the stream ended)."""
        self.mark: int | None = None
        """The mark the agent kept for this walk (once the stream ended, if asked to keep one)."""

    def __iter__(self) -> Iterator[dict[int, FieldValue] | bytes]:
        client = self._client
        finished = False
        try:
            while True:
                kind, payload = client._recv_frame(self._deadline, "reading the changes")
                if kind == ENTRY:
                    yield client._fields(payload)
                elif kind == DATA and self._with_data:
                    yield payload
                elif kind == END:
                    fields = client._fields(payload)
                    self.count, self.mark = _uint(fields, 1), _uint(fields, 2)
                    finished = True
                    return
                else:
                    # A non-fatal error ends the reply and leaves the connection usable.
                    finished = kind == ERROR
                    client._unexpected(kind, payload, "in reply to changes")
        finally:
            if not finished:
                client.close()


class AgentClient:
    """A connection to a guest agent. Sends the hello and checks the agent's on construction.

    Every wait on the agent has a deadline: the hello ``timeout``; ``request_timeout`` (seconds,
    changeable) for ``ping``, ``sync``, ``shutdown``, file transfers without a ``timeout`` of their
    own and the start of a command; a command's ``timeout`` plus :data:`EXEC_GRACE` for the rest
    of it (a command without a timeout may run, silent, as long as it likes).

    Raises :class:`AgentUnreachable` when the connection breaks, :class:`AgentTimeoutError` when a
    deadline passes, :class:`ProtocolError` when the agent says something that is not protocol (each
    of them closes the connection), :class:`OutputLimitError` when it sends more than the call's
    size limit, and :class:`AgentRequestError` when it refuses a request (the connection then
    stays usable).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float = CONNECT_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        _initial: bytes = b"",
    ) -> None:
        self._sock = sock
        self._buf = bytearray(_initial)
        self._send_lock = threading.Lock()
        # Guards _closed and _users: the socket is closed only when no thread waits on it, so a
        # waiting thread never polls a descriptor number that was closed (and maybe reused).
        self._state_lock = threading.Lock()
        self._users = 0
        self._busy = False
        self._closed = False
        self.request_timeout = request_timeout
        try:
            sock.setblocking(False)
            self._hello(_Deadline.after(timeout))
        except BaseException:
            self.close()
            raise

    def _hello(self, deadline: _Deadline) -> None:
        self._send_raw(HELLO, deadline, "sending the hello")
        hello = self._recv_exact(len(HELLO), deadline, "reading the agent's hello")
        if hello[:4] != MAGIC:
            raise self._violation(f"peer is not a supermachine agent (hello {hello[:8]!r})")
        (version,) = struct.unpack_from("<H", hello, 4)
        if version != PROTOCOL_VERSION:
            raise self._violation(
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
        """Closes the connection; a thread blocked on it wakes up with :class:`AgentUnreachable`."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            if self._users:
                return  # the last user closes it
        self._sock.close()

    @contextlib.contextmanager
    def _socket_in_use(self) -> Iterator[socket.socket]:
        with self._state_lock:
            if self._closed:
                raise AgentUnreachable("connection to the agent is closed")
            self._users += 1
        try:
            yield self._sock
        finally:
            with self._state_lock:
                self._users -= 1
                last = self._closed and not self._users
            if last:
                self._sock.close()

    def _broken(self, what: str) -> AgentUnreachable:
        self.close()
        return AgentUnreachable(f"connection to the agent broke {what}")

    def _violation(self, message: str) -> ProtocolError:
        self.close()
        return ProtocolError(message)

    def _timed_out(self, deadline: _Deadline, what: str) -> AgentTimeoutError:
        self.close()
        return AgentTimeoutError(f"the agent did not answer within {round(deadline.seconds, 2):g} s ({what})")

    def _wait_ready(self, sock: socket.socket, event: int, deadline: _Deadline | None, what: str) -> None:
        """Blocks until ``sock`` is ready for ``event`` (or failed); raises once ``deadline`` passed."""
        poller = select.poll()
        poller.register(sock, event)
        while True:
            wait_ms = None
            if deadline is not None:
                remaining = deadline.remaining()
                if remaining <= 0:
                    raise self._timed_out(deadline, what)
                wait_ms = math.ceil(remaining * 1000)
            if poller.poll(wait_ms):
                return

    def _send_raw(self, data: bytes, deadline: _Deadline | None, what: str) -> None:
        with self._send_lock, self._socket_in_use() as sock:
            view = memoryview(data)
            while view:
                self._wait_ready(sock, select.POLLOUT, deadline, what)
                try:
                    sent = sock.send(view)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:
                    raise self._broken(f"while {what} ({e.strerror or e})") from None
                view = view[sent:]

    def _send(
        self,
        kind: int,
        payload: bytes = b"",
        deadline: _Deadline | None = None,
        what: str = "sending a frame",
    ) -> None:
        if len(payload) + 1 > MAX_FRAME:
            raise AgentError(f"frame of {len(payload) + 1} bytes exceeds the limit of {MAX_FRAME} bytes")
        self._send_raw(struct.pack("<IB", len(payload) + 1, kind) + payload, deadline, what)

    def _recv_exact(self, n: int, deadline: _Deadline | None, what: str) -> bytes:
        while len(self._buf) < n:
            with self._socket_in_use() as sock:
                self._wait_ready(sock, select.POLLIN, deadline, what)
                try:
                    # Never more than a chunk at a time: memory follows what the agent really
                    # sent, not what a frame header announced.
                    chunk = sock.recv(_RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:
                    raise self._broken(f"while {what} ({e.strerror or e})") from None
            if not chunk:
                if self._closed:  # by another thread of ours, e.g. on its timeout
                    raise AgentUnreachable(f"connection to the agent was closed while {what}")
                raise self._broken(f"(closed by the agent while {what})")
            self._buf += chunk
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _recv_frame(
        self, deadline: _Deadline | None = None, what: str = "reading a frame"
    ) -> tuple[int, bytes]:
        """One frame. Its length is checked before anything is read (or allocated) for it."""
        length, kind = struct.unpack("<IB", self._recv_exact(5, deadline, what))
        if length == 0 or length > MAX_FRAME:
            raise self._violation(f"agent sent a frame of {length} bytes (limit {MAX_FRAME})")
        return kind, self._recv_exact(length - 1, deadline, what)

    def _fields(self, payload: bytes) -> dict[int, FieldValue]:
        try:
            return _decode(payload)
        except ProtocolError:
            self.close()
            raise

    def _exit_result(self, payload: bytes) -> ExecResult:
        """The ``exit`` message as a result without output; refuses impossible values."""
        fields = self._fields(payload)
        status, signal = _uint(fields, 1), _uint(fields, 2)
        if (status is None) == (signal is None):
            raise self._violation("agent sent an exit with neither or both of status and signal")
        if status is not None and status > 255:
            raise self._violation(f"agent sent exit status {status} (beyond 255)")
        if signal is not None and not 1 <= signal <= _MAX_SIGNAL:
            raise self._violation(f"agent sent exit signal {signal} (not 1 to {_MAX_SIGNAL})")
        return ExecResult(
            status=status,
            signal=signal,
            stdout=b"",
            stderr=b"",
            duration=(_uint(fields, 4) or 0) / 1000,
            timed_out=bool(_uint(fields, 3)),
        )

    def _unexpected(self, kind: int, payload: bytes, when: str) -> NoReturn:
        """Raises for an error frame (as a request error unless fatal) or an unexpected frame."""
        if kind == ERROR:
            fields = self._fields(payload)
            message = _text(fields, 3) or "unspecified error"
            if _uint(fields, 4):
                raise self._violation(f"agent closed the connection: {message}")
            self._busy = False
            raise AgentRequestError(message, kind=_text(fields, 1) or "request", errno=_uint(fields, 2))
        raise self._violation(f"agent sent an unexpected frame of type 0x{kind:02x} {when}")

    def _kill_and_close(self) -> None:
        """Stops the running command: SIGKILL if the connection is free to send it at once, then
        the disconnect, on which the agent kills the process group anyway."""
        frame = struct.pack("<IB", 11, SIGNAL) + _encode([(1, _SIGKILL)])
        if self._send_lock.acquire(blocking=False):
            try:
                with self._socket_in_use() as sock, contextlib.suppress(OSError):
                    sock.send(frame)
            except AgentUnreachable:
                pass
            finally:
                self._send_lock.release()
        self.close()

    def _begin(self) -> None:
        if self._closed:
            raise AgentUnreachable("connection to the agent is closed")
        if self._busy:
            raise AgentError("connection busy: a process started with spawn() has not been waited for")

    def _request(self, kind: int, payload: bytes, reply: int, name: str, deadline: _Deadline) -> bytes:
        """Sends a one-frame request and returns the payload of its one-frame ``reply``."""
        self._begin()
        self._send(kind, payload, deadline, f"sending {name}")
        got, answer = self._recv_frame(deadline, f"waiting for the reply to {name}")
        if got != reply:
            self._unexpected(got, answer, f"in reply to {name}")
        return answer

    # -- requests ---------------------------------------------------------------------------------

    def ping(self) -> str:
        """Round trip; returns the agent's version."""
        pong = self._request(PING, b"", PONG, "ping", _Deadline.after(self.request_timeout))
        return _text(self._fields(pong), 1)

    def spawn(
        self,
        argv: Sequence[Argument],
        env: Mapping[str, str] | None = None,
        cwd: Argument | None = None,
        user: str | int | None = None,
        stdin: bool = False,
        timeout: float | None = None,
        *,
        deadline: float | None = None,
        keep_background: bool = False,
        pids_max: int | None = None,
        tty: bool = False,
        tty_size: tuple[int, int] | None = None,
    ) -> Process:
        """Starts a process and returns as soon as it runs.

        ``env`` replaces the whole environment (default: ``PATH`` and ``HOME``); ``cwd`` defaults to
        ``/``; ``user`` is ``name``, ``uid``, ``name:group`` or ``uid:gid`` (default: the agent's
        own, root in a VM); with ``stdin`` false the process reads ``/dev/null``. After ``timeout``
        seconds the agent kills the process group and reports ``timed_out``; the host waits for
        that report until ``timeout`` + :data:`EXEC_GRACE` from now, or until ``deadline`` (a
        :func:`time.monotonic` value) if given, then raises :class:`AgentTimeoutError`. When the
        process exits the agent kills every process it left behind unless ``keep_background``;
        ``pids_max`` bounds its process tree (agent default 1024, 0: no limit of its own). A program
        that is not found or not executable exits with status 127 or 126 (and a line on stderr);
        other start failures (bad ``cwd``, unknown ``user``) raise :class:`AgentRequestError`.

        With ``tty`` the process runs on a new pseudo-terminal of ``tty_size`` (rows, columns;
        default 24x80) as its stdin, stdout and stderr and its controlling terminal: its output
        comes as ``stdout`` only, bytes written to its stdin are what a keyboard types (``\x03``
        interrupts the foreground job), and :meth:`Process.resize` changes the size.
        """
        self._begin()
        if tty_size is not None:
            _check_tty_size(*tty_size)
        if not argv:
            raise AgentError("exec needs a non-empty argv")
        if timeout is not None and timeout <= 0:
            raise AgentError(f"timeout must be positive, got {timeout}")
        if pids_max is not None and pids_max < 0:
            raise AgentError(f"pids_max must not be negative, got {pids_max}")
        shown = _shown(argv)
        end: _Deadline | None = None
        waiting = None
        if deadline is not None:
            end = _Deadline.at_time(deadline)
        elif timeout is not None:
            end = _Deadline.after(timeout + EXEC_GRACE)
        if timeout is not None:
            waiting = f"waiting for {shown} to end; its timeout was {timeout:g} s"
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
                (9, 1 if tty else None),
                (10, tty_size[0] if tty and tty_size else None),
                (11, tty_size[1] if tty and tty_size else None),
            ]
        )
        start = _Deadline.after(self.request_timeout).earliest(end)
        self._send(EXEC, payload, start, f"sending the request to run {shown}")
        kind, reply = self._recv_frame(start, f"waiting for {shown} to start")
        if kind != STARTED:
            self._unexpected(kind, reply, "in reply to exec")
        pid = _uint(self._fields(reply), 1) or 0
        self._busy = True
        return Process(self, pid, stdin, deadline=end, command=shown, waiting=waiting)

    def exec(
        self,
        argv: Sequence[Argument],
        env: Mapping[str, str] | None = None,
        cwd: Argument | None = None,
        user: str | int | None = None,
        input: bytes | None = None,
        timeout: float | None = None,
        *,
        max_output: int | None = MAX_OUTPUT,
        deadline: float | None = None,
        keep_background: bool = False,
        pids_max: int | None = None,
    ) -> ExecResult:
        """Runs a process to completion and returns its output and exit (see :meth:`spawn`).

        ``input`` is written to its stdin (then closed) while its output is read. A timeout is
        reported in the result (``timed_out``), not raised; an agent that does not report the end
        in time raises :class:`AgentTimeoutError`. Each of stdout and stderr keeps at most
        ``max_output`` bytes (default :data:`MAX_OUTPUT`, ``None``: no limit); past it the process
        is killed and :class:`OutputLimitError` raised, holding the output up to the limit.
        """
        process = self.spawn(
            argv,
            env=env,
            cwd=cwd,
            user=user,
            stdin=input is not None,
            timeout=timeout,
            deadline=deadline,
            keep_background=keep_background,
            pids_max=pids_max,
        )
        if input is None:
            return process.wait(max_output)
        stop = threading.Event()

        def feed() -> None:
            view = memoryview(input)
            # A failure here breaks the connection; the reader reports it.
            with contextlib.suppress(AgentError):
                for start in range(0, len(view), CHUNK):
                    if stop.is_set():
                        return
                    process.write_stdin(bytes(view[start : start + CHUNK]))
                if not stop.is_set():
                    process.close_stdin()

        writer = threading.Thread(target=feed, name="agent-stdin", daemon=True)
        writer.start()
        try:
            return process.wait(max_output)
        finally:
            # Stale stdin must not reach the next request on this connection.
            stop.set()
            writer.join(EXEC_GRACE)
            if writer.is_alive():
                # The agent stopped reading stdin: closing the connection wakes the writer.
                self.close()
                writer.join()

    def write_file(
        self,
        path: str,
        data: bytes,
        mode: int = 0o644,
        uid: int | None = None,
        gid: int | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Writes ``data`` to the absolute ``path`` atomically (temporary file, then rename).

        The whole transfer has ``timeout`` seconds (default: :attr:`request_timeout`).
        """
        self._begin()
        deadline = _Deadline.after(self.request_timeout if timeout is None else timeout)
        what = f"writing {path}"
        self._send(
            WRITE_FILE, _encode([(1, os.fsencode(path)), (2, mode), (3, uid), (4, gid)]), deadline, what
        )
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            self._send(FILE_DATA, bytes(view[start : start + CHUNK]), deadline, what)
        self._send(FILE_END, b"", deadline, what)
        kind, payload = self._recv_frame(deadline, f"waiting for the reply to writing {path}")
        if kind != OK:
            self._unexpected(kind, payload, "in reply to write_file")

    def stat(self, path: str, *, follow: bool = False, timeout: float | None = None) -> GuestStat:
        """What the absolute ``path`` is in the guest (``lstat``; ``follow``: ``stat``). Raises
        :class:`AgentRequestError` (``errno`` ENOENT for a missing path)."""
        deadline = _Deadline.after(self.request_timeout if timeout is None else timeout)
        payload = _encode([(1, os.fsencode(path)), (2, 1 if follow else None)])
        fields = self._fields(self._request(STAT, payload, OK, f"stat {path}", deadline))
        return GuestStat(**self._stat_values(fields, path))

    def _stat_values(self, fields: dict[int, FieldValue], path: str) -> dict[str, Any]:
        """The ``stat`` reply fields (also those of a ``list_dir`` entry), checked."""
        code = _uint(fields, 1)
        if code is None or code >= len(_STAT_TYPES):
            raise self._violation(f"agent sent file type {code!r} for {path}")
        link = fields.get(7)
        return {
            "type": _STAT_TYPES[code],
            "mode": (_uint(fields, 2) or 0) & 0o7777,
            "uid": _uint(fields, 3) or 0,
            "gid": _uint(fields, 4) or 0,
            "size": _uint(fields, 5) or 0,
            "mtime_ns": _uint(fields, 6) or 0,
            "link": os.fsdecode(link) if isinstance(link, bytes) else None,
        }

    def list_dir(
        self, path: str, *, max_entries: int = MAX_LIST_ENTRIES, timeout: float | None = None
    ) -> list[GuestDirEntry]:
        """The entries of the guest directory ``path``, sorted by name (``.`` and ``..`` left
        out). More than ``max_entries`` raises :class:`OutputLimitError`. Every name is checked:
        one path component, no NUL, at most 255 bytes, in strictly increasing order."""
        self._begin()
        deadline = _Deadline.after(self.request_timeout if timeout is None else timeout)
        self._send(LIST_DIR, _encode([(1, os.fsencode(path))]), deadline, f"listing {path}")
        entries: list[GuestDirEntry] = []
        previous = b""
        while True:
            kind, payload = self._recv_frame(deadline, f"listing {path}")
            if kind == ENTRY:
                fields = self._fields(payload)
                name = fields.get(8)
                if (
                    not isinstance(name, bytes)
                    or name in (b"", b".", b"..")
                    or b"/" in name
                    or b"\0" in name
                    or len(name) > 255
                    or name <= previous
                ):
                    raise self._violation(f"agent sent a bad or out-of-order entry name {name!r} in {path}")
                previous = name
                if len(entries) == max_entries:
                    self.close()
                    raise OutputLimitError(
                        f"{path} has more than {max_entries} entries (max_entries); listing stopped",
                        limit=max_entries,
                    )
                entries.append(GuestDirEntry(**self._stat_values(fields, path), name=os.fsdecode(name)))
            elif kind == END:
                count = _uint(self._fields(payload), 1)
                if count != len(entries):
                    raise self._violation(f"agent said it listed {count} entries but sent {len(entries)}")
                return entries
            else:
                self._unexpected(kind, payload, "in reply to list_dir")

    def get_archive(
        self, path: str, *, max_bytes: int | None = None, timeout: float | None = None
    ) -> ArchiveStream:
        """Asks for a tar stream of the guest ``path`` (a file, or a directory and all in it; see
        PROTOCOL.md) and returns it as a file to read within ``timeout`` seconds (default:
        :attr:`request_timeout`). The stream is the guest's: unpack it as hostile input."""
        self._begin()
        deadline = _Deadline.after(self.request_timeout if timeout is None else timeout)
        self._send(GET_ARCHIVE, _encode([(1, os.fsencode(path))]), deadline, f"asking for {path}")
        return ArchiveStream(self, path, max_bytes, deadline)

    def mount(
        self,
        device: str,
        target: str,
        *,
        fstype: str = "ext4",
        read_only: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Mounts the guest's virtio disk ``device`` (``/dev/vdX``), or with ``fstype="virtiofs"``
        the shared folder whose tag is ``device``, at the absolute ``target`` (made with its
        parents when missing), ``nosuid,nodev``, read-only if asked."""
        deadline = _Deadline.after(self.request_timeout if timeout is None else timeout)
        payload = _encode(
            [
                (1, device.encode()),
                (2, os.fsencode(target)),
                (3, fstype.encode()),
                (4, 1 if read_only else None),
            ]
        )
        self._request(MOUNT, payload, OK, f"mount {device} on {target}", deadline)

    def unmount(self, target: str, *, timeout: float | None = None) -> None:
        """Syncs and unmounts what :meth:`mount` mounted at ``target`` (EBUSY while in use)."""
        deadline = _Deadline.after(self.request_timeout if timeout is None else timeout)
        self._request(UNMOUNT, _encode([(2, os.fsencode(target))]), OK, f"unmount {target}", deadline)

    def remove(self, path: str, *, recursive: bool = False, timeout: float | None = None) -> None:
        """Removes the absolute ``path`` in the guest: a file, link or empty directory, or with
        ``recursive`` a whole tree (links inside are removed, not followed)."""
        deadline = _Deadline.after(self.request_timeout if timeout is None else timeout)
        payload = _encode([(1, os.fsencode(path)), (2, 1 if recursive else None)])
        self._request(REMOVE, payload, OK, f"remove {path}", deadline)

    def put_archive(self, directory: str, archive: bytes | BinaryIO, *, timeout: float | None = None) -> int:
        """Unpacks the tar stream ``archive`` (bytes or a binary file read to its end) into the
        guest's absolute ``directory``, keeping modes, owners, times and extended attributes.
        Returns the number of entries. The whole transfer has ``timeout`` seconds (default:
        :attr:`request_timeout`)."""
        self._begin()
        deadline = _Deadline.after(self.request_timeout if timeout is None else timeout)
        what = f"unpacking an archive into {directory}"
        self._send(PUT_ARCHIVE, _encode([(1, os.fsencode(directory))]), deadline, what)
        if isinstance(archive, bytes):
            view = memoryview(archive)
            for start in range(0, len(view), CHUNK):
                self._send(FILE_DATA, bytes(view[start : start + CHUNK]), deadline, what)
        else:
            while chunk := archive.read(CHUNK):
                self._send(FILE_DATA, chunk, deadline, what)
        self._send(FILE_END, b"", deadline, what)
        kind, payload = self._recv_frame(deadline, f"waiting for the reply to {what}")
        if kind != OK:
            self._unexpected(kind, payload, "in reply to put_archive")
        return _uint(self._fields(payload), 2) or 0

    def read_file(
        self, path: str, *, max_bytes: int | None = MAX_READ, timeout: float | None = None
    ) -> bytes:
        """The content of the absolute ``path``. Raises :class:`AgentRequestError` (with the errno).

        A file larger than ``max_bytes`` (default :data:`MAX_READ`, ``None``: no limit) raises
        :class:`OutputLimitError`; the whole transfer has ``timeout`` seconds (default:
        :attr:`request_timeout`).
        """
        self._begin()
        deadline = _Deadline.after(self.request_timeout if timeout is None else timeout)
        self._send(READ_FILE, _encode([(1, os.fsencode(path))]), deadline, f"asking for {path}")
        data = bytearray()
        while True:
            kind, payload = self._recv_frame(deadline, f"reading {path}")
            if kind == DATA:
                if max_bytes is not None and len(data) + len(payload) > max_bytes:
                    self.close()  # the agent stops sending when the connection goes
                    raise OutputLimitError(
                        f"{path} is larger than the limit of {_mib(max_bytes)} (max_bytes); reading stopped",
                        limit=max_bytes,
                    )
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
        deadline = _Deadline.after(self.request_timeout)
        reply = self._request(SYNC, _encode([(1, time_ns), (2, entropy)]), OK, "sync", deadline)
        fields = self._fields(reply)
        return SyncResult(
            clock_set=bool(_uint(fields, 1)),
            entropy_added=_uint(fields, 2) or 0,
            guest_time_ns=_uint(fields, 3) or 0,
        )

    def configure_network(
        self,
        mac: str,
        address: str,
        prefix: int,
        gateway: str,
        dns: Sequence[str] = (),
        hosts: Mapping[str, Sequence[str]] | None = None,
        hostname: str | None = None,
        mtu: int = 1500,
        reset_connections: bool = False,
    ) -> NetworkResult:
        """Configures the guest's one Ethernet interface, its default route and resolver.

        The agent sets ``mac`` (``02:xx:xx:xx:xx:xx``, unicast), ``mtu`` and ``address/prefix`` on
        the interface (the old IPv4 addresses go), replaces the default route with one via
        ``gateway`` (inside the subnet), writes ``/etc/resolv.conf`` with the ``dns`` servers (at
        most three) and ``/etc/hosts`` with localhost, ``hostname`` (if given, also set as the
        guest's host name) and ``hosts`` (address to names, at most 64 entries). With
        ``reset_connections`` it then destroys every IPv4 TCP connection of the guest (not the
        listening sockets), as a clone restored from a snapshot needs. The values are checked here
        and again by the agent. Raises :class:`AgentError` for values that are refused here and
        :class:`AgentRequestError` when the agent refuses them or a system call fails
        (``kind`` ``request`` or ``os``), and :class:`ProtocolError` from an agent too old to know
        ``net`` (it closes the connection).
        """
        self._begin()
        raw_mac = _mac(mac)
        ip = _ipv4(address, "address")
        if isinstance(prefix, bool) or not isinstance(prefix, int) or not 1 <= prefix <= 30:
            raise AgentError(f"prefix {prefix!r} is not between 1 and 30")
        network = ipaddress.IPv4Network((ip, prefix), strict=False)
        _unicast(ip, "address")
        _host_address(ip, "address", network)
        gw = _ipv4(gateway, "gateway")
        _host_address(gw, "gateway", network)
        if gw == ip:
            raise AgentError(f"gateway {gw} is the address itself")
        if isinstance(dns, str) or len(dns) > MAX_NET_DNS:
            raise AgentError(f"dns must be a sequence of at most {MAX_NET_DNS} addresses, got {dns!r}")
        servers = [_ipv4(server, "dns server") for server in dns]
        for server in servers:
            _unicast(server, "dns server", loopback_ok=True)
        entries = _hosts_entries(hosts or {})
        if hostname is not None and len(_host_name(hostname, "hostname")) > MAX_NET_HOSTNAME:
            raise AgentError(f"hostname {hostname!r} is longer than {MAX_NET_HOSTNAME} bytes")
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65535:
            raise AgentError(f"mtu {mtu!r} is not between 68 and 65535")
        payload = _encode(
            [
                (1, raw_mac),
                (2, ip.packed),
                (3, prefix),
                (4, gw.packed),
                (5, [server.packed for server in servers]),
                (6, entries),
                (7, None if hostname is None else hostname.encode()),
                (8, mtu),
                (9, int(bool(reset_connections))),
            ]
        )
        deadline = _Deadline.after(self.request_timeout)
        fields = self._fields(self._request(NET, payload, OK, "net", deadline))
        return NetworkResult(interface=_text(fields, 1), reset=_uint(fields, 2) or 0)

    def relay_tcp(self, port: int, peer: socket.socket, *, address: str | None = None) -> TcpRelayResult:
        """Connects to TCP ``port`` inside the guest (on ``address``, default the guest's loopback)
        and relays bytes between that connection and ``peer``, a connected host stream socket,
        until both directions are closed. Each side's end of stream is passed on as a half-close.

        Blocks until the stream is over and uses the whole agent connection, which the agent
        closes afterwards. Raises :class:`AgentRequestError` (``kind`` ``os``, ``errno`` e.g.
        ``ECONNREFUSED``) when nothing in the guest accepts the connection or the guest socket
        fails later; ``peer`` is then reset. The peer is never closed here: that is the caller's.
        """
        self._begin()
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise AgentError(f"port {port!r} is not between 1 and 65535")
        target = None if address is None else _ipv4(address, "address").packed
        deadline = _Deadline.after(self.request_timeout)
        try:
            self._request(TCP_CONNECT, _encode([(1, port), (2, target)]), OK, "tcp_connect", deadline)
        except AgentError:
            reset_on_close(peer)
            raise
        self._busy = True
        sent = [0]
        upstream = threading.Thread(
            target=self._relay_to_guest, args=(peer, sent), name=f"relay-to-guest-{port}", daemon=True
        )
        upstream.start()
        received = 0
        try:
            while True:
                kind, payload = self._recv_frame(None, "relaying a tcp connection")
                if kind == STDOUT:
                    peer.sendall(payload)
                    received += len(payload)
                elif kind == END:
                    with contextlib.suppress(OSError):
                        peer.shutdown(socket.SHUT_WR)
                    break
                else:
                    self._unexpected(kind, payload, "during a tcp connection")
            # The agent closes the connection once the host side's half-close reached the guest.
            with contextlib.suppress(AgentUnreachable):
                kind, payload = self._recv_frame(None, "relaying a tcp connection")
                self._unexpected(kind, payload, "after a tcp connection ended")
        except (AgentError, OSError):
            reset_on_close(peer)
            raise
        finally:
            self.close()
            if upstream.is_alive():
                # Still reading a peer that has not finished: wake it, the stream is over.
                with contextlib.suppress(OSError):
                    peer.shutdown(socket.SHUT_RD)
            upstream.join()
        return TcpRelayResult(to_guest=sent[0], from_guest=received)

    def changes(
        self,
        *,
        with_data: bool,
        timeout: float,
        since: int | None = None,
        keep_mark: bool = False,
        pause: bool = False,
    ) -> ChangeStream:
        """The raw ``changes`` stream: each ``entry`` as its decoded fields and, with
        ``with_data``, each regular file's content as ``data`` chunks after its entry. ``since``
        limits it to what changed after the walk that kept that mark; ``keep_mark`` keeps this
        walk as a mark (:attr:`ChangeStream.mark` once the stream is read to its end); ``pause``
        freezes every process the guest's commands started until the walk is over.

        Nothing here is checked beyond the frame format: the guest wrote it, and
        :mod:`supermachine.changes` validates it. The whole stream has ``timeout`` seconds. A
        caller that stops early closes the connection (the agent then stops walking).
        """
        self._begin()
        deadline = _Deadline.after(timeout)
        # Fields that are off are left out, so agents that predate them still take the request.
        request = _encode(
            [(1, 1 if with_data else 0), (2, since), (3, 1 if keep_mark else None), (4, 1 if pause else None)]
        )
        self._send(CHANGES, request, deadline, "asking for the changes")
        return ChangeStream(self, with_data, deadline)

    def _relay_to_guest(self, peer: socket.socket, sent: list[int]) -> None:
        """Copies what ``peer`` sends into the stream's data frames, then its end of stream."""
        try:
            while True:
                data = peer.recv(CHUNK)
                if not data:
                    self._send(STDIN_CLOSE, b"", None, "relaying a tcp connection")
                    return
                self._send(STDIN, data, None, "relaying a tcp connection")
                sent[0] += len(data)
        except (AgentError, OSError):
            # The peer reset or the agent went away: either ends the whole stream.
            self.close()

    def shutdown(self, action: Literal["poweroff", "reboot"] = "poweroff") -> None:
        """Stops the VM (or, for an agent outside a VM, the agent). The connection is closed after."""
        deadline = _Deadline.after(self.request_timeout)
        self._request(SHUTDOWN, _encode([(1, action.encode())]), OK, "shutdown", deadline)
        self.close()


def reset_on_close(sock: socket.socket) -> None:
    """Makes the next close of TCP socket ``sock`` a reset, as a failed forward should look."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def connect_unix(
    path: str | Path, timeout: float | None = None, *, request_timeout: float = REQUEST_TIMEOUT
) -> AgentClient:
    """Connects to an agent listening on a Unix socket (``supermachine-agent --listen unix:PATH``).

    With ``timeout``, keeps retrying while the socket is missing or refuses connections; the hello
    must be exchanged within ``timeout`` (default :data:`CONNECT_TIMEOUT`).
    """
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
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
        hello = CONNECT_TIMEOUT if deadline is None else max(0.0, deadline - time.monotonic())
        return AgentClient(sock, timeout=hello, request_timeout=request_timeout)


def _read_line(sock: socket.socket, deadline: float, limit: int = 128) -> bytes:
    """One line, read byte by byte so nothing after it (the agent's hello) is consumed."""
    line = bytearray()
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no handshake reply in time")
        sock.settimeout(remaining)
        byte = sock.recv(1)
        if not byte:
            raise ConnectionResetError("closed before the handshake reply")
        line += byte
        if len(line) > limit:
            raise ConnectionError("handshake reply too long")
    return bytes(line)


def connect_vsock_uds(
    path: str | Path,
    port: int = DEFAULT_PORT,
    timeout: float = CONNECT_TIMEOUT,
    *,
    request_timeout: float = REQUEST_TIMEOUT,
) -> AgentClient:
    """Connects to the agent in a VM through the VMM's vsock Unix socket.

    Performs the ``CONNECT <port>\\n`` / ``OK <n>\\n`` handshake, then the protocol hello; retries
    until ``timeout`` seconds have passed (the agent may still be starting), then raises
    :class:`AgentUnreachable` naming the last failure (:class:`AgentTimeoutError` if the last
    attempt got no answer in time). ``request_timeout`` is the client's (see :class:`AgentClient`).
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    last = "no attempt made"
    error: type[AgentUnreachable] = AgentUnreachable
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise error(f"no agent on vsock port {port} via {path} within {timeout:g} s: {last}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(remaining)
        try:
            sock.connect(os.fspath(path))
            sock.sendall(f"CONNECT {port}\n".encode())
            reply = _read_line(sock, deadline)
            if not reply.startswith(b"OK "):
                raise ConnectionRefusedError(f"VMM answered {reply.decode('ascii', 'replace').strip()!r}")
            hello = max(0.0, deadline - time.monotonic())
            return AgentClient(sock, timeout=hello, request_timeout=request_timeout)
        except (OSError, AgentUnreachable) as e:
            sock.close()
            last = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            error = AgentTimeoutError if isinstance(e, TimeoutError | AgentTimeoutError) else AgentUnreachable
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.2)
