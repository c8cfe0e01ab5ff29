"""virtio-vsock: the test plays the guest driver in guest RAM (a tiny guest turns doorbells into
queue notifications) and the host side through the Unix socket protocol."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import vmm_guests as g

StartVm = Callable[..., Any]

QSIZE = 16
QUEUES = [(0x400000 + q * 0x10000, 0x401000 + q * 0x10000, 0x402000 + q * 0x10000) for q in range(3)]
RX, TX = 0, 1
RX_BUF, RX_BUF_LEN = 0x500000, 0x1000 + 44
TX_BUF = 0x600000
HDR = struct.Struct("<QQIIIHHIII")
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE = 1, 2, 3, 4, 5, 6
F_WRITE = 2
NEEDS_RESET = 0x40


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class Driver:
    """The guest side of virtio-vsock, written into guest RAM from the host."""

    def __init__(self, vm: Any) -> None:
        self.vm = vm
        self.doorbell = 0
        self.avail = [0, 0, 0]
        self.rx_seen = 0
        self.tx_next = 0
        base = vm.devices[0].mmio_base
        params = struct.pack("<QI4x", base, QSIZE) + b"".join(struct.pack("<QQQ", *q) for q in QUEUES)
        vm.write_memory(g.PARAMS + 8, params)
        vm.write_memory(g.PARAMS, struct.pack("<Q", 1))
        wait_for(lambda: vm.read_memory(g.RESULTS, 8) == struct.pack("<Q", 1), "device set-up")
        # All rx buffers made available up front.
        for i in range(QSIZE):
            self.desc(RX, i, RX_BUF + i * 0x2000, RX_BUF_LEN, F_WRITE)
            self.publish(RX, i)
        self.ring(RX)

    def status(self) -> int:
        """The device status register, as the guest would read it now."""
        return int(self.vm.device_status(0))

    def desc(self, q: int, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.vm.write_memory(QUEUES[q][0] + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, q: int, head: int) -> None:
        avail = QUEUES[q][1]
        self.vm.write_memory(avail + 4 + 2 * (self.avail[q] % QSIZE), struct.pack("<H", head))
        self.avail[q] += 1
        self.vm.write_memory(avail + 2, struct.pack("<H", self.avail[q] & 0xFFFF))

    def ring(self, q: int) -> None:
        self.vm.write_memory(g.PARAMS + 0x88, struct.pack("<I", q))
        self.doorbell += 1
        self.vm.write_memory(g.PARAMS + 0x80, struct.pack("<I", self.doorbell))
        wait_for(
            lambda: struct.unpack("<I", self.vm.read_memory(g.RESULTS + 0x10, 4))[0] == self.doorbell,
            "the guest to ring the doorbell",
        )

    def used_idx(self, q: int) -> int:
        return int(struct.unpack("<H", self.vm.read_memory(QUEUES[q][2] + 2, 2))[0])

    def send(self, op: int, src_port: int, dst_port: int, payload: bytes = b"", **kw: int) -> None:
        hdr = HDR.pack(
            kw.get("src_cid", 3),
            kw.get("dst_cid", 2),
            src_port,
            dst_port,
            kw.get("claimed_len", len(payload)),
            1,
            op,
            kw.get("flags", 0),
            kw.get("buf_alloc", 65536),
            kw.get("fwd_cnt", 0),
        )
        i = self.tx_next % QSIZE
        self.tx_next += 1
        addr = kw.get("addr", TX_BUF + i * 0x1000)
        if "addr" not in kw:
            self.vm.write_memory(addr, hdr + payload)
        self.desc(TX, i, addr, kw.get("length", len(hdr) + len(payload)))
        self.publish(TX, i)
        before = self.used_idx(TX)
        self.ring(TX)
        wait_for(lambda: self.used_idx(TX) > before or self.status() & NEEDS_RESET, "the packet to be taken")

    def recv(self) -> tuple[tuple[int, ...], bytes]:
        """The next packet the device put in an rx buffer (and gives the buffer back)."""
        wait_for(lambda: self.used_idx(RX) > self.rx_seen, "a packet for the guest")
        slot = self.rx_seen % QSIZE
        head, length = struct.unpack("<II", self.vm.read_memory(QUEUES[RX][2] + 4 + 8 * slot, 8))
        self.rx_seen += 1
        data = self.vm.read_memory(RX_BUF + head * 0x2000, length)
        fields = HDR.unpack(data[: HDR.size])
        assert fields[4] == length - HDR.size
        self.publish(RX, head)
        self.ring(RX)
        return fields, data[HDR.size :]


@pytest.fixture
def vsock_vm(start_vm: StartVm, tmp_path: Path) -> tuple[Any, Driver, Path]:
    # A jailed worker runs as an unprivileged uid: host listeners for guest-initiated
    # connections must be reachable by it (the directory searchable, the socket writable).
    tmp_path.chmod(0o711)
    path = tmp_path / "v.sock"
    vm = start_vm(g.VIRTIO_DOORBELL, vsock_path=str(path))
    assert vm.vsock_path == str(path)
    assert vm.devices[0].kind == "vsock"
    driver = Driver(vm)
    assert driver.status() == 0xF
    return vm, driver, path


def _listen_for_the_guest(server: socket.socket, path: str) -> None:
    server.bind(path)
    os.chmod(path, 0o666)


def test_host_connects_to_a_guest_port(vsock_vm: tuple[Any, Driver, Path]) -> None:
    vm, drv, path = vsock_vm
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(10)
    host.connect(str(path))
    host.sendall(b"CONNECT 52\n")
    (src_cid, dst_cid, src_port, dst_port, _len, typ, op, *_), _ = drv.recv()
    assert (src_cid, dst_cid, dst_port, typ, op) == (2, 3, 52, 1, OP_REQUEST)
    drv.send(OP_RESPONSE, 52, src_port)
    assert host.recv(64) == f"OK {src_port}\n".encode()

    host.sendall(b"ping")
    fields, payload = drv.recv()
    assert fields[6] == OP_RW and payload == b"ping"

    drv.send(OP_RW, 52, src_port, b"pong")
    assert host.recv(64) == b"pong"

    # Guest closes: the host sees EOF, the guest gets a reset.
    drv.send(OP_SHUTDOWN, 52, src_port, flags=3)
    assert host.recv(64) == b""
    fields, _ = drv.recv()
    assert fields[6] == OP_RST
    host.close()
    assert drv.status() == 0xF
    assert vm.outcome is None


def test_host_close_becomes_a_guest_shutdown(vsock_vm: tuple[Any, Driver, Path]) -> None:
    _vm, drv, path = vsock_vm
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(10)
    host.connect(str(path))
    host.sendall(b"CONNECT 7\n")
    fields, _ = drv.recv()
    host_port = fields[2]
    drv.send(OP_RESPONSE, 7, host_port)
    assert host.recv(64) == f"OK {host_port}\n".encode()
    host.close()
    fields, _ = drv.recv()
    assert (fields[6], fields[7]) == (OP_SHUTDOWN, 3)


def test_nothing_listening_in_the_guest_closes_the_host_socket(vsock_vm: tuple[Any, Driver, Path]) -> None:
    _vm, drv, path = vsock_vm
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(10)
    host.connect(str(path))
    host.sendall(b"CONNECT 99\n")
    fields, _ = drv.recv()
    drv.send(OP_RST, 99, fields[2])
    assert host.recv(64) == b""


def test_bad_connect_line_is_refused(vsock_vm: tuple[Any, Driver, Path]) -> None:
    _vm, _drv, path = vsock_vm
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(10)
    host.connect(str(path))
    host.sendall(b"HELLO there\n")
    assert host.recv(64).startswith(b"ERR")


def test_guest_connects_to_a_host_port(vsock_vm: tuple[Any, Driver, Path]) -> None:
    _vm, drv, path = vsock_vm
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _listen_for_the_guest(server, f"{path}_1234")
    server.listen(1)
    server.settimeout(10)
    drv.send(OP_REQUEST, 3000, 1234)
    fields, _ = drv.recv()
    assert (fields[2], fields[3], fields[6]) == (1234, 3000, OP_RESPONSE)
    conn, _ = server.accept()
    conn.settimeout(10)
    drv.send(OP_RW, 3000, 1234, b"from the guest")
    assert conn.recv(64) == b"from the guest"
    conn.sendall(b"from the host")
    fields, payload = drv.recv()
    assert fields[6] == OP_RW and payload == b"from the host"
    # No listener on another port: reset.
    drv.send(OP_REQUEST, 3001, 4321)
    fields, _ = drv.recv()
    assert fields[6] == OP_RST


def test_packets_for_unknown_connections_get_a_reset(vsock_vm: tuple[Any, Driver, Path]) -> None:
    _vm, drv, _path = vsock_vm
    drv.send(OP_RW, 5, 6, b"nobody")
    fields, _ = drv.recv()
    assert (fields[2], fields[3], fields[6]) == (6, 5, OP_RST)


@pytest.mark.parametrize(
    "kw",
    [{"addr": 0xDEAD0000}, {"length": 10}, {"claimed_len": 200_000}, {"claimed_len": 100}],
    ids=["outside-ram", "short-header", "oversized-payload", "payload-beyond-buffer"],
)
def test_malformed_tx_is_contained(vsock_vm: tuple[Any, Driver, Path], kw: dict[str, int]) -> None:
    vm, drv, _path = vsock_vm
    drv.send(OP_RW, 5, 6, b"x", **kw)
    assert drv.status() & NEEDS_RESET
    assert not vm.outcome  # (not `is None`: mypy would keep that narrowing past stop())
    vm.stop()
    assert vm.outcome.kind == "stopped"


def test_vsock_socket_is_removed_on_stop(vsock_vm: tuple[Any, Driver, Path]) -> None:
    vm, _drv, path = vsock_vm
    assert path.exists()
    vm.stop()
    assert not path.exists()


def test_a_socket_another_vm_listens_on_is_not_taken(
    vsock_vm: tuple[Any, Driver, Path], start_vm: Callable[..., Any]
) -> None:
    vm, _drv, path = vsock_vm
    with pytest.raises(OSError, match=r"vsock socket .* is in use \(by another VM\?\)"):
        start_vm(g.VIRTIO_DOORBELL, vsock_path=str(path))
    assert path.exists() and vm.outcome is None  # the first VM keeps its socket
    vm.stop()
    # A stale socket file (nobody listening) is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    other = start_vm(g.VIRTIO_DOORBELL, vsock_path=str(path))
    assert other.vsock_path == str(path)


# Mirrors of the device's limits (rust/src/devices/virtio/vsock.rs).
MAX_CONNECTIONS = 128  # MAX_CONNECTIONS
CONNECT_TIMEOUT = 5.0  # CONNECT_TIMEOUT, seconds
CLOSE_TIMEOUT = 5.0  # CLOSE_TIMEOUT, seconds


def vsock_thread_cpu_seconds() -> float:
    """CPU time (user + system) used so far by the VMM's vsock worker threads in this process."""
    ticks = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            if (task / "comm").read_text().strip() != "vsock":
                continue
            # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def open_host_connection(drv: Driver, path: Path, port: int) -> tuple[socket.socket, int]:
    """A host connection to guest `port` whose REQUEST the guest has received (not answered)."""
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(10)
    host.connect(str(path))
    host.sendall(f"CONNECT {port}\n".encode())
    fields, _ = drv.recv()
    assert (fields[3], fields[6]) == (port, OP_REQUEST)
    return host, int(fields[2])


@pytest.mark.parametrize("state", ["connecting", "closing"])
def test_a_host_hangup_the_guest_ignores_does_not_spin_the_device(
    vsock_vm: tuple[Any, Driver, Path], state: str
) -> None:
    """The host closes while the guest never answers (the REQUEST, or our SHUTDOWN): the worker
    must not keep waking up for the closed socket."""
    vm, drv, path = vsock_vm
    host, host_port = open_host_connection(drv, path, 52)
    if state == "closing":
        drv.send(OP_RESPONSE, 52, host_port)
        assert host.recv(64) == f"OK {host_port}\n".encode()
    host.close()
    before = vsock_thread_cpu_seconds()
    time.sleep(2)
    used = vsock_thread_cpu_seconds() - before
    assert used < 0.1, f"the vsock worker used {used:.2f} s of CPU in 2 s while idle"
    fields, _ = drv.recv()
    if state == "connecting":
        assert (fields[2], fields[6]) == (host_port, OP_RST)
    else:
        assert (fields[2], fields[6], fields[7]) == (host_port, OP_SHUTDOWN, 3)
    assert vm.outcome is None and drv.status() == 0xF


def test_a_host_connection_the_guest_never_answers_times_out(vsock_vm: tuple[Any, Driver, Path]) -> None:
    _vm, drv, path = vsock_vm
    host, host_port = open_host_connection(drv, path, 52)
    host.settimeout(CONNECT_TIMEOUT + 5)
    assert host.recv(64) == b"", "the host connection is closed"
    fields, _ = drv.recv()
    assert (fields[2], fields[3], fields[6]) == (host_port, 52, OP_RST)


def test_a_shutdown_the_guest_never_acknowledges_times_out(vsock_vm: tuple[Any, Driver, Path]) -> None:
    assert CLOSE_TIMEOUT < 10
    _vm, drv, path = vsock_vm
    host, host_port = open_host_connection(drv, path, 53)
    drv.send(OP_RESPONSE, 53, host_port)
    assert host.recv(64) == f"OK {host_port}\n".encode()
    host.close()
    fields, _ = drv.recv()
    assert (fields[6], fields[7]) == (OP_SHUTDOWN, 3)
    # The guest never sends its RST: the device gives up on its own (recv waits 10 s).
    fields, _ = drv.recv()
    assert (fields[2], fields[6]) == (host_port, OP_RST)


def test_the_guest_cannot_open_more_than_max_connections(vsock_vm: tuple[Any, Driver, Path]) -> None:
    _vm, drv, path = vsock_vm
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _listen_for_the_guest(server, f"{path}_1234")
    server.listen(MAX_CONNECTIONS * 2)
    for i in range(MAX_CONNECTIONS):
        drv.send(OP_REQUEST, 3000 + i, 1234)
        fields, _ = drv.recv()
        assert (fields[3], fields[6]) == (3000 + i, OP_RESPONSE)
    drv.send(OP_REQUEST, 9999, 1234)
    fields, _ = drv.recv()
    assert (fields[3], fields[6]) == (9999, OP_RST)
    # The host cannot get in either while the guest holds every connection.
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(10)
    host.connect(str(path))
    assert host.recv(64) == b""
    # A connection the guest gives up makes room again.
    drv.send(OP_RST, 3000, 1234)
    drv.send(OP_REQUEST, 9999, 1234)
    fields, _ = drv.recv()
    assert (fields[3], fields[6]) == (9999, OP_RESPONSE)
    server.close()
