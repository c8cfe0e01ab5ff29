"""The host side against a hostile guest: every wait has a deadline, every collected byte a limit.

The guest is a fake agent on a real Unix socket (``_fake_agent``) that answers the handshake and
hello properly and then stalls, trickles, floods or lies. Each call under test runs in a helper
thread with a bounded join, so a client that hangs fails the test instead of hanging the suite.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TypeVar

import pytest
import supermachine.agent
from _fake_agent import FakeAgent, FakeConnection
from supermachine.agent import (
    DATA,
    END,
    ERROR,
    EXEC,
    EXIT,
    MAX_OUTPUT,
    MAX_READ,
    MAX_TEXT,
    PONG,
    READ_FILE,
    SIGNAL,
    STARTED,
    STDOUT,
    _decode,
    _encode,
    connect_unix,
    connect_vsock_uds,
)
from supermachine.errors import (
    AgentRequestError,
    AgentTimeoutError,
    GuestPanickedError,
    OutputLimitError,
    ProtocolError,
    VmError,
)
from supermachine.vm import Vm, VmConfig

T = TypeVar("T")

#: Slack on top of a deadline for thread scheduling on a loaded machine (not a speed assertion:
#: without a deadline these calls never return at all).
SLACK = 3.0
CHUNK = b"y" * 65536


def finishes_within(seconds: float, call: Callable[[], T]) -> T:
    """``call()``'s result or exception, or a test failure if it is still running after ``seconds``."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still waiting on the guest after {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


#: The grace past a command's timeout in these tests: the default is sized for slow emulated
#: guests, and what is tested is that there is one.
GRACE = 2.0


@pytest.fixture
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supermachine.agent, "EXEC_GRACE", GRACE)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[..., FakeAgent]]:
    started: list[FakeAgent] = []

    def start(behaviour: Callable[[FakeConnection], None], **options: bool) -> FakeAgent:
        directory = tmp_path / f"vm{len(started)}"
        directory.mkdir()
        agent = FakeAgent(directory / "vsock.sock", behaviour, **options)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.close()


# -- behaviours -------------------------------------------------------------------------------------


def silent(conn: FakeConnection) -> None:
    conn.drain()


def started_then(then: Callable[[FakeConnection], None]) -> Callable[[FakeConnection], None]:
    def behaviour(conn: FakeConnection) -> None:
        kind, _ = conn.read_request()
        assert kind == EXEC
        conn.send_fields(STARTED, [(1, 4242)])
        then(conn)

    return behaviour


def trickle(conn: FakeConnection) -> None:
    while True:
        conn.send(STDOUT, b".")
        time.sleep(0.1)


def flood(
    total: int | None, kind: int = STDOUT, end: bytes | None = None
) -> Callable[[FakeConnection], None]:
    """Sends ``kind`` frames of 64 KiB (``total`` bytes, or until the client goes), then ``end``."""

    def behaviour(conn: FakeConnection) -> None:
        conn.drain_in_background()
        sent = 0
        while total is None or sent < total:
            conn.send(kind, CHUNK)
            sent += len(CHUNK)
        if end is not None:
            conn.sock.sendall(end)

    return behaviour


def exit_frame(status: int = 0) -> bytes:
    payload = _encode([(1, status), (3, 0), (4, 1)])
    return struct.pack("<IB", len(payload) + 1, EXIT) + payload


class _VmmStandIn:
    """Stands in for the VMM handle of a running VM, whose agent is the fake's socket: what is
    under test (deadlines, environment) lives in :class:`Vm` and the agent connection, and a real
    guest costs minutes to boot on this kind of host. The console holds a terminal escape."""

    outcome = None
    cpu_template = "normal"

    def console(self) -> bytes:
        return b"booting\n\x1b[2Jstill booting\n"

    def stop(self) -> None:
        pass


def vm_on(agent: FakeAgent, config: VmConfig | None = None) -> Vm:
    return Vm(_VmmStandIn(), config or VmConfig(), agent.path.parent)  # type: ignore[arg-type]


def peak_traced(call: Callable[[], object]) -> tuple[BaseException | None, int]:
    """What ``call`` raised and the peak of Python memory allocated meanwhile (bytes)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            finishes_within(120, call)
        except BaseException as e:
            return e, tracemalloc.get_traced_memory()[1]
        return None, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- deadlines --------------------------------------------------------------------------------------


def test_ping_to_a_guest_that_never_answers_times_out(fake: Callable[..., FakeAgent]) -> None:
    agent = fake(silent)
    client = connect_vsock_uds(agent.path, timeout=5)
    client.request_timeout = 1
    started = time.monotonic()
    with pytest.raises(AgentTimeoutError) as info:
        finishes_within(1 + SLACK, client.ping)
    assert time.monotonic() - started >= 1
    assert str(info.value) == "the agent did not answer within 1 s (waiting for the reply to ping)"
    assert agent.last().client_gone.wait(5), "the connection should be closed after a timeout"


def test_a_guest_that_accepts_and_never_says_hello(fake: Callable[..., FakeAgent]) -> None:
    agent = fake(silent, hello=False)
    with pytest.raises(AgentTimeoutError, match=r"^no agent on vsock port 1024 via .* within 1 s: "):
        finishes_within(1 + SLACK, lambda: connect_vsock_uds(agent.path, timeout=1))


def test_a_unix_socket_agent_that_never_says_hello(fake: Callable[..., FakeAgent]) -> None:
    agent = fake(silent, vmm=False, hello=False)
    with pytest.raises(AgentTimeoutError, match=r"within (1|0\.\d+) s \(reading the agent's hello\)"):
        finishes_within(1 + SLACK, lambda: connect_unix(agent.path, timeout=1))


def test_wait_for_agent_honours_the_boot_timeout(fake: Callable[..., FakeAgent]) -> None:
    """The guest accepts and passes the hello, then never answers the ping: the boot fails after
    ``boot_timeout`` with the console's last line, made printable."""
    vm = vm_on(fake(silent))
    with pytest.raises(VmError) as info:
        finishes_within(1.5 + SLACK, lambda: vm._wait_for_agent(1.5))
    message = str(info.value)
    assert message.startswith("the guest agent did not answer within 1.5 s; console: ")
    assert "still booting" in message and "\x1b" not in message


@pytest.mark.usefixtures("short_grace")
def test_exec_timeout_is_enforced_on_the_host(fake: Callable[..., FakeAgent]) -> None:
    """The agent starts the command, then never reports its end (it should kill it at 1 s)."""
    agent = fake(started_then(silent))
    client = connect_vsock_uds(agent.path, timeout=5)
    started = time.monotonic()
    with pytest.raises(AgentTimeoutError) as info:
        finishes_within(1 + GRACE + SLACK, lambda: client.exec(["sleep", "600"], timeout=1))
    assert time.monotonic() - started >= 1 + GRACE - 0.1
    assert str(info.value) == (
        f"the agent did not answer within {1 + GRACE:g} s "
        "(waiting for 'sleep 600' to end; its timeout was 1 s)"
    )
    # The disconnect is what makes a real agent kill the process group.
    assert agent.last().client_gone.wait(5)


@pytest.mark.usefixtures("short_grace")
def test_exec_deadline_holds_against_a_trickle(fake: Callable[..., FakeAgent]) -> None:
    """Output that keeps coming does not keep the host waiting: the deadline is per call."""
    client = connect_vsock_uds(fake(started_then(trickle)).path, timeout=5)
    with pytest.raises(AgentTimeoutError):
        finishes_within(1 + GRACE + SLACK, lambda: client.exec(["yes"], timeout=1))


@pytest.mark.usefixtures("short_grace")
def test_vm_exec_timeout_with_a_silent_guest(fake: Callable[..., FakeAgent]) -> None:
    vm = vm_on(fake(started_then(silent)))
    with pytest.raises(AgentTimeoutError, match="its timeout was 1 s"):
        finishes_within(1 + GRACE + SLACK, lambda: vm.exec(["sleep", "600"], timeout=1, check=True))


def test_a_command_without_timeout_may_stay_silent(fake: Callable[..., FakeAgent]) -> None:
    """Waiting for a long command's output is not cut short by the per-request timeout."""

    def idle_then_exit(conn: FakeConnection) -> None:
        time.sleep(1.5)
        conn.sock.sendall(exit_frame(0))
        conn.read_frame()
        conn.send_fields(PONG, [(1, b"fake")])
        conn.drain()

    client = connect_vsock_uds(fake(started_then(idle_then_exit)).path, timeout=5)
    client.request_timeout = 0.3
    result = finishes_within(30, lambda: client.exec(["sleep", "1"]))
    assert (result.status, result.stdout) == (0, b"")
    assert finishes_within(5, client.ping) == "fake"  # no timeout closed the connection


@pytest.mark.usefixtures("short_grace")
def test_an_agent_that_stops_reading_stdin_cannot_hang_exec(fake: Callable[..., FakeAgent]) -> None:
    """The agent reports the exit but never reads the rest of stdin: the host stops sending."""

    def exit_without_reading(conn: FakeConnection) -> None:
        conn.sock.sendall(exit_frame(0))
        time.sleep(60)

    client = connect_vsock_uds(fake(started_then(exit_without_reading)).path, timeout=5)
    result = finishes_within(GRACE + SLACK, lambda: client.exec(["true"], input=b"x" * (32 << 20)))
    assert result.status == 0


# -- size limits ------------------------------------------------------------------------------------


def test_endless_output_stops_at_the_limit_and_kills_the_command(fake: Callable[..., FakeAgent]) -> None:
    agent = fake(started_then(flood(None)))
    client = connect_vsock_uds(agent.path, timeout=5)
    error, peak = peak_traced(lambda: client.exec(["yes"], max_output=1 << 20))
    assert isinstance(error, OutputLimitError), error
    assert str(error) == "stdout of 'yes' exceeded the limit of 1 MiB (max_output); the command was killed"
    assert (len(error.stdout), error.stderr, error.limit) == (1 << 20, b"", 1 << 20)
    assert peak < 16 << 20, f"host allocated {peak} bytes"
    conn = agent.last()
    assert conn.client_gone.wait(5), "the connection should be closed"
    assert (SIGNAL, _encode([(1, 9)])) in conn.received


def test_output_has_a_limit_by_default(fake: Callable[..., FakeAgent]) -> None:
    """A guest sends a little more than the default limit, then a normal exit."""
    client = connect_vsock_uds(fake(started_then(flood(MAX_OUTPUT + (4 << 20), end=exit_frame()))).path)
    error, peak = peak_traced(lambda: client.exec(["yes"]))
    assert isinstance(error, OutputLimitError), error
    assert error.limit == MAX_OUTPUT == 64 << 20 and len(error.stdout) == MAX_OUTPUT
    assert peak < 3 * MAX_OUTPUT


def test_spawn_streams_without_a_limit(fake: Callable[..., FakeAgent]) -> None:
    client = connect_vsock_uds(fake(started_then(flood(8 << 20, end=exit_frame(0)))).path, timeout=5)
    process = client.spawn(["yes"])
    streamed = finishes_within(60, lambda: sum(len(event.data) for event in process))
    assert streamed == 8 << 20 and process.wait(max_output=1).status == 0


def read_file_then(then: Callable[[FakeConnection], None]) -> Callable[[FakeConnection], None]:
    def behaviour(conn: FakeConnection) -> None:
        kind, _ = conn.read_request()
        assert kind == READ_FILE
        then(conn)

    return behaviour


def test_endless_file_stops_at_the_limit(fake: Callable[..., FakeAgent]) -> None:
    agent = fake(read_file_then(flood(None, kind=DATA)))
    client = connect_vsock_uds(agent.path, timeout=5)
    error, peak = peak_traced(lambda: client.read_file("/dev/zero", max_bytes=1 << 20))
    assert isinstance(error, OutputLimitError), error
    assert str(error) == "/dev/zero is larger than the limit of 1 MiB (max_bytes); reading stopped"
    assert peak < 16 << 20
    assert agent.last().client_gone.wait(5)


def test_file_reads_have_a_limit_by_default(fake: Callable[..., FakeAgent]) -> None:
    end = _encode([(1, MAX_READ + (4 << 20))])
    end_frame = struct.pack("<IB", len(end) + 1, END) + end
    vm = vm_on(fake(read_file_then(flood(MAX_READ + (4 << 20), kind=DATA, end=end_frame))))
    error, _ = peak_traced(lambda: vm.read_file("/big"))
    assert isinstance(error, OutputLimitError) and error.limit == MAX_READ, error


def test_file_read_deadline(fake: Callable[..., FakeAgent]) -> None:
    vm = vm_on(fake(read_file_then(trickle_data)))
    # The budget left after connecting: 1 s less the (loaded machine's) connection time.
    with pytest.raises(AgentTimeoutError, match=r"within (1|0\.\d+) s \(reading /slow\)"):
        finishes_within(1 + SLACK, lambda: vm.read_file("/slow", timeout=1))


def trickle_data(conn: FakeConnection) -> None:
    while True:
        conn.send(DATA, b".")
        time.sleep(0.1)


# -- frames and messages ----------------------------------------------------------------------------


def test_an_absurd_frame_length_is_refused_without_allocating(fake: Callable[..., FakeAgent]) -> None:
    def huge_header(conn: FakeConnection) -> None:
        conn.read_frame()
        conn.sock.sendall(struct.pack("<IB", 0xFFFFFFFF, PONG))
        conn.drain()

    client = connect_vsock_uds(fake(huge_header).path, timeout=5)
    error, peak = peak_traced(client.ping)
    assert isinstance(error, ProtocolError)
    assert str(error) == "agent sent a frame of 4294967295 bytes (limit 1048576)"
    assert peak < 1 << 20


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (_encode([(3, 0), (4, 5)]), "neither or both of status and signal"),
        (_encode([(1, 0), (2, 9)]), "neither or both of status and signal"),
        (_encode([(1, 1 << 40)]), "exit status 1099511627776 (beyond 255)"),
        (_encode([(2, 0)]), "exit signal 0 (not 1 to 64)"),
        (_encode([(1, 0), (1, 1)]), "field 1 twice"),
        (struct.pack("<BBI", 7, 3, 0xFFFFFFFF) + b"\0" * 64, "a list of 4294967295 items in 64 bytes"),
    ],
    ids=["no-status", "status-and-signal", "huge-status", "signal-0", "duplicate", "huge-count"],
)
def test_impossible_exit_messages_are_refused(
    fake: Callable[..., FakeAgent], payload: bytes, problem: str
) -> None:
    def lying_exit(conn: FakeConnection) -> None:
        conn.send(EXIT, payload)
        conn.drain()

    client = connect_vsock_uds(fake(started_then(lying_exit)).path, timeout=5)
    with pytest.raises(ProtocolError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        finishes_within(10, lambda: client.exec(["true"]))


def test_agent_text_reaches_the_user_as_one_printable_line(fake: Callable[..., FakeAgent]) -> None:
    message = b"no \x1b[2J\x1b]0;owned\x07such\r\nfile\x00" + b"!" * 10_000

    def refuse(conn: FakeConnection) -> None:
        conn.read_request()
        conn.send_fields(ERROR, [(1, b"os\x1b[31m"), (2, 2), (3, message), (4, 0)])
        conn.drain()

    client = connect_vsock_uds(fake(refuse).path, timeout=5)
    with pytest.raises(AgentRequestError) as info:
        finishes_within(10, lambda: client.exec(["x"]))
    text = str(info.value)
    assert text.startswith("no [2J ]0;owned such file !!!")
    assert text.isprintable() and len(text) == MAX_TEXT and text.endswith("…")
    assert info.value.kind == "os [31m"


def test_a_guest_panic_line_reaches_the_user_printable(fake: Callable[..., FakeAgent]) -> None:
    class Panicked(_VmmStandIn):
        outcome = SimpleNamespace(kind="reset", reason="", code=None)

        def console(self) -> bytes:
            return b"Kernel panic - not syncing: \x1b]0;owned\x07\x1b[2Jboom\x00" + b"!" * 5000 + b"\n"

    vm = Vm(Panicked(), VmConfig(), fake(silent).path.parent)  # type: ignore[arg-type]
    with pytest.raises(GuestPanickedError) as info:
        vm.exec(["true"])
    text = str(info.value)
    assert text.startswith("the guest kernel panicked: Kernel panic - not syncing: ]0;owned [2Jboom !!!")
    assert text.isprintable() and len(text) < 2 * MAX_TEXT


# -- environment ------------------------------------------------------------------------------------


def record_exec(conn: FakeConnection) -> None:
    while True:
        kind, _ = conn.read_request()
        assert kind == EXEC
        conn.send_fields(STARTED, [(1, 1)])
        conn.sock.sendall(exit_frame(0))


def env_of(agent: FakeAgent) -> list[str]:
    kind, payload = agent.last().received[-1]
    assert kind == EXEC
    entries = _decode(payload).get(2)
    assert isinstance(entries, list)
    return sorted(e.decode() for e in entries)


def test_exec_env_adds_to_the_image_env(fake: Callable[..., FakeAgent]) -> None:
    """Like ``run -e``: a call's ``env`` goes over the config's (the image's Env), which goes over
    the defaults; ``replace_env`` gives exactly ``env``."""
    agent = fake(record_exec)
    vm = vm_on(agent, VmConfig(env={"GREETING": "hello", "PATH": "/image/bin"}))
    vm.exec(["env"], env={"GREETING": "hi", "EXTRA": "1"})
    assert env_of(agent) == ["EXTRA=1", "GREETING=hi", "HOME=/root", "PATH=/image/bin"]
    vm.exec(["env"])
    assert env_of(agent) == ["GREETING=hello", "HOME=/root", "PATH=/image/bin"]
    vm.exec(["env"], env={"ONLY": "this"}, replace_env=True)
    assert env_of(agent) == ["ONLY=this"]
    vm.spawn(["env"], env={"EXTRA": "2"}).wait()
    assert env_of(agent) == ["EXTRA=2", "GREETING=hello", "HOME=/root", "PATH=/image/bin"]


# -- ports exposed while the VM runs ----------------------------------------------------------------

OK = 0x88
TCP_CONNECT = 0x0D


def connected_then(then: Callable[[FakeConnection], None]) -> Callable[[FakeConnection], None]:
    """Accepts the tcp_connect request, then does ``then``."""

    def behaviour(conn: FakeConnection) -> None:
        kind, _ = conn.read_request()
        assert kind == TCP_CONNECT
        conn.send(OK)
        then(conn)

    return behaviour


def test_a_guest_that_breaks_the_stream_resets_the_host_peer(fake: Callable[..., FakeAgent]) -> None:
    def lie(conn: FakeConnection) -> None:
        conn.send(STDOUT, b"hello")
        conn.send(0x81, b"")  # `started` in the middle of a stream
        conn.drain()

    vm = vm_on(fake(connected_then(lie)))
    host, port = vm.expose_tcp(8080)
    try:
        with socket.create_connection((host, port), timeout=30) as peer:
            got = b""
            with pytest.raises(ConnectionResetError):
                while chunk := finishes_within(30, lambda: peer.recv(100)):
                    got += chunk
            assert got == b"hello"
    finally:
        vm.stop()


def test_a_flooding_guest_cannot_make_the_host_buffer_for_a_peer_that_does_not_read(
    fake: Callable[..., FakeAgent],
) -> None:
    agent = fake(connected_then(lambda conn: flood(64 << 20)(conn)))
    vm = vm_on(agent)
    host, port = vm.expose_tcp(8080)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        peer = socket.create_connection((host, port), timeout=30)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        time.sleep(3)  # the guest floods; nobody reads
        peak = tracemalloc.get_traced_memory()[1]
        assert peak < 8 << 20, f"host allocated {peak} bytes for a peer that reads nothing"
        peer.close()
    finally:
        tracemalloc.stop()
        finishes_within(30, vm.stop)
    # Stopping the VM ended the relay: the fake saw its client go.
    assert agent.last().client_gone.wait(10)
