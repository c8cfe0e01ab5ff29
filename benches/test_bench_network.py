"""Guest networking: supermachine's VMM vs QEMU microvm, both on passt, in the same run.

Both peers boot the very same guest kernel, agent initramfs and busybox squashfs root with the
same memory, and each gets its own ``passt`` started by the library's own backend code (the same
arguments, joined to the VMM by a socket pair: QEMU takes its end as ``-netdev stream`` with
``addr.type=fd``). The guest's card is configured identically through the agent's ``net`` request
(same address, prefix, gateway, resolver, MTU; each VM its own MAC). supermachine's card also
runs every sent frame through its egress filter (``allow=("host",)``), which QEMU does not have.
QEMU reaches the agent over vsock: vhost-vsock where the host kernel has it, else the vhost-user
backend ``vhost-device-vsock`` (``cargo install vhost-device-vsock``); that channel only carries the
agent's requests, and its daemon's CPU is not counted.

Measured per round, the peers in rotating order (the timed unit is one whole round, VM boots are
outside it for both):

1. guest to host: the guest sends ``SEND_KIB`` of zeros with ``nc`` to a sink on the host's
   loopback (reached at the gateway address); timed at the sink from accept to end of stream.
2. host to guest: the guest fetches ``RECV_KIB`` with ``wget`` from a server on the host's
   loopback; timed at the server from accept until the guest closed after the last byte.
3. round trips: the guest opens one connection and echoes (``nc -e cat``); the host sends
   ``ECHO_BYTES`` and waits for them back, ``ECHO_COUNT`` times; median round trip.
4. host CPU per GB moved in 1 and 2: utime + stime of the VMM process (supermachine's worker,
   ``vm.pid``; QEMU) and of its passt, over the span of the guest command, divided by the bytes
   moved. Also split: the VMM's vCPU threads, and the rest of the VMM (device and I/O threads).

Each peer's median, min and max and the per-round ratio supermachine / QEMU (median, min, max)
go to ``extra_info`` and are printed (run with ``-s``).

On hosts whose KVM emulates guest kernel code (kvm_pvm) the guest kernel's TCP stack runs at a
few million instructions per second, so throughput and round trips are dominated by that
emulation for both peers, and the vCPU threads' CPU time (which includes the emulation) says
nothing about hardware KVM. The meaningful figures there are the host-side CPU per GB of the
non-vCPU VMM threads and of passt.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from conftest import busybox_squashfs, skip_unless_kvm
from supermachine import initramfs, kernel
from supermachine.agent import AgentClient, ExecResult, connect_vsock_uds
from supermachine.errors import AgentUnreachable
from supermachine.network import DNS_RESOLVER, GATEWAY, MTU, SUBNET, Backend, Identity, Network
from supermachine.vm import Vm, VmConfig

SEND_KIB = 512
"""Guest to host. Kept short: on hosts that emulate guest kernel code the guest sends about
40 KB/s, and passt (2023-03) resets a guest-to-host connection after about 24 s (QEMU's too)."""
RECV_KIB = 4096
ECHO_COUNT = 50
ECHO_BYTES = 64
ROUNDS = 3
MEMORY_MIB = 256
BOOT_TIMEOUT = 600.0
COMMAND_TIMEOUT = 300.0
SERVER_TIMEOUT = COMMAND_TIMEOUT + 30
PATH_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
NETWORK = Network(allow=("host",))
"""Outbound connections allowed, the host included (denied by default)."""
PEERS = ("supermachine", "qemu")
EMULATING = os.path.exists("/sys/module/kvm_pvm")
NOTE = (
    "guest kernel emulated on this host (kvm_pvm): throughput, round trips and vCPU CPU are "
    "dominated by the emulation; host CPU per GB of the non-vCPU VMM threads and passt is meaningful"
    if EMULATING
    else "hardware KVM"
)
COMPAT_ARGS = (
    "noxsave clearcpuid=smap,smep,pku,ospke,fsgsbase,rdpid,rdrand,rdseed,popcnt,serialize,pcid,"
    "invpcid,cx16,movbe,bmi1,bmi2,erms,fsrm,la57,waitpkg,movdiri,movdir64b,clflushopt,clwb"
)
CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet sm.root=/dev/vda sm.rootfstype=squashfs"
"""What supermachine's ``Vm`` passes for a squashfs root (its VMM adds its devices itself)."""
VSOCK_CID = 3


# -- host-side CPU accounting ---------------------------------------------------------------------


def _is_vcpu_thread(name: str) -> bool:
    # supermachine names them vcpu0, vcpu1...; QEMU "CPU 0/KVM".
    return name.startswith("vcpu") or (name.startswith("CPU ") and name.endswith("/KVM"))


@dataclass(frozen=True)
class Cpu:
    """CPU seconds a VM's host processes used so far."""

    vmm: float
    vcpus: float
    passt: float

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.vmm - other.vmm, self.vcpus - other.vcpus, self.passt - other.passt)


def _process_cpu(pid: int) -> tuple[float, float]:
    """A process's CPU seconds over its live threads, and its vCPU threads' share.

    From each thread's ``schedstat`` (nanoseconds on a CPU), not ``stat`` (clock ticks of 10 ms,
    too coarse for the host side of a few MiB). Every thread counted here lives as long as the VM.
    """
    total = vcpus = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            seconds = int((task / "schedstat").read_text().split()[0]) / 1e9
            name = (task / "comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread just ended
        total += seconds
        if _is_vcpu_thread(name):
            vcpus += seconds
    return total, vcpus


def _children() -> set[int]:
    found: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        found.update(int(p) for p in (task / "children").read_text().split())
    return found


def _new_passt(before: set[int]) -> int:
    """The passt this process started since ``before`` (its set of children) was taken."""
    # Debian's passt re-executes itself as passt.avx2 where the CPU has AVX2; until then its
    # name is still the starter's, so wait for it a moment.
    deadline = time.monotonic() + 10
    while True:
        started = [p for p in _children() - before if _comm(p).startswith("passt")]
        if len(started) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(started) == 1, f"expected one new passt child, found {started}"
    return started[0]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text()
    except FileNotFoundError:
        return ""


# -- the two peers --------------------------------------------------------------------------------


class Peer(Protocol):
    name: str

    def exec(self, script: str) -> ExecResult: ...

    def cpu(self) -> Cpu: ...


class SupermachinePeer:
    name = "supermachine"

    def __init__(self, workdir: Path, rootfs: Path, vmlinux: Path, initrd: Path) -> None:
        before = _children()
        self.vm = Vm.start(
            VmConfig(
                rootfs=rootfs,
                kernel=vmlinux,
                initramfs=initrd,
                memory_mib=MEMORY_MIB,
                network=NETWORK,
                boot_timeout=BOOT_TIMEOUT,
                console_log=workdir / "console.log",
            )
        )
        assert self.vm.pid is not None, "the benchmark measures the worker process"
        self.pid = self.vm.pid
        self.passt = _new_passt(before)

    def exec(self, script: str) -> ExecResult:
        return self.vm.exec(["sh", "-c", script], env=PATH_ENV, replace_env=True, timeout=COMMAND_TIMEOUT)

    def cpu(self) -> Cpu:
        total, vcpus = _process_cpu(self.pid)
        return Cpu(total, vcpus, _process_cpu(self.passt)[0])

    def close(self) -> None:
        self.vm.stop()


class QemuPeer:
    """QEMU microvm with the same guest, its card on a passt that the library's own backend code
    starts (same arguments as supermachine's), the agent reached over vsock."""

    name = "qemu"

    def __init__(self, workdir: Path, rootfs: Path, vmlinux: Path, initrd: Path, address: str) -> None:
        self.workdir = workdir
        self.processes: list[subprocess.Popen[bytes]] = []
        # Same address as supermachine's guest (each has its own passt), a MAC of its own.
        self.identity = Identity(mac=Identity.new().mac, address=address)
        before = _children()
        self.backend = Backend(NETWORK, self.identity, workdir)
        try:
            self.passt = _new_passt(before)
            self._connect = self._start_vsock()
            self.qemu = self._start_qemu(rootfs, vmlinux, initrd)
            self.pid = self.qemu.pid
            with self._wait_for_agent() as agent:
                agent.configure_network(
                    mac=self.identity.mac,
                    address=self.identity.address,
                    prefix=SUBNET.prefixlen,
                    gateway=GATEWAY,
                    dns=[DNS_RESOLVER],
                    hosts=NETWORK.guest_hosts(),
                    mtu=MTU,
                )
        except BaseException:
            self.close()
            raise

    def _start_vsock(self) -> Callable[[float], AgentClient]:
        """The guest's vsock device options, and how to reach its agent."""
        if os.access("/dev/vhost-vsock", os.R_OK | os.W_OK) and hasattr(socket, "AF_VSOCK"):
            self.vsock_args = ["-device", f"vhost-vsock-device,guest-cid={VSOCK_CID}"]

            def connect_kernel(timeout: float) -> AgentClient:
                sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                try:
                    sock.connect((VSOCK_CID, 1024))
                except OSError:
                    sock.close()
                    raise
                return AgentClient(sock, timeout=timeout)

            return connect_kernel
        tool = shutil.which("vhost-device-vsock")
        assert tool is not None  # checked by the fixture
        control, uds = self.workdir / "vhost-user.sock", self.workdir / "vsock.sock"
        with (self.workdir / "vhost-device-vsock.log").open("wb") as log:
            daemon = subprocess.Popen(
                [tool, "--guest-cid", str(VSOCK_CID), "--socket", str(control), "--uds-path", str(uds)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.processes.append(daemon)
        deadline = time.monotonic() + 10
        while not control.exists():
            assert daemon.poll() is None, "vhost-device-vsock exited"
            assert time.monotonic() < deadline, "vhost-device-vsock did not create its socket"
            time.sleep(0.01)
        # vhost-user needs guest memory the backend can map: a shared memfd of the same size.
        self.vsock_args = [
            "-object", f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
            "-chardev", f"socket,id=vsock,path={control}",
            "-device", "vhost-user-vsock-device,chardev=vsock",
        ]  # fmt: skip
        return lambda timeout: connect_vsock_uds(uds, timeout=timeout)

    def _start_qemu(self, rootfs: Path, vmlinux: Path, initrd: Path) -> subprocess.Popen[bytes]:
        compat = kernel.default_profile() == "compat"
        cpu = "host,vendor=GenuineIntel,-arch-capabilities" if compat else "host"
        machine = "microvm,x-option-roms=off,rtc=off,acpi=off"
        if "memory-backend-memfd" in self.vsock_args[1]:
            machine += ",memory-backend=mem"
        fd = self.backend.vmm_fd()
        cmd = [
            "qemu-system-x86_64", "-M", machine, "-enable-kvm", "-cpu", cpu,
            "-name", "bench,debug-threads=on",  # names the vCPU threads "CPU 0/KVM"
            "-smp", "1", "-m", str(MEMORY_MIB), "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-kernel", str(vmlinux), "-initrd", str(initrd),
            "-append", f"{CMDLINE} {COMPAT_ARGS}" if compat else CMDLINE,
            "-drive", f"id=root,file={rootfs},format=raw,if=none,readonly=on",
            "-device", "virtio-blk-device,drive=root",
            "-netdev", f"stream,id=net,server=off,addr.type=fd,addr.str={fd}",
            "-device", f"virtio-net-device,netdev=net,mac={self.identity.mac}",
            *self.vsock_args,
        ]  # fmt: skip
        with (self.workdir / "console.log").open("wb") as console:
            process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, pass_fds=(fd,)
            )
        self.processes.insert(0, process)
        self.backend.handed_over()
        return process

    def _wait_for_agent(self) -> AgentClient:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            if self.qemu.poll() is not None:
                raise RuntimeError(f"qemu ended while booting: {self.console_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no agent within {BOOT_TIMEOUT:g} s: {self.console_tail()}")
            try:
                return self._connect(2.0)
            except (OSError, AgentUnreachable):  # not listening yet
                time.sleep(0.5)

    def console_tail(self) -> str:
        return (self.workdir / "console.log").read_text(errors="replace")[-2000:]

    def exec(self, script: str) -> ExecResult:
        with self._connect(30.0) as agent:
            return agent.exec(["sh", "-c", script], env=PATH_ENV, timeout=COMMAND_TIMEOUT)

    def cpu(self) -> Cpu:
        total, vcpus = _process_cpu(self.pid)
        return Cpu(total, vcpus, _process_cpu(self.passt)[0])

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        self.backend.stop()


# -- the host's ends ------------------------------------------------------------------------------


class Server:
    """A loopback listener whose one connection ``handler`` serves on a thread."""

    def __init__(self, handler: Callable[[socket.socket], Any]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(SERVER_TIMEOUT)
        self.port = self.sock.getsockname()[1]
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(handler,), daemon=True)
        self.thread.start()

    def _run(self, handler: Callable[[socket.socket], Any]) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(SERVER_TIMEOUT)
                self.result = handler(conn)
        except BaseException as exc:
            self.error = exc

    def wait(self) -> Any:
        self.thread.join(SERVER_TIMEOUT)
        self.sock.close()
        assert not self.thread.is_alive(), "the host end did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def _sink(conn: socket.socket) -> tuple[int, float]:
    """Reads to the end: (bytes, seconds from accept to end of stream)."""
    started = time.perf_counter()
    received = 0
    buf = bytearray(1 << 20)
    while n := conn.recv_into(buf):
        received += n
    return received, time.perf_counter() - started


ZEROS = bytes(1 << 20)


def _http_source(size: int) -> Callable[[socket.socket], tuple[int, float]]:
    def serve(conn: socket.socket) -> tuple[int, float]:
        """Answers one GET with ``size`` bytes, then waits until the guest closes: (bytes,
        seconds from accept until the guest had them all)."""
        started = time.perf_counter()
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            assert chunk and len(request) < 8192, f"bad request {request!r}"
            request += chunk
        conn.sendall(f"HTTP/1.0 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        for offset in range(0, size, len(ZEROS)):
            conn.sendall(ZEROS[: min(len(ZEROS), size - offset)])
        while conn.recv(4096):
            pass
        return size, time.perf_counter() - started

    return serve


def _echo(conn: socket.socket) -> list[float]:
    """``ECHO_COUNT`` round trips of ``ECHO_BYTES``: their times in seconds."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    message = bytes(range(ECHO_BYTES))
    times = []
    for _ in range(ECHO_COUNT):
        started = time.perf_counter()
        conn.sendall(message)
        got = b""
        while len(got) < ECHO_BYTES:
            chunk = conn.recv(ECHO_BYTES - len(got))
            assert chunk, "the guest closed the echo connection"
            got += chunk
        times.append(time.perf_counter() - started)
        assert got == message
    return times


# -- one round ------------------------------------------------------------------------------------

GB = 1e9


@dataclass
class Samples:
    """Per peer, per metric: one value per recorded round."""

    values: dict[str, dict[str, list[float]]]

    def add(self, peer: str, metric: str, value: float) -> None:
        self.values.setdefault(metric, {p: [] for p in PEERS})[peer].append(value)


def _transfer(peer: Peer, server: Server, script: str, size: int, samples: Samples | None, key: str) -> None:
    before = peer.cpu()
    result = peer.exec(script)
    used = peer.cpu() - before
    assert result.returncode == 0, f"{peer.name}: {script!r} failed: {result}"
    moved, seconds = server.wait()
    assert moved == size, f"{peer.name}: {key} moved {moved} bytes, not {size}"
    if key == "host->guest":
        assert result.stdout.strip() == str(size).encode(), (
            f"{peer.name}: the guest counted {result.stdout!r}"
        )
    if samples is None:
        return
    gb = size / GB
    samples.add(peer.name, f"{key} s", seconds)
    samples.add(peer.name, f"{key} MB/s", size / seconds / 1e6)
    samples.add(peer.name, f"{key} CPU s/GB: VMM+passt", (used.vmm + used.passt) / gb)
    samples.add(peer.name, f"{key} CPU s/GB: VMM w/o vCPU + passt", (used.vmm - used.vcpus + used.passt) / gb)
    samples.add(peer.name, f"{key} CPU s/GB: VMM w/o vCPU", (used.vmm - used.vcpus) / gb)
    samples.add(peer.name, f"{key} CPU s/GB: passt", used.passt / gb)
    samples.add(peer.name, f"{key} CPU s/GB: vCPU threads", used.vcpus / gb)


def _run_peer(peer: Peer, samples: Samples | None) -> None:
    sink = Server(_sink)
    size = SEND_KIB * 1024
    _transfer(
        peer, sink, f"head -c {size} /dev/zero | nc {GATEWAY} {sink.port}", size, samples, "guest->host"
    )

    size = RECV_KIB * 1024
    source = Server(_http_source(size))
    _transfer(
        peer,
        source,
        f"wget -q -O - http://{GATEWAY}:{source.port}/blob | wc -c",
        size,
        samples,
        "host->guest",
    )

    echo = Server(_echo)
    # busybox nc takes everything after -e as the program and its arguments.
    result = peer.exec(f"nc {GATEWAY} {echo.port} -e /bin/cat")
    assert result.returncode == 0, f"{peer.name}: echo failed: {result}"
    times: list[float] = echo.wait()
    if samples is not None:
        samples.add(peer.name, "round trip median ms", statistics.median(times) * 1e3)


def _order(round_no: int) -> list[int]:
    k = round_no % len(PEERS)
    return [*range(k, len(PEERS)), *range(k)]


def _report(benchmark: Any, samples: Samples) -> None:
    info = benchmark.extra_info
    lines = [
        f"network, {ROUNDS} rounds, {SEND_KIB} KiB out, {RECV_KIB} KiB in, {ECHO_COUNT} round trips"
        f" of {ECHO_BYTES} B ({NOTE}):",
        f"  {'metric':<42} {'supermachine':>22} {'qemu':>22}   {'ratio sm/qemu: med (min..max)':>30}",
    ]

    def cell(v: list[float]) -> str:
        return f"{statistics.median(v):8.3g} ({min(v):.3g}..{max(v):.3g})"

    for metric, per_peer in samples.values.items():
        sm, qemu = per_peer["supermachine"], per_peer["qemu"]
        ratios = sorted(a / b for a, b in zip(sm, qemu, strict=True) if b > 0)
        entry: dict[str, object] = {}
        for name, values in per_peer.items():
            entry[name] = {
                "median": round(statistics.median(values), 4),
                "min": round(min(values), 4),
                "max": round(max(values), 4),
            }
        ratio = "n/a"
        if ratios:
            entry["ratio_sm_over_qemu"] = {
                "median": round(statistics.median(ratios), 3),
                "min": round(ratios[0], 3),
                "max": round(ratios[-1], 3),
            }
            ratio = f"{statistics.median(ratios):.3f} ({ratios[0]:.3f}..{ratios[-1]:.3f})"
        info[metric] = entry
        lines.append(f"  {metric:<42} {cell(sm):>22} {cell(qemu):>22}   {ratio:>30}")
    info["note"] = NOTE
    print("\n" + "\n".join(lines))


# -- the benchmark --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Guest:
    rootfs: Path
    vmlinux: Path
    initrd: Path


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    skip_unless_kvm()
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    if shutil.which("passt") is None:
        pytest.skip("passt is not installed (Debian package passt)")
    has_vhost = os.access("/dev/vhost-vsock", os.R_OK | os.W_OK) and hasattr(socket, "AF_VSOCK")
    if not has_vhost and shutil.which("vhost-device-vsock") is None:
        pytest.skip(
            "QEMU needs a vsock to reach the guest agent: /dev/vhost-vsock is missing here and so is "
            "vhost-device-vsock (cargo install vhost-device-vsock)"
        )
    workdir = tmp_path_factory.mktemp("net-bench")
    return Guest(busybox_squashfs(workdir), kernel.kernel_path(), initramfs.initramfs_path())


@pytest.fixture(scope="module")
def peers(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Peer]]:
    """Both VMs, booted (untimed; a boot takes minutes on emulating hosts) and configured."""
    sm = SupermachinePeer(tmp_path_factory.mktemp("supermachine"), guest.rootfs, guest.vmlinux, guest.initrd)
    try:
        info = sm.vm.network
        assert info is not None
        qemu = QemuPeer(
            tmp_path_factory.mktemp("qemu"), guest.rootfs, guest.vmlinux, guest.initrd, info.address
        )
        try:
            yield [sm, qemu]
        finally:
            qemu.close()
    finally:
        sm.close()


@pytest.mark.benchmark(group="network: supermachine vs QEMU microvm, both on passt")
def test_network_vs_qemu(benchmark: Any, peers: list[Peer]) -> None:
    samples = Samples({})
    rounds = 0

    def one_round(record: bool = True) -> None:
        nonlocal rounds
        for index in _order(rounds):
            _run_peer(peers[index], samples if record else None)
        rounds += 1

    one_round(record=False)  # warm: busybox, nc and wget in both guests' page caches
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    _report(benchmark, samples)
