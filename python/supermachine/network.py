"""A microVM's network: one virtio-net card, a user-mode backend, and an egress policy.

::

    from supermachine.network import Network, PortMapping

    net = Network(allow=("host",), ports=(PortMapping.parse("8080:80"),))
    with image.start(network=net) as vm:
        vm.exec(["wget", "-qO-", "http://host.supermachine.internal:8000/"])
        vm.network.counters.dropped        # frames the policy refused, by rule

Each VM with a network gets its own ``passt`` process (user mode: no root, no TAP device),
started here in the host's network namespace and joined to the VMM's card by a socket pair: no
socket path exists that another process could reach first. The guest sees a private /24:

- ``10.0.2.2`` is the host: passt maps it to the host's loopback (``host.supermachine.internal``
  in the guest's ``/etc/hosts``);
- ``10.0.2.3`` is the DNS resolver: passt forwards queries to the host's resolver (or the
  guest is given ``Network(dns_server=...)`` instead);
- the guest's own address and MAC are chosen per VM, so clones of one snapshot differ.

The policy is enforced by the VMM on every frame the guest sends, outside the guest's reach:
private, loopback, link-local (cloud metadata) and other special ranges are refused unless a rule
allows them (the host too: allow ``"host"`` to reach it), and the most specific matching rule
wins. Refused frames are counted per rule (:attr:`NetworkInfo.counters`).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from supermachine.errors import NetworkError
from supermachine.worker import IoLimit

__all__ = [
    "DNS_RESOLVER",
    "GATEWAY",
    "HOST_NAME",
    "Network",
    "NetworkCounters",
    "NetworkInfo",
    "NetworkMode",
    "PortMapping",
]

NetworkMode = Literal["egress", "none"]

SUBNET = ipaddress.IPv4Network("10.0.2.0/24")
GATEWAY = "10.0.2.2"
"""The guest's gateway, which passt maps to the host's loopback."""
DNS_RESOLVER = "10.0.2.3"
"""The guest's DNS resolver, which passt forwards to the host's resolver."""
HOST_ALIAS = "host"
"""In an allow or deny list: the host (its loopback, reached at :data:`GATEWAY`)."""
HOST_NAME = "host.supermachine.internal"
"""The host's name in every guest's ``/etc/hosts``."""
MTU = 1500
MAX_RULES = 256
MAX_PORTS = 64
MAX_HOSTS = 64
_FIRST_GUEST_HOST = 15  # 10.0.2.15, as QEMU's user networking; later VMs count up from there
_GUEST_HOSTS = range(_FIRST_GUEST_HOST, 255)
_next_guest = itertools.count()
_next_guest_lock = threading.Lock()
# MAC tails are this process's random start plus its VM count: distinct for 2**24 VMs of one
# process (24 random bits per VM collide at 300 VMs about once in 370 runs), random across processes.
_MAC_TAIL_BITS = 24
_mac_tail_base = int.from_bytes(os.urandom(3), "big")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
PASST_STOP_TIMEOUT = 2.0


def _domain_ok(name: str) -> bool:
    name = name.lower().rstrip(".")
    labels = name.split(".")
    return 0 < len(name) <= 253 and len(labels) >= 1 and all(_LABEL.fullmatch(label) for label in labels)


def _check_target(target: str, what: str) -> str:
    """A rule target: ``host``, an IPv4 address or network, a domain or ``*.domain``."""
    if target == HOST_ALIAS:
        return target
    if target and (target[0].isdigit()) and not any(c.isalpha() for c in target.split("/")[0]):
        try:
            return str(ipaddress.IPv4Network(target, strict=False))
        except ValueError as exc:
            raise NetworkError(f"{what} {target!r} is not an IPv4 address or network: {exc}") from None
    if ":" in target:
        raise NetworkError(f"{what} {target!r}: only IPv4 networks are supported (the guest has no IPv6)")
    pattern = target[2:] if target.startswith("*.") else target
    if not _domain_ok(pattern):
        raise NetworkError(f"{what} {target!r} is neither an IPv4 network nor a domain name (or *.domain)")
    return target.lower().rstrip(".")


def _unicast_ipv4(value: str, what: str) -> None:
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise NetworkError(f"{what} {value!r} is not an IPv4 address (or host)") from None
    if address.is_unspecified or address.is_multicast or address == ipaddress.IPv4Address("255.255.255.255"):
        raise NetworkError(f"{what} {value} is not a unicast address")
    if address.is_loopback:
        raise NetworkError(f"{what} {value} is the guest's own loopback: use 'host' for the host's")


def _is_domain(target: str) -> bool:
    checked = _check_target(target, "rule")
    return checked != HOST_ALIAS and not checked[0].isdigit()


@dataclass(frozen=True)
class PortMapping:
    """A host port forwarded to a guest port (``docker run -p``)."""

    host_port: int
    guest_port: int
    host_ip: str = "127.0.0.1"
    """The host address to listen on; loopback unless asked otherwise (``0.0.0.0``: every one)."""
    protocol: Literal["tcp", "udp"] = "tcp"

    @classmethod
    def parse(cls, spec: str) -> PortMapping:
        """``[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]``, as ``docker run -p`` takes it."""
        body, _, proto = spec.partition("/")
        proto = proto or "tcp"
        if proto not in ("tcp", "udp"):
            raise NetworkError(f"port mapping {spec!r}: the protocol must be tcp or udp, not {proto!r}")
        parts = body.split(":")
        if len(parts) == 2:
            host_ip, host, guest = "127.0.0.1", parts[0], parts[1]
        elif len(parts) == 3:
            host_ip, host, guest = parts
        else:
            raise NetworkError(f"port mapping {spec!r} is not [HOST_IP:]HOST_PORT:GUEST_PORT")
        if not (host.isdigit() and guest.isdigit()):
            raise NetworkError(f"port mapping {spec!r}: ports must be numbers")
        mapping = cls(int(host), int(guest), host_ip, proto)  # type: ignore[arg-type]
        return mapping.validated()

    def validated(self) -> PortMapping:
        for port, what in ((self.host_port, "host"), (self.guest_port, "guest")):
            if not 1 <= port <= 65535:
                raise NetworkError(f"the {what} port {port} is not between 1 and 65535")
        try:
            ipaddress.IPv4Address(self.host_ip)
        except ValueError:
            raise NetworkError(f"the host address {self.host_ip!r} is not an IPv4 address") from None
        if self.protocol not in ("tcp", "udp"):
            raise NetworkError(f"the protocol must be tcp or udp, not {self.protocol!r}")
        return self

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}->{self.guest_port}/{self.protocol}"

    def passt_spec(self) -> str:
        # passt: an address before '/', then the host port, then ':' and the guest port.
        return f"{self.host_ip}/{self.host_port}:{self.guest_port}"


@dataclass(frozen=True)
class Network:
    """A VM's network. The default is docker's: outbound connections to the internet allowed,
    nothing published. ``Network(mode="none")`` (or ``network="none"``) gives the VM no card."""

    mode: NetworkMode = "egress"
    allow: tuple[str, ...] = ()
    """Destinations allowed even inside the ranges denied by default: IPv4 addresses or networks
    (``10.1.0.0/16``), ``host`` (the host's loopback), domain names (``example.com``,
    ``*.example.com``: the addresses the guest's DNS answers give for them)."""
    deny: tuple[str, ...] = ()
    """Destinations refused, in the same forms; ``0.0.0.0/0`` refuses everything not allowed."""
    ports: tuple[PortMapping, ...] = ()
    """Host ports forwarded to guest ports (``-p``)."""
    hosts: Mapping[str, str] = field(default_factory=dict)
    """Extra ``/etc/hosts`` entries of the guest, name to IPv4 address (``host`` for the host)."""
    dns: bool = True
    """Give the guest a DNS resolver (by default :data:`DNS_RESOLVER`)."""
    dns_server: str | None = None
    """The resolver the guest uses instead of :data:`DNS_RESOLVER` (docker's ``--dns``): an IPv4
    address, or ``host`` for a resolver on the host's loopback (port 53). Its answers are checked
    against the domain rules like the default resolver's, and port 53 of it is reachable even
    where the policy denies the address (the host is denied by default)."""
    tx_limit: IoLimit | None = None
    """Rate limit of what the guest sends (bytes and frames per second)."""
    rx_limit: IoLimit | None = None
    """Rate limit of what the guest receives."""

    @classmethod
    def of(cls, value: Network | NetworkMode | None) -> Network:
        """``network=`` as the API takes it: a :class:`Network`, ``"egress"``, ``"none"``."""
        if value is None:
            return cls()
        if isinstance(value, Network):
            return value.validated()
        if value in ("egress", "none"):
            return cls(mode=value)
        raise NetworkError(f"network must be 'egress', 'none' or a Network, got {value!r}")

    def validated(self) -> Network:
        if self.mode not in ("egress", "none"):
            raise NetworkError(f"network mode must be 'egress' or 'none', got {self.mode!r}")
        if len(self.allow) + len(self.deny) > MAX_RULES:
            raise NetworkError(f"at most {MAX_RULES} allow and deny rules are supported")
        for target in self.allow:
            _check_target(target, "allow rule")
        for target in self.deny:
            _check_target(target, "deny rule")
        if len(self.ports) > MAX_PORTS:
            raise NetworkError(f"at most {MAX_PORTS} published ports are supported")
        seen: set[tuple[str, int, str]] = set()
        for p in self.ports:
            p.validated()
            key = (p.host_ip, p.host_port, p.protocol)
            if key in seen:
                raise NetworkError(f"host port {p.host_ip}:{p.host_port}/{p.protocol} is published twice")
            seen.add(key)
        if len(self.hosts) > MAX_HOSTS:
            raise NetworkError(f"at most {MAX_HOSTS} extra hosts entries are supported")
        for name, address in self.hosts.items():
            if not _domain_ok(name):
                raise NetworkError(f"hosts entry {name!r} is not a host name")
            if address != HOST_ALIAS:
                try:
                    ipaddress.IPv4Address(address)
                except ValueError:
                    raise NetworkError(f"hosts entry {name}: {address!r} is not an IPv4 address") from None
        if self.dns_server is not None:
            if not self.dns:
                raise NetworkError("a DNS server was given but dns=False gives the guest no resolver")
            if self.dns_server != HOST_ALIAS:
                _unicast_ipv4(self.dns_server, "the DNS server")
        domains = [t for t in (*self.allow, *self.deny) if _is_domain(t)]
        if domains and not self.dns:
            raise NetworkError(
                f"domain rules ({domains[0]}) need the DNS resolver (dns=True): their addresses are "
                "learned from its answers"
            )
        if self.mode == "none" and (self.ports or self.allow):
            raise NetworkError("a VM without a network cannot publish ports or allow destinations")
        if self.mode == "none" and self.dns_server is not None:
            raise NetworkError("a VM without a network has no resolver: --dns needs --network egress")
        return self

    def resolver(self) -> str | None:
        """The address of the guest's DNS resolver (``None``: the guest gets none)."""
        if self.mode == "none" or not self.dns:
            return None
        if self.dns_server is None:
            return DNS_RESOLVER
        return GATEWAY if self.dns_server == HOST_ALIAS else self.dns_server

    def rules(self) -> list[dict[str, str]]:
        """The policy's rules as the VMM takes them (``host`` resolved to the gateway)."""

        def target(t: str, what: str) -> str:
            t = _check_target(t, what)
            return f"{GATEWAY}/32" if t == HOST_ALIAS else t

        return [{"action": "allow", "target": target(t, "allow rule")} for t in self.allow] + [
            {"action": "deny", "target": target(t, "deny rule")} for t in self.deny
        ]

    def policy(self) -> dict[str, object]:
        """The egress policy as the VMM takes it. ``none`` on a card that must exist (a restored
        snapshot had one) refuses every destination."""
        if self.mode == "none":
            return {"rules": [], "dns": None, "default_action": "deny"}
        return {
            "rules": self.rules(),
            "dns": self.resolver(),
            "default_action": "allow",
            # The guest may answer connections made to these ports (they come from the gateway).
            "published_tcp": sorted({p.guest_port for p in self.ports if p.protocol == "tcp"}),
            "published_udp": sorted({p.guest_port for p in self.ports if p.protocol == "udp"}),
        }

    def guest_hosts(self) -> dict[str, list[str]]:
        """``/etc/hosts`` entries: the host's name, then the caller's (address to names)."""
        entries: dict[str, list[str]] = {GATEWAY: [HOST_NAME]}
        for name, address in self.hosts.items():
            ip = GATEWAY if address == HOST_ALIAS else address
            entries.setdefault(ip, []).append(name)
        return entries


@dataclass(frozen=True)
class Identity:
    """A VM's own addresses on its private network."""

    mac: str
    address: str

    @classmethod
    def new(cls) -> Identity:
        """A fresh identity: the next guest address of this process (cycling through the /24) and
        a locally administered unicast MAC no other VM of this process has."""
        with _next_guest_lock:
            n = next(_next_guest)
        host = _GUEST_HOSTS[n % len(_GUEST_HOSTS)]
        tail = ((_mac_tail_base + n) % (1 << _MAC_TAIL_BITS)).to_bytes(3, "big")
        mac = ":".join(f"{b:02x}" for b in (0x02, 0x53, 0x4D, *tail))
        return cls(mac=mac, address=str(SUBNET.network_address + host))

    def mac_bytes(self) -> list[int]:
        return [int(x, 16) for x in self.mac.split(":")]


@dataclass(frozen=True)
class NetworkCounters:
    """What a VM's card counted since it was built (or restored)."""

    sent_frames: int
    sent_bytes: int
    received_frames: int
    received_bytes: int
    dropped: Mapping[str, int]
    """Frames refused, by reason: ``allow``/``deny`` rules by their text (``deny 10.0.0.0/8``),
    built-in ranges by name (``private 10.0.0.0/8``), ``malformed``, ``not ipv4``, ``default``
    (everything else refused with ``0.0.0.0/0``-style policies), ``dns answer`` (an answer for
    a denied name), and the card's own: ``malformed chain``, ``backend gone``, ``oversized``,
    ``no room``. Only non-zero counts are listed."""
    backend_connected: bool

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


@dataclass(frozen=True)
class NetworkInfo:
    """What :attr:`Vm.network <supermachine.vm.Vm.network>` reports."""

    mode: NetworkMode
    mac: str
    address: str
    prefix: int
    gateway: str
    resolver: str | None
    ports: tuple[PortMapping, ...]
    counters: NetworkCounters


def counters_from_json(text: str, network: Network, builtin: Sequence[tuple[str, str]]) -> NetworkCounters:
    """The VMM's counters (JSON) in the terms of ``network``'s rules."""
    raw = json.loads(text)
    f = raw.get("filter", {})
    dropped: dict[str, int] = {}

    def add(name: str, count: object) -> None:
        if isinstance(count, int) and count > 0:
            dropped[name] = dropped.get(name, 0) + count

    rules = network.rules() if network.mode != "none" else []
    for rule, count in zip(rules, f.get("dropped_by_rule", []), strict=False):
        add(f"{rule['action']} {rule['target']}", count)
    for (name, cidr), count in zip(builtin, f.get("dropped_builtin", []), strict=False):
        add(f"{name} {cidr}", count)
    add("malformed", f.get("dropped_malformed", 0))
    add("not ipv4", f.get("dropped_not_ipv4", 0))
    add("default", f.get("dropped_default", 0))
    add("dns answer", f.get("dropped_dns_answers", 0))
    add("malformed chain", raw.get("tx_malformed", 0))
    add("backend gone", raw.get("tx_backend_gone", 0))
    add("oversized", raw.get("rx_oversized", 0))
    add("no room", raw.get("rx_no_room", 0))

    def num(key: str) -> int:
        v = f.get(key, 0)
        return v if isinstance(v, int) else 0

    return NetworkCounters(
        sent_frames=num("passed_out_frames"),
        sent_bytes=num("passed_out_bytes"),
        received_frames=num("passed_in_frames"),
        received_bytes=num("passed_in_bytes"),
        dropped=dropped,
        backend_connected=bool(raw.get("backend_connected", False)),
    )


def passt_path() -> str:
    """The ``passt`` executable, or :class:`NetworkError` saying how to get one."""
    found = shutil.which("passt")
    if found is None:
        raise NetworkError(
            "networking needs passt, which is not installed (Debian/Ubuntu: apt install passt); "
            "or start the VM with network='none'"
        )
    return found


class Backend:
    """One VM's passt process and the VMM's end of the socket pair that joins them."""

    def __init__(self, network: Network, identity: Identity, runtime_dir: Path) -> None:
        self.network = network
        self.identity = identity
        self.log_path = runtime_dir / "passt.log"
        vmm_end, passt_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._vmm_end: socket.socket | None = vmm_end
        try:
            argv = self._argv(passt_end.fileno())
            with open(self.log_path, "wb") as log:
                self._process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=(passt_end.fileno(),),
                    close_fds=True,
                    start_new_session=True,
                )
        except OSError as exc:
            vmm_end.close()
            raise NetworkError(f"cannot start passt: {exc.strerror or exc}") from None
        finally:
            passt_end.close()

    def _argv(self, fd: int) -> list[str]:
        argv = [
            passt_path(),
            "--foreground",
            "--quiet",
            "--one-off",
            "--ipv4-only",
            "--fd",
            str(fd),
            "--address",
            self.identity.address,
            "--netmask",
            str(SUBNET.prefixlen),
            "--gateway",
            GATEWAY,
            "--mtu",
            str(MTU),
            "--no-dhcp",
            "--no-ndp",
            "--no-dhcpv6",
            "--no-ra",
        ]
        if self.network.resolver() == DNS_RESOLVER:
            argv += ["--dns-forward", DNS_RESOLVER]
        tcp = [p.passt_spec() for p in self.network.ports if p.protocol == "tcp"]
        udp = [p.passt_spec() for p in self.network.ports if p.protocol == "udp"]
        for spec in tcp:
            argv += ["--tcp-ports", spec]
        for spec in udp:
            argv += ["--udp-ports", spec]
        if not tcp:
            argv += ["--tcp-ports", "none"]
        if not udp:
            argv += ["--udp-ports", "none"]
        return argv

    def vmm_fd(self) -> int:
        """The VMM's end of the socket pair (valid until :meth:`handed_over`)."""
        assert self._vmm_end is not None
        return self._vmm_end.fileno()

    def handed_over(self) -> None:
        """The VMM holds its own copy now: close this process's."""
        if self._vmm_end is not None:
            self._vmm_end.close()
            self._vmm_end = None

    def check_alive(self) -> None:
        """Raises :class:`NetworkError` with passt's own words if it has exited (a published port
        that is in use, for instance)."""
        code = self._process.poll()
        if code is None:
            return
        raise NetworkError(f"the network backend (passt) exited with status {code}: {self.last_words()}")

    def last_words(self) -> str:
        try:
            text = self.log_path.read_bytes()[-4096:].decode(errors="replace")
        except OSError:
            return "(no log)"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "syslog" not in ln]
        return lines[-1] if lines else "(no log)"

    def stop(self) -> None:
        """Ends passt (it also ends by itself when the VMM closes its end). Idempotent."""
        self.handed_over()
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(PASST_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def core_config(network: Network, identity: Identity) -> str:
    """The VMM's network configuration (JSON) for ``network`` with ``identity``."""
    limit: dict[str, object] = {}
    if network.tx_limit is not None:
        limit["tx"] = network.tx_limit.as_core()
    if network.rx_limit is not None:
        limit["rx"] = network.rx_limit.as_core()
    return json.dumps({"mac": identity.mac_bytes(), "policy": network.policy(), "rate_limit": limit})
