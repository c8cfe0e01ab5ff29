"""Networking end to end: a real Linux guest with a virtio-net card, a real passt, and servers this
test starts on the host's loopback (no traffic ever leaves this machine).

One VM is booted for the module (its policy allows the host and denies one test range), then
snapshotted; two clones of the snapshot are restored at once. Each guest-side network operation
costs seconds on hosts that emulate guest kernel code, so the tests do few of them.
"""

from __future__ import annotations

import http.server
import re
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from supermachine import _core
from supermachine.image import Image
from supermachine.network import GATEWAY, HOST_NAME, Network, PortMapping
from supermachine.vm import Vm, VmConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("kvm")]

DENIED_RANGE = "203.0.113.0/24"  # TEST-NET-3: nothing there, and the policy must stop it anyway
METADATA = "169.254.169.254"


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"page for {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def host_server() -> Iterator[int]:
    """An HTTP server on the host's loopback; its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def published_port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def vm(rootfs: Path, published_port: int) -> Iterator[Vm]:
    net = Network(
        allow=("host",),
        deny=(DENIED_RANGE,),
        ports=(PortMapping(published_port, 8080),),
        hosts={"pages.test": "host"},
    )
    with Vm.start(VmConfig(rootfs=rootfs, memory_mib=256, network=net)) as machine:
        yield machine


def _dropped(vm: Vm, name: str) -> int:
    info = vm.network
    assert info is not None
    return info.counters.dropped.get(name, 0)


def _builtin_name(cidr: str) -> str:
    return next(f"{name} {c}" for name, c in _core.NET_BUILTIN_DENY if c == cidr)


def test_the_guest_fetches_from_the_host_by_name_and_address(vm: Vm, host_server: int) -> None:
    # The VM's first command: slow while its pages fault in, more so beside another test worker.
    by_name = vm.exec(["wget", "-qO-", f"http://{HOST_NAME}:{host_server}/a"], timeout=300)
    assert (by_name.status, by_name.stdout) == (0, b"page for /a\n"), by_name.stderr
    # A name the test controls (--add-host), and the gateway address itself.
    both = vm.exec(
        [
            "sh",
            "-c",
            f"wget -qO- http://pages.test:{host_server}/b && wget -qO- http://{GATEWAY}:{host_server}/c",
        ],
        timeout=120,
    )
    assert (both.status, both.stdout) == (0, b"page for /b\npage for /c\n"), both.stderr
    info = vm.network
    assert info is not None and info.counters.sent_frames > 0 and info.counters.received_frames > 0


def test_a_published_port_reaches_a_server_in_the_guest(vm: Vm, published_port: int) -> None:
    vm.exec(
        ["sh", "-c", "mkdir -p /www && echo guest page > /www/index.html && httpd -p 8080 -h /www"],
        keep_background=True,
        check=True,
        timeout=120,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{published_port}/index.html", timeout=30) as r:
                assert r.read() == b"guest page\n"
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    # Bound to loopback only, as asked by default.
    assert [p.host_ip for p in vm.network.ports] == ["127.0.0.1"]  # type: ignore[union-attr]
    # The same server published again while the VM runs, through the agent this time.
    exposed = vm.expose_tcp(8080)
    assert exposed.host == "127.0.0.1" and vm.exposed_tcp == {exposed: 8080}
    with urllib.request.urlopen(f"http://127.0.0.1:{exposed.port}/index.html", timeout=120) as r:
        assert r.read() == b"guest page\n"
    vm.unexpose_tcp(exposed)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(exposed, timeout=10)


def test_denied_destinations_are_dropped_and_counted(vm: Vm) -> None:
    metadata = _builtin_name("169.254.0.0/16")
    before = (_dropped(vm, metadata), _dropped(vm, f"deny {DENIED_RANGE}"))
    tries = vm.exec(
        ["sh", "-c", f"nc -w 3 {METADATA} 80 </dev/null; nc -w 3 203.0.113.9 80 </dev/null; exit 0"],
        timeout=120,
    )
    assert tries.status == 0
    after = (_dropped(vm, metadata), _dropped(vm, f"deny {DENIED_RANGE}"))
    assert after[0] > before[0] and after[1] > before[1], (before, after)


def test_root_in_the_guest_cannot_lift_the_policy(vm: Vm, host_server: int) -> None:
    """New addresses, a new MAC and a direct route change nothing: the policy is the VMM's."""
    metadata = _builtin_name("169.254.0.0/16")
    before = _dropped(vm, metadata)
    script = (
        "ifconfig eth0 hw ether 02:00:00:00:00:99 2>/dev/null; "
        "ifconfig eth0 169.254.1.1 netmask 255.255.0.0 up; "
        "route add -host 169.254.169.254 dev eth0; "
        f"nc -w 3 {METADATA} 80 </dev/null; exit 0"
    )
    try:
        assert vm.exec(["sh", "-c", script], timeout=120).status == 0
        assert _dropped(vm, metadata) > before
    finally:
        # Give the guest its own identity back for the tests after this one.
        with vm._client() as client:
            vm._configure_network(client, reset_connections=False)


@pytest.fixture(scope="module")
def snapshot(vm: Vm, tmp_path_factory: pytest.TempPathFactory, host_server: int) -> Image:
    # A connection the snapshot's VM leaves open: its clones must not inherit it.
    vm.exec(
        ["sh", "-c", f"sleep 3600 | nc {GATEWAY} {host_server} >/dev/null &"],
        keep_background=True,
        timeout=120,
    )
    # Snapshot it established (state 01), not while its handshake is still under way.
    established = (
        "for i in $(seq 40); do grep -q '^ *[0-9]*: [0-9A-F:]* [0-9A-F:]* 01 ' /proc/net/tcp && exit 0;"
        " sleep 1; done; exit 1"
    )
    assert vm.exec(["sh", "-c", established], timeout=300).status == 0
    return vm.snapshot(tmp_path_factory.mktemp("snap") / "net", base=None)


def _guest_identity(clone: Vm) -> tuple[str, str]:
    out = clone.exec(["ifconfig", "eth0"], timeout=120).stdout.decode()
    mac = re.search(r"HWaddr ([0-9A-Fa-f:]{17})", out)
    address = re.search(r"inet addr:([0-9.]+)", out)
    assert mac and address, out
    return mac.group(1).lower(), address.group(1)


def test_clones_get_their_own_identity_and_fetch_concurrently(snapshot: Image, host_server: int) -> None:
    net = Network(allow=("host",))

    def clone_fetches(tag: str) -> tuple[tuple[str, str], tuple[str, str], bytes, str]:
        with snapshot.start(network=net) as clone:
            info = clone.network
            assert info is not None
            fetched = clone.exec(["wget", "-qO-", f"http://{HOST_NAME}:{host_server}/{tag}"], timeout=300)
            tcp = clone.exec(["cat", "/proc/net/tcp"], timeout=120).stdout.decode()
            return (info.mac, info.address), _guest_identity(clone), fetched.stdout, tcp

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(clone_fetches, ["one", "two"])
    assert a[2] == b"page for /one\n" and b[2] == b"page for /two\n"
    assert a[0] != b[0] and a[0][0] != b[0][0] and a[0][1] != b[0][1]  # distinct MACs and addresses
    assert a[1] == a[0] and b[1] == b[0]  # the guest uses the identity the host gave it
    # No established connection survived into a clone (state 01 in /proc/net/tcp).
    for _, _, _, tcp in (a, b):
        states = [line.split()[3] for line in tcp.splitlines()[1:]]
        assert "01" not in states, tcp


def test_a_vm_without_network_has_no_card_but_can_expose_a_port(rootfs: Path) -> None:
    with Vm.start(VmConfig(rootfs=rootfs, memory_mib=256, network="none")) as machine:
        assert machine.network is None
        started = machine.exec(
            [
                "sh",
                "-c",
                "ls /sys/class/net; mkdir -p /www && echo offline page > /www/i && httpd -p 8080 -h /www",
            ],
            keep_background=True,
            timeout=120,
        )
        assert (started.status, started.stdout.split()) == (0, [b"lo"]), started.stderr
        host, port = machine.expose_tcp(8080)
        with urllib.request.urlopen(f"http://{host}:{port}/i", timeout=120) as r:
            assert r.read() == b"offline page\n"
    # Stopping the VM stopped publishing.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=10)


class _Resolver:
    """A DNS server on the host's loopback, port 53, answering A queries from ``names`` (any
    other name: NXDOMAIN)."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.asked: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind(("127.0.0.1", 53))
        except PermissionError:
            self.sock.close()
            pytest.skip("a DNS server on port 53 needs root")
        except OSError as e:
            self.sock.close()
            pytest.skip(f"port 53 on 127.0.0.1 is taken ({e.strerror}): no test resolver")
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.sock.recvfrom(512)
            except OSError:
                return
            reply = self._answer(query)
            if reply:
                self.sock.sendto(reply, peer)

    def _answer(self, query: bytes) -> bytes | None:
        if len(query) < 12:
            return None
        labels, pos = [], 12
        while pos < len(query) and query[pos]:
            labels.append(query[pos + 1 : pos + 1 + query[pos]].decode(errors="replace"))
            pos += 1 + query[pos]
        question = query[12 : pos + 5]
        qtype = struct.unpack("!H", query[pos + 1 : pos + 3])[0] if pos + 3 <= len(query) else 0
        name = ".".join(labels).lower()
        self.asked.append(name)
        address = self.names.get(name)
        if address is None or qtype != 1:
            flags = 0x8180 if address else 0x8183  # no records / NXDOMAIN
            return query[:2] + struct.pack("!HHHHH", flags, 1, 0, 0, 0) + question
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(address)
        return query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + question + answer

    def close(self) -> None:
        self.sock.close()


def test_a_clone_resolves_names_the_test_controls_and_domain_rules_apply(
    snapshot: Image, host_server: int
) -> None:
    """The guest asks a resolver on the host (``--dns host``). The policy refuses everything but
    ``*.allowed.test``: the host is reached by a name whose answer taught the VMM its address,
    not by one whose answer did not, and the answer for a denied name never reaches the guest."""
    resolver = _Resolver(
        {"other.test": GATEWAY, "www.allowed.test": GATEWAY, "www.blocked.test": "203.0.113.7"}
    )
    net = Network(dns_server="host", allow=("*.allowed.test",), deny=("0.0.0.0/0", "*.blocked.test"))
    try:
        with snapshot.start(network=net) as clone:
            script = (
                "cat /etc/resolv.conf; "
                # Resolved first (the first query after a restore waits for ARP and page faults),
                # so the refusal below is the policy's, not a slow lookup's.
                "nslookup other.test; "
                # nc, not wget: busybox wget dies of SIGSEGV when its -T timeout hits.
                f"nc -w 5 other.test {host_server} </dev/null; echo before=$?; "
                f"wget -qO- http://www.allowed.test:{host_server}/by-name; echo allowed=$?; "
                "nslookup www.blocked.test >/dev/null 2>&1; echo blocked=$?"
            )
            out = clone.exec(["sh", "-c", script], timeout=600)
            info = clone.network
    finally:
        resolver.close()
    text = out.stdout.decode()
    assert f"nameserver {GATEWAY}" in text, text
    assert f"Address: {GATEWAY}" in text or f"Address 1: {GATEWAY}" in text, text
    assert "\nbefore=1\n" in text, (text, out.stderr)
    assert "page for /by-name\nallowed=0" in text, (text, out.stderr)
    assert "\nblocked=1\n" in text, text
    assert {"other.test", "www.allowed.test", "www.blocked.test"} <= set(resolver.asked), resolver.asked
    assert info is not None and info.resolver == GATEWAY
    assert info.counters.dropped.get("deny 0.0.0.0/0", 0) >= 1, (info.counters.dropped, text, out.stderr)
    assert info.counters.dropped.get("dns answer", 0) >= 1, info.counters.dropped
