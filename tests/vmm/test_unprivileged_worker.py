"""The worker of an unprivileged caller: a real process running as ``nobody`` starts a VM, and its
worker gets the strongest jail an unprivileged process may build (a user namespace with the other
namespaces and ``pivot_root`` inside it, Landlock, ``no_new_privs``, seccomp), or falls back with
the reason on the VM's log when the host refuses part of it.

The caller is a child of this (root) test: in a private mount namespace a device node of its own
is bind-mounted over ``/dev/kvm`` (the host's node stays as it is), then the child drops every
privilege and runs as uid 65534 for good before it touches supermachine.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import vmm_guests as g
from supermachine import _core, worker

UID = 65534
TESTS = Path(__file__).parent

# The unprivileged caller. Everything it needs is imported while it is still root: the
# interpreter's own files may not be readable by uid 65534.
CHILD = r"""
import ctypes, json, os, socket, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import test_vsock as tv
from supermachine import _core, worker

work, dumpable, uid = Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_DUMPABLE, PR_CAPBSET_DROP = 4, 24
for cap in range(64):
    libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
# A changed uid leaves the process undumpable; a login shell's processes are dumpable.
if dumpable:
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)

runtime = Path(tempfile.mkdtemp(dir=work))  # the caller's own private runtime directory
secret = runtime / "secret"
secret.write_text("the caller's file")
os.environ["SUPERMACHINE_VMM_PROBE_OPEN"] = str(secret)
path = runtime / "v.sock"
vm = _core.Vm.start(
    {"raw": sys.argv[5], "memory_mib": 16, "vsock_path": str(path)},
    worker.worker_options(runtime, None),
)
# Device I/O through the jailed device thread: a guest-initiated vsock connection to a host
# listener, which the worker reaches with connect() on the listener's path.
drv = tv.Driver(vm)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(f"{path}_1234")
server.listen(1)
server.settimeout(10)
drv.send(tv.OP_REQUEST, 3000, 1234)
fields, _ = drv.recv()
conn, _ = server.accept()
conn.settimeout(10)
drv.send(tv.OP_RW, 3000, 1234, b"from the guest")
received = conn.recv(64).decode()


def status(path):
    with open(path) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


tasks = {t: status(f"/proc/{vm.pid}/task/{t}/status") for t in os.listdir(f"/proc/{vm.pid}/task")}
report = {
    "caller": status("/proc/self/status"),
    "tasks": tasks,
    "protections": vm.protections,
    # Its user namespace's view of ids (the namespace links themselves are not readable: the
    # worker is not dumpable).
    "uid_map": Path(f"/proc/{vm.pid}/uid_map").read_text().split(),
    "nspid": status(f"/proc/{vm.pid}/status")["NSpid"].split(),
    "response": fields[6],
    "received": received,
    # What `supermachine doctor` tells this caller.
    "host": _core.host_protections(),
    "jail": _core.host_jail_level(),
}
vm.stop()
report["log"] = (runtime / "vmm.log").read_text()
print(json.dumps(report))
"""


def _reachable(path: Path) -> bool:
    """Whether any user can reach `path` (every directory above it searchable by others)."""
    for parent in path.resolve().parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            return False
    return bool(path.resolve().stat().st_mode & stat.S_IXOTH)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "making a private /dev/kvm and dropping to another uid needs root"
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is needed to give the caller a private /dev/kvm"
    program = worker.program_path()
    if not _reachable(program):
        return f"the worker {program} is not reachable by other users"
    return None


@pytest.fixture
def unprivileged(kvm: None) -> Iterator[Any]:
    """Runs CHILD as uid 65534 with a private /dev/kvm; returns its report."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    top = Path(tempfile.mkdtemp(prefix="sm-unprivileged-"))
    try:
        top.chmod(0o755)
        kvm_node = top / "kvm"
        os.mknod(kvm_node, 0o600 | stat.S_IFCHR, os.makedev(10, 232))
        os.chown(kvm_node, UID, UID)
        guest = g.build(g.VIRTIO_DOORBELL, top)
        work = top / "work"
        work.mkdir()
        os.chown(work, UID, UID)

        def run(*, dumpable: bool) -> Any:
            script = 'mount --bind "$1" /dev/kvm && shift && exec "$@"'
            unshare = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
                str(kvm_node),
            ]
            child = [sys.executable, "-c", CHILD, str(TESTS), str(work), "1" if dumpable else "0", str(UID)]
            done = subprocess.run(
                [*unshare, *child, str(guest)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        yield run
    finally:
        shutil.rmtree(top)


def _landlock_abi() -> int | None:
    entry = _core.host_protections()["landlock"]
    if not entry["available"]:
        return None
    return int(entry["detail"].split()[3].rstrip(":"))


def _check_common(report: Any) -> None:
    caller = report["caller"]
    assert caller["Uid"].split() == [str(UID)] * 4
    assert caller["CapEff"] == caller["CapPrm"] == caller["CapBnd"] == "0000000000000000"
    # The VM ran and its vsock device reached the caller's listener from inside the jail.
    assert report["response"] == 2  # OP_RESPONSE
    assert report["received"] == "from the guest"
    for tid, task in report["tasks"].items():
        assert task["Seccomp"] == "2", tid
        assert task["NoNewPrivs"] == "1", tid
        assert task["CapEff"] == "0000000000000000", tid
        assert task["Uid"].split() == [str(UID)] * 4, tid
    protections = report["protections"]
    assert "seccomp" in protections and "no_new_privs" in protections
    abi = _landlock_abi()
    if abi is None:
        assert not any(p.startswith("landlock") for p in protections)
        assert "not in force: Landlock: " in report["log"]
        return
    assert f"landlock ABI {abi} (files" in " ".join(protections), protections
    # Every thread kind tried to open the caller's file (readable by the worker's uid, and
    # visible in its jail: it sits in the vsock socket's directory) once restricted: refused.
    probes = [line for line in report["log"].splitlines() if "probe:" in line]
    assert {p.split(": ")[2] for p in probes} == {"control thread", "vcpu thread", "device thread"}, probes
    for line in probes:
        assert line.endswith(": Permission denied"), line


def _user_namespaces_allowed() -> bool:
    return bool(_core.host_protections()["user_namespace"]["available"])


def test_an_unprivileged_caller_gets_a_user_namespace_jail_with_landlock(unprivileged: Any) -> None:
    report = unprivileged(dumpable=True)
    _check_common(report)
    protections = report["protections"]
    host = report["host"]
    assert not host["root"]["available"]
    if not _user_namespaces_allowed():
        assert report["uid_map"] == ["0", "0", "4294967295"]
        assert "not in force: stronger isolation was refused" in report["log"]
        assert report["jail"] == "minimal"
        return
    # doctor's view agrees with what the worker got.
    assert report["jail"] == "unprivileged"
    for name in ("user_namespace", "mount_namespace", "pivot_root", "landlock", "seccomp", "no_new_privs"):
        assert host[name]["available"], host[name]
    # Root inside its own user namespace is the caller outside; it is PID 1 of its own PID one.
    assert report["uid_map"] == ["0", str(UID), "1"]
    assert report["nspid"][1:] == ["1"]
    for name in ("user", "mount", "pid", "ipc", "uts", "network"):
        assert f"{name} namespace" in protections, protections
    assert "empty read-only root" in protections
    assert "not in force" not in report["log"], report["log"]


def test_a_refused_user_namespace_falls_back_with_the_reason(unprivileged: Any) -> None:
    # An undumpable caller (here: one that changed its uid and stayed so) owns its /proc files as
    # root, so its worker's child cannot write its own id maps: the user namespace is refused.
    # The VM still runs, with Landlock, no_new_privs and seccomp, and the log says why.
    report = unprivileged(dumpable=False)
    _check_common(report)
    assert report["uid_map"] == ["0", "0", "4294967295"]
    assert len(report["nspid"]) == 1
    # doctor's view agrees: no user namespace for this caller, and why.
    user_ns = report["host"]["user_namespace"]
    assert not user_ns["available"]
    assert "cannot map its ids" in user_ns["detail"] and "not dumpable" in user_ns["detail"], user_ns
    assert report["jail"] == "minimal"
    assert not any(p.endswith("namespace") for p in report["protections"])
    assert (
        "not in force: stronger isolation was refused by this host: namespaces inside a user "
        "namespace: the worker could not write its uid_map: Permission denied"
    ) in report["log"]
