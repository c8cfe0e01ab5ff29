"""Property tests of the host-side decoder of what the agent sends (untrusted guest bytes): field
decoding, frame reading and the replies of every request. Whatever the bytes, the client raises
only supermachine's typed errors, and allocates no more than its limits allow.

Examples per property come from a hypothesis settings profile: ``agent-quick`` (default, seconds)
or ``agent-long`` (``SUPERMACHINE_FUZZ_PROFILE=agent-long``, for a longer hunt).
"""

from __future__ import annotations

import os
import socket
import struct
import tracemalloc
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from supermachine.agent import (
    DATA,
    END,
    ERROR,
    EXIT,
    HELLO,
    MAX_FRAME,
    OK,
    PONG,
    STARTED,
    STDERR,
    STDOUT,
    AgentClient,
    ExecResult,
    FieldValue,
    NetworkResult,
    _decode,
    _encode,
)
from supermachine.errors import SupermachineError

settings.register_profile(
    "agent-quick", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "agent-long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile(os.environ.get("SUPERMACHINE_FUZZ_PROFILE", "agent-quick"))

#: Limits the operations run with, small so that the fuzzer reaches them.
SMALL_LIMIT = 4096
#: Most Python memory one driven exchange may allocate: a receive chunk, the limits and what the
#: stream itself holds, with room to spare; below what a header may announce (MAX_FRAME).
MEMORY_BOUND = 1 << 20

values: st.SearchStrategy[FieldValue] = st.one_of(
    st.integers(0, 2**64 - 1),
    st.binary(max_size=64),
    st.lists(st.binary(max_size=16), max_size=8),
)
fields_payloads = st.lists(st.tuples(st.integers(0, 255), values), max_size=6).map(_encode)
# Field encodings that lie about their lengths and counts.
lying_fields = st.builds(
    lambda tag, kind, n, rest: struct.pack("<BBI", tag, kind, n) + rest,
    st.integers(0, 255),
    st.integers(0, 4),
    st.one_of(st.integers(0, 64), st.just(2**32 - 1), st.integers(0, 2**32 - 1)),
    st.binary(max_size=64),
)
payloads = st.one_of(fields_payloads, lying_fields, st.binary(max_size=256))
agent_kinds = st.one_of(
    st.sampled_from([STARTED, STDOUT, STDERR, EXIT, DATA, END, PONG, OK, ERROR]), st.integers(0, 255)
)
frames = st.one_of(
    st.builds(lambda kind, body: struct.pack("<IB", len(body) + 1, kind) + body, agent_kinds, payloads),
    # A header whose length does not match what follows: absurd, zero, at and past the limit.
    st.builds(
        lambda length, kind, body: struct.pack("<IB", length, kind) + body,
        st.one_of(st.sampled_from([0, 1, MAX_FRAME, MAX_FRAME + 1, 2**32 - 1]), st.integers(0, 2**32 - 1)),
        agent_kinds,
        st.binary(max_size=64),
    ),
)
streams = st.builds(
    lambda parts, tail: b"".join(parts) + tail, st.lists(frames, max_size=8), st.binary(max_size=32)
)

OPERATIONS: dict[str, Callable[[AgentClient], object]] = {
    "ping": lambda c: c.ping(),
    "exec": lambda c: c.exec(["true"], max_output=SMALL_LIMIT),
    "exec-input": lambda c: c.exec(["cat"], input=b"x" * 100, max_output=SMALL_LIMIT),
    "spawn": lambda c: c.spawn(["yes"], timeout=5).wait(max_output=SMALL_LIMIT),
    "spawn-stream": lambda c: list(c.spawn(["yes"])),
    "read_file": lambda c: c.read_file("/f", max_bytes=SMALL_LIMIT),
    "write_file": lambda c: c.write_file("/f", b"data"),
    "sync": lambda c: c.sync(),
    "net": lambda c: c.configure_network("02:00:00:00:00:01", "10.0.2.15", 24, "10.0.2.2"),
    "shutdown": lambda c: c.shutdown(),
}


def well_formed(outcome: object) -> None:
    """What reaches the caller makes sense: one printable line per error, possible exits."""
    if isinstance(outcome, SupermachineError):
        assert str(outcome).isprintable(), str(outcome)
    elif isinstance(outcome, ExecResult):
        assert (outcome.status is None) != (outcome.signal is None)
        assert outcome.status is None or 0 <= outcome.status <= 255
        assert outcome.signal is None or 1 <= outcome.signal <= 64
        assert len(outcome.stdout) <= SMALL_LIMIT and len(outcome.stderr) <= SMALL_LIMIT
    elif isinstance(outcome, NetworkResult):
        assert outcome.interface.isprintable() and outcome.reset >= 0
    elif isinstance(outcome, str):  # the version from a pong
        assert outcome.isprintable()


def drive(operations: list[str], stream: bytes) -> int:
    """Runs ``operations`` on a client whose agent says a good hello then ``stream`` and closes;
    returns the peak of Python memory allocated meanwhile. Lets anything but typed errors escape."""
    ours, theirs = socket.socketpair()
    with theirs:
        theirs.sendall(HELLO + stream)
        theirs.shutdown(socket.SHUT_WR)  # end of the stream: no test can wait forever
        tracemalloc.start()
        try:
            with AgentClient(ours, timeout=10, request_timeout=10) as client:
                for operation in operations:
                    outcome: object
                    try:
                        outcome = OPERATIONS[operation](client)
                    except SupermachineError as e:
                        outcome = e
                    well_formed(outcome)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()


@settings(PROFILE)
@given(st.lists(st.sampled_from(sorted(OPERATIONS)), min_size=1, max_size=3), streams)
def test_any_agent_bytes_give_typed_errors_within_bounded_memory(
    operations: list[str], stream: bytes
) -> None:
    assert drive(operations, stream) < MEMORY_BOUND


@settings(PROFILE)
@given(st.one_of(st.binary(max_size=2048), fields_payloads, lying_fields))
def test_decode_raises_only_protocol_errors_and_stays_within_its_input(payload: bytes) -> None:
    try:
        fields = _decode(payload)
    except SupermachineError as e:
        assert type(e).__name__ == "ProtocolError"
        return
    decoded = 0
    for value in fields.values():
        if isinstance(value, bytes):
            decoded += len(value)
        elif isinstance(value, list):
            decoded += sum(len(item) for item in value) + 4 * len(value)
    assert decoded <= len(payload)


@settings(PROFILE)
@given(st.dictionaries(st.integers(0, 255), values, max_size=8))
def test_decode_reads_what_encode_wrote(fields: dict[int, FieldValue]) -> None:
    assert _decode(_encode(list(fields.items()))) == fields
