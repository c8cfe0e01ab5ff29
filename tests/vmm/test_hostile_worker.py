"""A worker that breaks the protocol: the owner (``_core``) must end it and raise, whatever it sends.

The worker runs guest-facing code, so a compromised one is an attacker. Each test points
``SUPERMACHINE_VMM`` at a small script that speaks to the owner on its standard input (the control
socket) and then misbehaves in one way. In every case the start raises a typed error with a
one-line message that names the problem, the fake worker is gone (killed and reaped: no zombie),
and this process keeps its descriptors and goes on.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import vmm_guests as g
from supermachine import _core, errors, worker

# The body of every fake worker. The owner's first request is Hello; BEHAVIOUR decides the rest.
_FAKE = r"""
import json, os, socket, struct, sys, time

sock = socket.socket(fileno=0)
with open(PIDFILE, "w") as f:
    f.write(os.readlink("/proc/self"))  # the pid in the owner's PID namespace


def read_exact(n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            sys.exit(0)
        out += chunk
    return out


def recv():
    json_len, payload_len = struct.unpack("<II", read_exact(8))
    message = json.loads(read_exact(json_len))
    read_exact(payload_len)
    return message


def frame(message, payload=b""):
    body = json.dumps(message).encode()
    return struct.pack("<II", len(body), len(payload)) + body + payload


def send(message, payload=b""):
    sock.sendall(frame(message, payload))


HELLO = {"reply": "hello", "version": VERSION, "pid": 1}


def info(**fields):
    base = {
        "cmdline": "", "cpu_template": "none", "memory_size": 16 << 20,
        "console_capacity": 65536, "vsock_path": None, "devices": [], "protections": [],
    }
    base.update(fields)
    return dict(reply="info", **base)

"""

# What each fake does.
HUGE_JSON = """
recv()
sock.sendall(struct.pack("<II", 0xFFFFFFFF, 0))
time.sleep(600)
"""
MALFORMED = """
recv()
body = b'{"reply": "hello", "version": 2,'
sock.sendall(struct.pack("<II", len(body), 0) + body)
time.sleep(600)
"""
WRONG_KIND = """
recv()
send({"reply": "ok"})
time.sleep(600)
"""
WRONG_VERSION = """
recv()
send({"reply": "hello", "version": 999, "pid": 1})
time.sleep(600)
"""
EXIT_AT_ONCE = """
sys.exit(3)
"""
SILENT = """
recv()
time.sleep(600)
"""
# A valid greeting, one byte a second: each read is quick, the whole frame is not.
TRICKLE = """
recv()
for b in frame(HELLO):
    sock.sendall(bytes([b]))
    time.sleep(1)
recv()
send(info())
recv()
"""


def _other_socket(path: str) -> str:
    return f"""
recv()
send(HELLO)
recv()
send(info(vsock_path={path!r}))
time.sleep(600)
"""


# Absurd values in a well-formed reply of the right shape (under the 1 MiB message limit).
ABSURD_INFO = """
recv()
send(HELLO)
recv()
devices = [
    {"kind": "k" * 20, "mmio_base": 2**64 - 1, "gsi": 2**32 - 1, "path": "/" + "p" * 20,
     "read_only": False}
    for _ in range(4000)
]
send(info(cmdline="x" * 400_000, memory_size=2**64 - 1, console_capacity=2**64 - 1,
          devices=devices, protections=["seccomp"] * 1000))
recv()  # Stop: end without answering
"""


@pytest.fixture(autouse=True)
def _no_spare_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each fake must be the process that serves the start under test (a spare started ahead of
    # need would be another fake, greeted beside the test, and hold a descriptor of its own).
    monkeypatch.setenv("SUPERMACHINE_SPARE_WORKERS", "0")


@pytest.fixture(scope="module")
def guest(guest_dir: Path) -> Path:
    return g.build(g.HELLO, guest_dir)


def _fake_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behaviour: str) -> Path:
    script = tmp_path / "fake-vmm"
    pidfile = tmp_path / "fake.pid"
    script.write_text(
        f"#!{sys.executable}\nPIDFILE = {str(pidfile)!r}\nVERSION = {_core.WORKER_PROTOCOL_VERSION}\n"
        f"{_FAKE}{behaviour}"
    )
    script.chmod(0o755)
    monkeypatch.setenv("SUPERMACHINE_VMM", str(script))
    return pidfile


def _open_fds() -> set[str]:
    # Earlier tests' VMs left to the garbage collector would otherwise close their descriptors
    # in the middle of a comparison.
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


def _assert_gone(pidfile: Path) -> None:
    pid = int(pidfile.read_text())
    assert pid != os.getpid()
    with pytest.raises(ChildProcessError):  # reaped: not even a zombie is left
        os.waitpid(pid, os.WNOHANG)
    assert not os.path.exists(f"/proc/{pid}")


def _start(guest: Path, tmp_path: Path, **config: Any) -> Any:
    runtime = tmp_path / "runtime"
    runtime.mkdir(exist_ok=True)
    cfg: dict[str, Any] = {"raw": str(guest), "memory_mib": 16, **config}
    return _core.Vm.start(cfg, worker.worker_options(runtime, None))


def _start_fails(guest: Path, tmp_path: Path, pidfile: Path, **config: Any) -> str:
    before = _open_fds()
    with pytest.raises(errors.VmmCrashedError) as caught:
        _start(guest, tmp_path, **config)
    message = str(caught.value)
    assert "\n" not in message
    _assert_gone(pidfile)
    assert _open_fds() - before == set()  # nothing of the failed start is left open here
    return message


@pytest.mark.parametrize(
    ("behaviour", "problem"),
    [
        (HUGE_JSON, "a frame of 4294967295 + 0 bytes is over the limits"),
        (MALFORMED, "the VMM worker sent a malformed message: EOF while parsing"),
        (WRONG_KIND, "a start-up reply of the wrong kind"),
        (WRONG_VERSION, f"it speaks protocol version 999, not {_core.WORKER_PROTOCOL_VERSION}"),
    ],
    ids=["huge-json-header", "malformed-json", "wrong-reply-kind", "wrong-version"],
)
def test_a_worker_that_breaks_the_greeting_is_killed(
    guest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behaviour: str, problem: str
) -> None:
    pidfile = _fake_worker(tmp_path, monkeypatch, behaviour)
    message = _start_fails(guest, tmp_path, pidfile)
    assert message.startswith("VMM crashed: the VMM broke its protocol (")
    assert problem in message
    assert message.endswith("and was killed")


def test_a_worker_that_exits_at_once_is_reported(
    guest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pidfile = _fake_worker(tmp_path, monkeypatch, EXIT_AT_ONCE)
    assert _start_fails(guest, tmp_path, pidfile) == "VMM crashed: it exited with status 3"


def test_a_silent_worker_is_killed_after_the_greeting_deadline(
    guest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pidfile = _fake_worker(tmp_path, monkeypatch, SILENT)
    message = _start_fails(guest, tmp_path, pidfile)
    assert message == "VMM crashed: the VMM did not answer within 10 s and was killed"


def test_a_worker_cannot_stretch_a_call_by_trickling_bytes(
    guest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each byte comes well within the deadline; the whole greeting does not.
    pidfile = _fake_worker(tmp_path, monkeypatch, TRICKLE)
    message = _start_fails(guest, tmp_path, pidfile)
    assert message == "VMM crashed: the VMM did not answer within 10 s and was killed"


def test_a_worker_cannot_name_another_vsock_socket(
    guest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Someone else's socket: the owner would hand its path to the caller to connect to, and
    # remove it once the worker is gone.
    other = tmp_path / "other.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(other))
    try:
        pidfile = _fake_worker(tmp_path, monkeypatch, _other_socket(str(other)))
        message = _start_fails(guest, tmp_path, pidfile)
        assert message == (
            "VMM crashed: the VMM broke its protocol (a start reply naming another vsock "
            "socket) and was killed"
        )
        assert other.is_socket()
    finally:
        listener.close()


def test_absurd_facts_in_a_well_formed_reply_stay_bounded(
    guest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owner cannot check every fact a worker reports (memory size, device list, command
    # line); those it only shows, bounded by the 1 MiB message limit, and they reach no decision
    # about this host's files or sockets.
    pidfile = _fake_worker(tmp_path, monkeypatch, ABSURD_INFO)
    before = _open_fds()
    vm = _start(guest, tmp_path)
    assert vm.pid == int(pidfile.read_text())
    assert vm.memory_size == 2**64 - 1
    assert len(vm.cmdline) == 400_000
    assert len(vm.devices) == 4000
    assert vm.vsock_path is None
    vm.stop()  # the fake ends without answering: the owner reaps it all the same
    _assert_gone(pidfile)
    del vm
    assert _open_fds() - before == set()


def test_a_spare_worker_that_dies_after_its_greeting_costs_a_retry_not_the_vm(
    guest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A spare is started beside a VM's start and greeted ahead of need; it may die idle (killed,
    # out of memory) just before it is taken, when its end does not show yet. Here, once armed,
    # the next process started (a spare) greets, then dies at its first real request: the start
    # that took it must go on in a new worker. Every other process is the real worker.
    real = worker.program_path()
    started, armed, faked = tmp_path / "started", tmp_path / "armed", tmp_path / "faked"
    greeted = tmp_path / "spare-greeted"
    script = tmp_path / "wrapper-vmm"
    script.write_text(
        f"#!{sys.executable}\n"
        "import os\n"
        f"with open({str(started)!r}, 'a') as f:\n"
        "    f.write('x')\n"
        "try:\n"
        f"    if not os.path.exists({str(armed)!r}):\n"
        "        raise FileExistsError\n"
        f"    os.close(os.open({str(faked)!r}, os.O_CREAT | os.O_EXCL))\n"
        "except FileExistsError:\n"
        f"    os.execv({str(real)!r}, [{str(real)!r}, '--worker'])\n"
        f"PIDFILE = {str(tmp_path / 'spare.pid')!r}\n"
        f"VERSION = {_core.WORKER_PROTOCOL_VERSION}\n"
        f"{_FAKE}"
        "recv()\n"
        "send(HELLO)\n"
        f"open({str(greeted)!r}, 'w').close()\n"
        "recv()\n"
        "sys.exit(0)\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("SUPERMACHINE_VMM", str(script))
    monkeypatch.setenv("SUPERMACHINE_SPARE_WORKERS", "1")

    def wait_for(what: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 60
        while not ready():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    first = _start(guest, tmp_path)  # a new worker, and a (real) spare started beside it
    assert first.wait(10).code == 42
    first.stop()
    wait_for("no spare was started", lambda: started.exists() and len(started.read_text()) == 2)
    time.sleep(2)  # the real spare greets and is filed as ready
    armed.touch()
    second = _start(guest, tmp_path)  # takes the real spare; the next spare is the fake
    assert second.wait(10).code == 42
    second.stop()
    wait_for("the fake spare was never greeted", greeted.exists)
    time.sleep(0.2)  # the owner's spare thread files it as ready
    third = _start(guest, tmp_path)  # takes the fake, which dies: a new (real) worker serves it
    assert third.wait(10).code == 42
    assert third.pid != int((tmp_path / "spare.pid").read_text())
    third.stop()
    _assert_gone(tmp_path / "spare.pid")
