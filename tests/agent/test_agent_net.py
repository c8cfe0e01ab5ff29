"""The ``net`` request through the real agent, in network, mount and UTS namespaces of its own.

Each agent runs (as root) in fresh namespaces where ``/etc`` is an empty tmpfs, ``/sys`` shows the
namespace's interfaces and ``eth0`` is one end of a veth pair whose other end lives in a second,
private network namespace (a virtio-net card in a VM has a peer too: passt). Nothing of the host's
network, ``/etc`` or host name is touched. What the agent configured is read back with ``ip -j``
run through the agent itself, so it is seen from inside the namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentServer, _accepts, serving
from supermachine.agent import (
    NET,
    OK,
    AgentClient,
    FieldValue,
    NetworkResult,
    Process,
    _Deadline,
    _encode,
)
from supermachine.errors import AgentError, AgentRequestError

# Runs in the agent's fresh namespaces: `$1` the test's directory, `$2` the agent, then its flags.
NAMESPACE_SETUP = r"""
set -eu
dir=$1; agent=$2; shift 2
mount -t tmpfs -o mode=0755 tmpfs /etc
mount -t sysfs sysfs /sys
mkdir -p "$dir/ns"
mount -t tmpfs tmpfs "$dir/ns"
touch "$dir/ns/peer"
unshare --net="$dir/ns/peer" true
ip link add eth0 type veth peer name peer0 netns "$dir/ns/peer"
nsenter --net="$dir/ns/peer" ip link set peer0 up
ip link set lo up
exec "$agent" --listen "unix:$dir/agent.sock" "$@"
"""

MAC = "02:00:00:00:00:0a"
BASE: dict[str, Any] = {"mac": MAC, "address": "10.0.2.15", "prefix": 24, "gateway": "10.0.2.2"}


def _namespaces_usable() -> str | None:
    """Why these tests cannot run here, or ``None``."""
    if os.geteuid() != 0:
        return "needs root (network, mount and UTS namespaces, veth)"
    missing = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)}"
    probe = subprocess.run(
        [
            "unshare",
            "--net",
            "--mount",
            "--uts",
            "sh",
            "-c",
            "ip link add name probe0 type veth peer name probe1",
        ],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"cannot make namespaces with a veth pair here: {probe.stderr.strip()}"
    return None


SKIP_REASON = _namespaces_usable()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


def start_in_namespaces(binary: Path, directory: Path, *flags: str) -> AgentServer:
    sock = directory / "agent.sock"
    log = directory / "agent.log"
    argv = ["unshare", "--net", "--mount", "--uts", "sh", "-c", NAMESPACE_SETUP, "setup"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*argv, str(directory), str(binary), *flags], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    deadline = time.monotonic() + 20
    while not _accepts(sock):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"agent did not start listening in its namespaces; log:\n{log.read_text()}")
        time.sleep(0.01)
    return AgentServer(process, sock, log)


@pytest.fixture
def net_agent(agent_binary: Path, tmp_path: Path) -> Iterator[AgentServer]:
    """An agent that may configure the network of the namespaces it was started in."""
    yield from serving(start_in_namespaces(agent_binary, tmp_path, "--allow-net-config"))


@pytest.fixture
def net(net_agent: AgentServer) -> Iterator[AgentClient]:
    with net_agent.connect() as connected:
        yield connected


def ip_json(client: AgentClient, *args: str) -> Any:
    result = client.exec(["ip", "-j", *args], timeout=30)
    assert result.ok, result.stderr.decode()
    return json.loads(result.stdout)


def ipv4_addresses(client: AgentClient) -> list[tuple[str, int, str | None]]:
    # A link without IPv4 addresses is left out of the list altogether.
    links = ip_json(client, "-4", "addr", "show", "dev", "eth0")
    return [(a["local"], a["prefixlen"], a.get("broadcast")) for link in links for a in link["addr_info"]]


def default_routes(client: AgentClient) -> list[tuple[str, str]]:
    return [(r["gateway"], r["dev"]) for r in ip_json(client, "-4", "route", "show", "default")]


def file_type(client: AgentClient, path: str) -> str:
    result = client.exec(["stat", "-c", "%F %a", path], timeout=30)
    assert result.ok, result.stderr.decode()
    return result.stdout.decode().strip()


def raw_net(client: AgentClient, fields: dict[int, FieldValue]) -> bytes:
    """A ``net`` request with exactly ``fields``, bypassing the client's own checks."""
    return client._request(NET, _encode(sorted(fields.items())), OK, "net", _Deadline.after(30))


def test_configures_link_address_route_files_and_host_name(net: AgentClient) -> None:
    result = net.configure_network(
        **BASE,
        dns=["10.0.2.3", "10.0.2.4"],
        hosts={"10.0.2.2": ["host", "gw.internal"], "192.0.2.7": ["example-7"]},
        hostname="guest-1",
        mtu=1400,
    )
    assert result == NetworkResult(interface="eth0", reset=0)

    (link,) = ip_json(net, "link", "show", "dev", "eth0")
    assert (link["address"], link["mtu"]) == (MAC, 1400)
    assert "UP" in link["flags"]
    assert ipv4_addresses(net) == [("10.0.2.15", 24, "10.0.2.255")]
    assert default_routes(net) == [("10.0.2.2", "eth0")]

    assert net.read_file("/etc/resolv.conf") == (
        b"nameserver 10.0.2.3\nnameserver 10.0.2.4\noptions timeout:2 attempts:2\n"
    )
    assert net.read_file("/etc/hosts") == (
        b"127.0.0.1\tlocalhost\n10.0.2.15\tguest-1\n10.0.2.2\thost gw.internal\n192.0.2.7\texample-7\n"
    )
    assert file_type(net, "/etc/resolv.conf") == "regular file 644"
    assert file_type(net, "/etc/hosts") == "regular file 644"
    # Nothing but the two files: no temporary file left behind.
    assert net.exec(["ls", "-A", "/etc"]).stdout.split() == [b"hosts", b"resolv.conf"]
    assert net.read_file("/proc/sys/kernel/hostname") == b"guest-1\n"
    # The host's name is not the guest's: the agent changed only its own UTS namespace.
    assert os.uname().nodename != "guest-1"


def test_a_second_call_replaces_addresses_route_and_files(net: AgentClient) -> None:
    net.configure_network(**BASE, dns=["10.0.2.3"], hosts={"10.0.2.2": ["host"]}, hostname="first", mtu=9000)
    # Addresses added behind the agent's back, in the subnet and outside it, go too.
    for extra in ("10.0.2.99/24", "172.16.0.5/12"):
        assert net.exec(["ip", "addr", "add", extra, "dev", "eth0"]).ok

    result = net.configure_network(
        mac="02:00:00:00:00:0b", address="192.168.7.9", prefix=16, gateway="192.168.0.1"
    )
    assert result == NetworkResult(interface="eth0", reset=0)
    (link,) = ip_json(net, "link", "show", "dev", "eth0")
    assert (link["address"], link["mtu"]) == ("02:00:00:00:00:0b", 1500)
    assert ipv4_addresses(net) == [("192.168.7.9", 16, "192.168.255.255")]
    assert default_routes(net) == [("192.168.0.1", "eth0")]
    routes = {r["dst"] for r in ip_json(net, "-4", "route", "show", "dev", "eth0")}
    assert routes == {"default", "192.168.0.0/16"}
    assert net.read_file("/etc/resolv.conf") == b"options timeout:2 attempts:2\n"
    assert net.read_file("/etc/hosts") == b"127.0.0.1\tlocalhost\n"
    # Without a hostname in the request, the host name stays what it was.
    assert net.read_file("/proc/sys/kernel/hostname") == b"first\n"


# Keeps a TCP connection to itself over the guest's address, and on each line of stdin reports
# whether it still carries data and whether its listening socket still accepts connections. The
# probe connection ends with a reset (SO_LINGER 0), so it leaves no socket behind to be counted.
CONNECTION_HOLDER = r"""
import socket, struct, sys
listener = socket.create_server((sys.argv[1], 0))
client = socket.create_connection(listener.getsockname(), timeout=10)
server, _ = listener.accept()
server.settimeout(10)
print("ready", flush=True)
for _ in sys.stdin:
    try:
        client.sendall(b"x")
        state = "alive" if server.recv(1) == b"x" else "closed"
    except OSError:
        state = "dead"
    probe = socket.create_connection(listener.getsockname(), timeout=10)
    accepted, _ = listener.accept()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    probe.close()
    accepted.close()
    print(state, "listening", flush=True)
"""


class Lines:
    """The lines a running process prints, one at a time."""

    def __init__(self, process: Process) -> None:
        self._events = iter(process)
        self._buffer = b""

    def next(self) -> str:
        while b"\n" not in self._buffer:
            event = next(self._events)
            assert event.stream == "stdout", event.data.decode(errors="replace")
            self._buffer += event.data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()


def test_reset_connections_destroys_established_tcp_but_not_listeners(
    net: AgentClient, net_agent: AgentServer
) -> None:
    net.configure_network(**BASE)
    with net_agent.connect() as second:
        holder = second.spawn([sys.executable, "-c", CONNECTION_HOLDER, "10.0.2.15"], stdin=True, timeout=120)
        lines = Lines(holder)
        assert lines.next() == "ready"
        holder.write_stdin(b"check\n")
        assert lines.next() == "alive listening"

        # Reconfiguring without the reset leaves the connection alone.
        assert net.configure_network(**BASE).reset == 0
        holder.write_stdin(b"check\n")
        assert lines.next() == "alive listening"

        # Both ends are sockets of this namespace; the second may already be gone (reset by the
        # destruction of the first) by its turn, so at least one is counted.
        result = net.configure_network(**BASE, reset_connections=True)
        assert result.interface == "eth0" and result.reset in (1, 2)
        holder.write_stdin(b"check\n")
        assert lines.next() == "dead listening"
        holder.close_stdin()
        assert holder.wait().status == 0

    # Nothing is left to reset: the count is of sockets really destroyed.
    assert net.configure_network(**BASE, reset_connections=True).reset == 0


def test_symbolic_links_in_etc_are_replaced_not_followed(net: AgentClient, tmp_path: Path) -> None:
    resolv_target, hosts_target = tmp_path / "resolv-target", tmp_path / "hosts-target"
    resolv_target.write_text("nameserver 192.0.2.1\n")
    hosts_target.write_text("precious\n")
    assert net.exec(["ln", "-s", str(resolv_target), "/etc/resolv.conf"]).ok
    assert net.exec(["ln", "-s", str(hosts_target), "/etc/hosts"]).ok

    net.configure_network(**BASE, dns=["10.0.2.3"])
    assert resolv_target.read_text() == "nameserver 192.0.2.1\n"
    assert hosts_target.read_text() == "precious\n"
    assert file_type(net, "/etc/resolv.conf") == "regular file 644"
    assert file_type(net, "/etc/hosts") == "regular file 644"
    assert net.read_file("/etc/resolv.conf") == b"nameserver 10.0.2.3\noptions timeout:2 attempts:2\n"


def _fields(**changes: FieldValue) -> dict[int, FieldValue]:
    tags = {
        "mac": 1,
        "address": 2,
        "prefix": 3,
        "gateway": 4,
        "dns": 5,
        "hosts": 6,
        "hostname": 7,
        "mtu": 8,
        "reset_connections": 9,
    }
    fields: dict[int, FieldValue] = {1: bytes.fromhex("02000000000a"), 2: bytes([10, 0, 2, 15]), 3: 24}
    fields[4] = bytes([10, 0, 2, 2])
    for name, value in changes.items():
        fields[tags[name]] = value
    return fields


HOSTILE: list[tuple[str, dict[int, FieldValue], str]] = [
    ("mac-short", _fields(mac=bytes(5)), "mac must be 6 bytes, got 5"),
    ("mac-long", _fields(mac=bytes.fromhex("02000000000a0b")), "mac must be 6 bytes, got 7"),
    ("mac-multicast", _fields(mac=bytes.fromhex("01005e000001")), "mac 01:00:5e:00:00:01 is a multicast"),
    ("mac-zero", _fields(mac=bytes(6)), "mac 00:00:00:00:00:00"),
    ("address-short", _fields(address=bytes(3)), "address must be 4 bytes"),
    ("address-loopback", _fields(address=bytes([127, 0, 0, 2])), "address 127.0.0.2 is not a unicast"),
    ("prefix-0", _fields(prefix=0), "prefix 0 is not between 1 and 30"),
    ("prefix-31", _fields(prefix=31), "prefix 31 is not between 1 and 30"),
    ("prefix-33", _fields(prefix=33), "prefix 33 is not between 1 and 30"),
    ("gateway-outside", _fields(gateway=bytes([10, 0, 3, 2])), "gateway 10.0.3.2 is outside 10.0.2.0/24"),
    ("gateway-is-address", _fields(gateway=bytes([10, 0, 2, 15])), "gateway 10.0.2.15 is the address itself"),
    (
        "gateway-broadcast",
        _fields(gateway=bytes([10, 0, 2, 255])),
        "gateway 10.0.2.255 is the network or broadcast",
    ),
    ("dns-4", _fields(dns=[bytes([10, 0, 2, 3])] * 4), "dns has 4 servers"),
    ("dns-short", _fields(dns=[bytes(2)]), "dns server must be 4 bytes"),
    ("hosts-65", _fields(hosts=[b"10.0.2.2 h"] * 65), "hosts has 65 entries"),
    ("hosts-long", _fields(hosts=[b"10.0.2.2 " + b"a" * 247]), "hosts entry 0 has 256 bytes"),
    (
        "hosts-slash",
        _fields(hosts=[b"10.0.2.2 ok", b"10.0.2.3 a/b"]),
        'hosts entry 1: "a/b" is not a valid host name',
    ),
    ("hosts-newline", _fields(hosts=[b"10.0.2.2 a\nb"]), 'hosts entry 0: "a\\nb" is not a valid host name'),
    ("hosts-no-name", _fields(hosts=[b"10.0.2.2"]), "hosts entry 0 names no host"),
    ("hosts-bad-ip", _fields(hosts=[b"10.0.2 a"]), 'hosts entry 0: "10.0.2" is not an IPv4 address'),
    ("hostname-slash", _fields(hostname=b"a/b"), 'hostname "a/b" is not a valid host name'),
    ("hostname-newline", _fields(hostname=b"box\n"), 'hostname "box\\n" is not a valid host name'),
    ("hostname-65", _fields(hostname=b"a" * 65), 'hostname "aaaaaaaa'),
    ("mtu-67", _fields(mtu=67), "mtu 67 is not between 68 and 65535"),
    ("mtu-65536", _fields(mtu=65536), "mtu 65536 is not between 68 and 65535"),
    ("reset-2", _fields(reset_connections=2), "reset_connections must be 0 or 1, got 2"),
    ("mac-missing", {k: v for k, v in _fields().items() if k != 1}, "mac is required"),
]


@pytest.mark.parametrize(
    ("fields", "message"), [(f, m) for _, f, m in HOSTILE], ids=[i for i, _, _ in HOSTILE]
)
def test_hostile_values_are_refused_naming_the_field(
    net: AgentClient, fields: dict[int, FieldValue], message: str
) -> None:
    with pytest.raises(AgentRequestError) as info:
        raw_net(net, fields)
    assert (info.value.kind, info.value.errno) == ("request", None)
    assert str(info.value).startswith(f"net: {message}"), str(info.value)
    # Nothing changed, and the connection stays usable.
    assert ipv4_addresses(net) == []
    assert net.exec(["ls", "-A", "/etc"]).stdout == b""
    assert raw_net(net, _fields()) != b""
    assert ipv4_addresses(net) == [("10.0.2.15", 24, "10.0.2.255")]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mac": "02:00:00:00:00"}, "is not a MAC address"),
        ({"mac": "01:00:5e:00:00:01"}, "multicast"),
        ({"address": "10.0.2"}, "address '10.0.2' is not an IPv4 address"),
        ({"prefix": 31}, "prefix 31 is not between 1 and 30"),
        ({"prefix": True}, "prefix True"),
        ({"gateway": "10.0.3.1"}, "gateway 10.0.3.1 is outside 10.0.2.0/24"),
        ({"gateway": "10.0.2.15"}, "is the address itself"),
        ({"dns": ["10.0.2.3"] * 4}, "dns must be a sequence of at most 3"),
        ({"dns": "10.0.2.3"}, "dns must be a sequence"),
        ({"hosts": {f"10.0.3.{i}": ["h"] for i in range(65)}}, "hosts has 65 entries"),
        ({"hosts": {"10.0.2.2": ["a/b"]}}, "hosts name 'a/b' is not a valid host name"),
        ({"hosts": {"10.0.2.2": "host"}}, "names must be a non-empty sequence"),
        ({"hostname": "box\n"}, "hostname 'box\\n' is not a valid host name"),
        ({"hostname": "a" * 30 + "." + "b" * 34}, "longer than 64 bytes"),
        ({"mtu": 67}, "mtu 67 is not between 68 and 65535"),
    ],
)
def test_the_client_refuses_bad_values_before_sending(
    net: AgentClient, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(AgentError) as info:
        net.configure_network(**{**BASE, **changes})
    assert not isinstance(info.value, AgentRequestError)
    assert message in str(info.value)
    assert ipv4_addresses(net) == []


def test_not_exactly_one_ethernet_interface_is_refused_naming_them(net: AgentClient) -> None:
    assert net.exec(["ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth2"]).ok
    with pytest.raises(AgentRequestError) as info:
        net.configure_network(**BASE)
    assert info.value.kind == "request"
    assert str(info.value).startswith("net: expected one Ethernet interface, found 3: ")
    assert {"eth0", "eth1", "eth2"} <= set(str(info.value).split(": ")[-1].split(", "))

    assert net.exec(["ip", "link", "del", "eth1"]).ok  # and with it eth2
    assert net.exec(["ip", "link", "del", "eth0"]).ok
    with pytest.raises(AgentRequestError) as info:
        net.configure_network(**BASE)
    assert str(info.value) == "net: no usable Ethernet interface (interfaces: lo)"


def test_outside_a_vm_net_needs_the_flag(agent_binary: Path, tmp_path: Path) -> None:
    server = start_in_namespaces(agent_binary, tmp_path)
    try:
        with server.connect() as client:
            with pytest.raises(AgentRequestError) as info:
                client.configure_network(**BASE)
            assert info.value.kind == "request"
            assert "--allow-net-config" in str(info.value)
            assert ipv4_addresses(client) == []
            assert client.exec(["ls", "-A", "/etc"]).stdout == b""
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)
