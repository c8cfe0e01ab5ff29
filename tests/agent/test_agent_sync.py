"""sync through the real agent on a Unix socket: outside a VM it must leave the host's clock and RNG alone.

Setting the clock and adding entropy as PID 1 is checked in a booted VM (test_agent_qemu.py).
"""

from __future__ import annotations

import os
import time

import pytest
from supermachine.agent import MAX_SYNC_ENTROPY, OK, SYNC, AgentClient, SyncResult, _decode
from supermachine.errors import AgentError, AgentRequestError

# 2031-01-01T00:00:00Z: far enough from the host's time that a changed host clock would show.
Y2031_NS = 1_924_992_000 * 10**9
MINUTE_NS = 60 * 10**9


def test_outside_a_vm_nothing_changes(client: AgentClient) -> None:
    result = client.sync(time_ns=Y2031_NS, entropy=os.urandom(64))
    assert isinstance(result, SyncResult)
    assert (result.clock_set, result.entropy_added) == (False, 0)
    # The time reported is the host's, untouched.
    assert abs(result.guest_time_ns - time.time_ns()) < MINUTE_NS
    assert abs(time.time_ns() - Y2031_NS) > MINUTE_NS


def test_defaults(client: AgentClient) -> None:
    result = client.sync()
    assert (result.clock_set, result.entropy_added) == (False, 0)
    assert abs(result.guest_time_ns - time.time_ns()) < MINUTE_NS


def test_every_field_is_optional(client: AgentClient) -> None:
    client._send(SYNC)
    kind, payload = client._recv_frame()
    assert kind == OK
    fields = _decode(payload)
    assert (fields[1], fields[2]) == (0, 0)
    assert isinstance(fields[3], int) and abs(fields[3] - time.time_ns()) < MINUTE_NS
    assert client.ping()


def test_too_much_entropy_is_refused_and_the_connection_stays_usable(client: AgentClient) -> None:
    with pytest.raises(AgentRequestError) as info:
        client.sync(entropy=bytes(MAX_SYNC_ENTROPY + 1))
    assert str(info.value) == "sync: entropy of 513 bytes exceeds the limit of 512 bytes"
    assert (info.value.kind, info.value.errno) == ("request", None)
    assert client.sync(entropy=bytes(MAX_SYNC_ENTROPY)).entropy_added == 0
    assert client.exec(["echo", "ok"]).stdout == b"ok\n"


@pytest.mark.parametrize("time_ns", [-1, 1 << 64])
def test_unencodable_time_is_refused_by_the_client(client: AgentClient, time_ns: int) -> None:
    with pytest.raises(AgentError, match="time_ns must be a Unix time in ns"):
        client.sync(time_ns=time_ns)
    assert client.ping()
