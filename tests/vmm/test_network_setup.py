"""A VM's network, host side, without a guest: the settings, the real passt backend on its socket
pair, and the VMM's refusal of bad network configurations. The guest side is in
tests/e2e/test_network.py."""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from supermachine import _core
from supermachine.errors import NetworkError
from supermachine.network import (
    DNS_RESOLVER,
    GATEWAY,
    HOST_NAME,
    Backend,
    Identity,
    Network,
    PortMapping,
    core_config,
    counters_from_json,
)

needs_passt = pytest.mark.skipif(
    subprocess.run(["sh", "-c", "command -v passt"], capture_output=True).returncode != 0,
    reason="passt is not installed (scripts/setup.sh installs it)",
)


# -- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("8080:80", PortMapping(8080, 80, "127.0.0.1", "tcp")),
        ("0.0.0.0:8080:80", PortMapping(8080, 80, "0.0.0.0", "tcp")),
        ("5353:53/udp", PortMapping(5353, 53, "127.0.0.1", "udp")),
    ],
)
def test_port_mappings_parse_like_docker_and_bind_loopback_by_default(
    spec: str, expected: PortMapping
) -> None:
    assert PortMapping.parse(spec) == expected


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("80", "is not [HOST_IP:]HOST_PORT:GUEST_PORT"),
        ("a:80", "ports must be numbers"),
        ("0:80", "not between 1 and 65535"),
        ("8080:70000", "not between 1 and 65535"),
        ("8080:80/sctp", "tcp or udp"),
        ("::1:8080:80", "is not [HOST_IP:]HOST_PORT:GUEST_PORT"),
        ("300.1.1.1:8080:80", "is not an IPv4 address"),
    ],
)
def test_bad_port_mappings_are_refused_naming_the_problem(spec: str, complaint: str) -> None:
    with pytest.raises(NetworkError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        PortMapping.parse(spec)


@pytest.mark.parametrize(
    ("network", "complaint"),
    [
        (Network(allow=("10.0.0.0/33",)), "not an IPv4 address or network"),
        (Network(deny=("fd00::/8",)), "only IPv4"),
        (Network(allow=("exa mple.com",)), "neither an IPv4 network nor a domain"),
        (Network(allow=("-bad.com",)), "neither an IPv4 network nor a domain"),
        (Network(mode="none", allow=("host",)), "cannot publish ports or allow"),
        (Network(hosts={"a/b": "1.2.3.4"}), "not a host name"),
        (Network(hosts={"db": "localhost"}), "not an IPv4 address"),
        (Network(ports=(PortMapping(8080, 80), PortMapping(8080, 81))), "published twice"),
        (Network(mode="bridge"), "must be 'egress' or 'none'"),  # type: ignore[arg-type]
        (Network(allow=("*.example.com",), dns=False), "need the DNS resolver"),
        (Network(dns_server="1.1.1.1", dns=False), "dns=False gives the guest no resolver"),
        (Network(dns_server="dns.example"), "'dns.example' is not an IPv4 address"),
        (Network(dns_server="127.0.0.1"), "the guest's own loopback: use 'host'"),
        (Network(dns_server="0.0.0.0"), "not a unicast address"),
        (Network(dns_server="224.0.0.251"), "not a unicast address"),
        (Network(mode="none", dns_server="host"), "without a network has no resolver"),
    ],
)
def test_bad_networks_are_refused_naming_the_problem(network: Network, complaint: str) -> None:
    with pytest.raises(NetworkError, match=complaint):
        network.validated()


def test_the_policy_the_vmm_gets_resolves_host_and_keeps_rule_order() -> None:
    net = Network(allow=("host", "8.8.8.0/24", "*.example.com"), deny=("0.0.0.0/0",))
    assert net.policy() == {
        "rules": [
            {"action": "allow", "target": f"{GATEWAY}/32"},
            {"action": "allow", "target": "8.8.8.0/24"},
            {"action": "allow", "target": "*.example.com"},
            {"action": "deny", "target": "0.0.0.0/0"},
        ],
        "dns": DNS_RESOLVER,
        "default_action": "allow",
        "published_tcp": [],
        "published_udp": [],
    }
    published = Network(
        ports=(PortMapping(8080, 80), PortMapping(8081, 80), PortMapping(53, 53, protocol="udp"))
    )
    assert (published.policy()["published_tcp"], published.policy()["published_udp"]) == ([80], [53])
    # The guest's resolver: passt's forwarder, the host (its loopback), or any address given.
    assert [Network(dns_server=d).policy()["dns"] for d in (None, "host", "192.0.2.53")] == [
        DNS_RESOLVER,
        GATEWAY,
        "192.0.2.53",
    ]
    assert Network(dns=False).resolver() is None and Network(mode="none").resolver() is None
    # "none" on a card that must exist (a restored snapshot had one) refuses everything.
    assert Network(mode="none").policy() == {"rules": [], "dns": None, "default_action": "deny"}
    assert Network(hosts={"db": "host", "api": "192.0.2.7"}).guest_hosts() == {
        GATEWAY: [HOST_NAME, "db"],
        "192.0.2.7": ["api"],
    }


def test_identities_differ_and_are_unicast_locally_administered() -> None:
    # Enough that 24 random bits per MAC would collide (about 1 - e**-12 of the time).
    ids = [Identity.new() for _ in range(20_000)]
    assert len({i.mac for i in ids}) == len(ids)
    assert len({i.address for i in ids[:240]}) == 240  # the /24 is cycled through before reuse
    for i in ids:
        first = i.mac_bytes()[0]
        assert first & 1 == 0 and first & 2 == 2


def test_counters_are_named_by_the_rule_that_dropped() -> None:
    net = Network(allow=("host",), deny=("203.0.113.0/24",))
    builtin = _core.NET_BUILTIN_DENY
    link_local = next(i for i, (_, cidr) in enumerate(builtin) if cidr == "169.254.0.0/16")
    raw = {
        "filter": {
            "passed_out_frames": 3,
            "passed_out_bytes": 300,
            "passed_in_frames": 2,
            "passed_in_bytes": 200,
            "dropped_by_rule": [0, 4],
            "dropped_builtin": [5 if i == link_local else 0 for i in range(len(builtin))],
            "dropped_malformed": 1,
        },
        "tx_malformed": 2,
        "backend_connected": True,
    }
    c = counters_from_json(json.dumps(raw), net, builtin)
    assert c.dropped == {
        "deny 203.0.113.0/24": 4,
        f"{builtin[link_local][0]} 169.254.0.0/16": 5,
        "malformed": 1,
        "malformed chain": 2,
    }
    assert (c.sent_frames, c.received_bytes, c.dropped_total) == (3, 200, 12)


# -- the VMM's own checks -------------------------------------------------------------------------


def _raw_guest(tmp_path: Path) -> Path:
    guest = tmp_path / "hlt.bin"
    guest.write_bytes(b"\xf4")  # hlt
    return guest


@pytest.mark.parametrize(
    ("net", "complaint"),
    [
        ({"mac": [1, 2, 3, 4, 5, 6], "policy": {}}, "unicast"),
        (
            {"mac": [2, 0, 0, 0, 0, 1], "policy": {"rules": [{"action": "allow", "target": "10.0.0.0/40"}]}},
            "40",
        ),
        (
            {"mac": [2, 0, 0, 0, 0, 1], "policy": {"rules": [{"action": "allow", "target": "a.com"}]}},
            "no DNS resolver",
        ),
        ({"mac": [2, 0, 0, 0, 0, 1], "policy": {"bogus": 1}}, "unknown field"),
        ({"mac": [2, 0, 0, 0, 0], "policy": {}}, "network configuration"),
    ],
)
def test_the_vmm_refuses_a_bad_network_configuration(
    tmp_path: Path, net: dict[str, object], complaint: str
) -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError, match=complaint):
        _core.Vm.start(
            {"raw": str(_raw_guest(tmp_path)), "memory_mib": 2, "net": json.dumps(net), "net_fd": a.fileno()}
        )


@pytest.mark.parametrize("kind", ["file", "pipe", "listener", "datagram"])
def test_the_vmm_takes_only_a_connected_stream_socket_as_backend(tmp_path: Path, kind: str) -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("KVM is not usable here")
    closers: list[object] = []
    if kind == "file":
        f = open(tmp_path / "f", "wb")  # noqa: SIM115
        closers.append(f)
        fd = f.fileno()
    elif kind == "pipe":
        r, w = os.pipe()
        closers += [r, w]
        fd = r
    elif kind == "listener":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(tmp_path / "l.sock"))
        s.listen()
        closers.append(s)
        fd = s.fileno()
    else:
        s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        closers += [s1, s2]
        fd = s1.fileno()
    try:
        net = json.dumps({"mac": [2, 0, 0, 0, 0, 1], "policy": {}})
        with pytest.raises(OSError, match="network backend's socket is unusable"):
            _core.Vm.start({"raw": str(_raw_guest(tmp_path)), "memory_mib": 2, "net": net, "net_fd": fd})
    finally:
        for c in closers:
            if isinstance(c, int):
                os.close(c)
            else:
                c.close()  # type: ignore[attr-defined]


# -- the real backend -----------------------------------------------------------------------------


def _frame_exchange(sock: socket.socket, frame: bytes, timeout: float = 5.0) -> bytes:
    """Sends one framed Ethernet frame and returns the first frame that comes back."""
    sock.sendall(struct.pack("!I", len(frame)) + frame)
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
        ready, _, _ = select.select([sock], [], [], timeout)
        assert ready, "passt did not answer"
        chunk = sock.recv(65536)
        assert chunk, "passt closed the connection"
        data += chunk
    return data[4 : 4 + struct.unpack("!I", data[:4])[0]]


@needs_passt
def test_passt_answers_on_the_socket_pair_with_the_identity_it_was_given(tmp_path: Path) -> None:
    identity = Identity.new()
    backend = Backend(Network(), identity, tmp_path)
    sock = socket.socket(fileno=os.dup(backend.vmm_fd()))
    backend.handed_over()
    try:
        mac = bytes(identity.mac_bytes())
        arp = (
            b"\xff" * 6
            + mac
            + b"\x08\x06"
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            + mac
            + socket.inet_aton(identity.address)
            + b"\0" * 6
            + socket.inet_aton(GATEWAY)
        )
        reply = _frame_exchange(sock, arp)
        assert reply[12:14] == b"\x08\x06" and reply[0:6] == mac  # an ARP reply, to us
        assert reply[28:32] == socket.inet_aton(GATEWAY)  # "the gateway is at ..."
        backend.check_alive()
    finally:
        sock.close()
        backend.stop()


@needs_passt
def test_a_published_port_is_bound_on_loopback_and_a_busy_one_is_reported(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    free_port = free.getsockname()[1]
    free.close()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ok = Backend(Network(ports=(PortMapping(free_port, 80),)), Identity.new(), tmp_path / "a")
    clash = None
    try:
        # passt binds before it serves: once the ARP exchange works, the port is bound.
        sock = socket.socket(fileno=os.dup(ok.vmm_fd()))
        mac = bytes(ok.identity.mac_bytes())
        arp = b"\xff" * 6 + mac + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
        arp += mac + socket.inet_aton(ok.identity.address) + b"\0" * 6 + socket.inet_aton(GATEWAY)
        _frame_exchange(sock, arp)
        probe = socket.socket()
        with pytest.raises(OSError):
            probe.bind(("127.0.0.1", free_port))
        probe.close()
        sock.close()
        clash = Backend(Network(ports=(PortMapping(port, 80),)), Identity.new(), tmp_path / "b")
        clash._process.wait(10)
        with pytest.raises(NetworkError, match=r"passt.*exited"):
            clash.check_alive()
    finally:
        ok.stop()
        if clash is not None:
            clash.stop()
        busy.close()


def test_a_missing_passt_is_one_line_naming_the_package(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}
    code = (
        "from pathlib import Path\n"
        "from supermachine.network import Backend, Identity, Network\n"
        "from supermachine.errors import NetworkError\n"
        "try:\n"
        f"    Backend(Network(), Identity.new(), Path({str(tmp_path)!r}))\n"
        "except NetworkError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("networking needs passt, which is not installed")
    assert "apt install passt" in out.stdout


def test_the_vmm_configuration_carries_mac_policy_and_limits() -> None:
    from supermachine.worker import IoLimit

    identity = Identity(mac="02:53:4d:00:00:01", address="10.0.2.15")
    net = Network(deny=("0.0.0.0/0",), tx_limit=IoLimit(bytes_per_sec=1 << 20))
    cfg = json.loads(core_config(net, identity))
    assert cfg["mac"] == [2, 0x53, 0x4D, 0, 0, 1]
    assert cfg["rate_limit"] == {"tx": {"bytes_per_sec": 1 << 20}}
    assert cfg["policy"]["rules"] == [{"action": "deny", "target": "0.0.0.0/0"}]
