"""The process-per-VM model on raw test guests: each VM's VMM is a jailed, seccomp-filtered worker
process, and whatever ends one worker (a kill, a SIGBUS, the OOM killer) ends only its VM, with a
typed outcome, while the caller and other VMs go on."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import vmm_guests as g
from supermachine import _core, errors, worker

# Touches one qword in each 4 KiB page of 48 MiB of guest RAM, then powers off with code 7.
FILL_48_MIB = (
    g.PRELUDE
    + """
    mov rdi, 0x400000
    mov rcx, 0x3400000
5:  mov qword ptr [rdi], rdi
    add rdi, 4096
    cmp rdi, rcx
    jb 5b
"""
    + g._power_off(7)
)


@pytest.fixture
def start_worker(kvm: None, guest_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Starts a raw guest in a worker process, with optional resource limits."""
    vms: list[Any] = []

    def start(source: str, limits: worker.Limits | None = None, **config: Any) -> Any:
        cfg: dict[str, Any] = {"raw": str(g.build(source, guest_dir)), "memory_mib": 16, **config}
        runtime = Path(tempfile.mkdtemp(dir=tmp_path, prefix="vm-"))
        vm = _core.Vm.start(cfg, worker.worker_options(runtime, limits))
        vms.append(vm)
        return vm

    yield start
    for vm in vms:
        vm.stop()


def _status(path: str) -> dict[str, str]:
    with open(path) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _counter(vm: Any) -> int:
    return int.from_bytes(vm.read_memory(g.RESULTS, 8), "little")


def _counts_on(vm: Any) -> None:
    first = _counter(vm)
    deadline = time.monotonic() + 10
    while _counter(vm) == first:
        assert time.monotonic() < deadline, "the guest stopped counting"
        time.sleep(0.01)


@pytest.mark.skipif(os.geteuid() != 0, reason="the full jail (namespaces, uid drop) needs root")
def test_the_worker_is_a_separate_jailed_filtered_process(start_worker: Callable[..., Any]) -> None:
    vm = start_worker(g.COUNTER)
    pid = vm.pid
    assert isinstance(pid, int) and pid != os.getpid()
    _counts_on(vm)
    tasks = glob.glob(f"/proc/{pid}/task/*/status")
    assert tasks
    for task in tasks:  # every thread: the control thread, vCPUs, devices
        status = _status(task)
        assert status["Seccomp"] == "2", task
        assert status["NoNewPrivs"] == "1", task
        assert status["CapEff"] == "0000000000000000", task
        assert status["Uid"].split() == [str(worker.JAIL_UID)] * 4, task
        assert status["Gid"].split() == [str(worker.JAIL_GID)] * 4, task
    for ns in ("mnt", "pid", "net", "ipc", "uts"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    # Its root is an empty tmpfs: no host path is there to open.
    root = f"/proc/{pid}/root"
    assert os.listdir(root) == []
    for host_path in ("etc/passwd", "dev/kvm", "proc/self", "tmp", "root"):
        assert not os.path.lexists(os.path.join(root, host_path)), host_path
    assert "seccomp" in vm.protections and "no_new_privs" in vm.protections
    if _core.host_protections()["landlock"]["available"]:
        assert any(p.startswith("landlock ABI ") for p in vm.protections), vm.protections


def test_every_worker_thread_is_landlocked(
    kvm: None, guest_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker's test hook: once restricted, every thread tries to open this file and logs
    # what happened. The file sits in the vsock socket's directory, the one host directory a
    # root-started worker still sees after pivot_root, and the worker's uid may read it: only
    # Landlock stands in the way (as for an unprivileged caller, see test_unprivileged_worker).
    landlock = _core.host_protections()["landlock"]
    if not landlock["available"]:
        pytest.skip(landlock["detail"])
    runtime = tmp_path / "vm"
    runtime.mkdir()
    runtime.chmod(0o711)
    secret = runtime / "secret"
    secret.write_text("the caller's file")
    secret.chmod(0o644)
    monkeypatch.setenv("SUPERMACHINE_VMM_PROBE_OPEN", str(secret))
    # A program path of its own, so that no spare worker started without the hook serves it.
    program = tmp_path / "supermachine-vmm"
    program.symlink_to(worker.program_path())
    monkeypatch.setenv("SUPERMACHINE_VMM", str(program))
    monkeypatch.setenv("SUPERMACHINE_SPARE_WORKERS", "0")
    cfg = {
        "raw": str(g.build(g.VIRTIO_DOORBELL, guest_dir)),
        "memory_mib": 16,
        "vsock_path": str(runtime / "v.sock"),
    }
    vm = _core.Vm.start(cfg, worker.worker_options(runtime, None))
    try:
        abi = landlock["detail"].split()[3].rstrip(":")
        assert f"landlock ABI {abi} (files" in " ".join(vm.protections), vm.protections
        log = runtime / "vmm.log"
        deadline = time.monotonic() + 10
        while log.read_text().count("probe:") < 3:  # the vCPU thread confines itself last
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        probes = [line for line in log.read_text().splitlines() if "probe:" in line]
        assert sorted(p.split(": ")[2] for p in probes) == ["control thread", "device thread", "vcpu thread"]
        for line in probes:
            assert line.endswith(f"open {secret}: Permission denied"), line
    finally:
        vm.stop()


def test_a_killed_worker_ends_only_its_vm(start_worker: Callable[..., Any]) -> None:
    victim, survivor = start_worker(g.COUNTER), start_worker(g.COUNTER)
    os.kill(victim.pid, signal.SIGKILL)
    outcome = victim.wait(10)
    assert outcome is not None
    assert (outcome.kind, outcome.code, outcome.reason) == ("vmm_crash", None, "VMM crashed: SIGKILL")
    with pytest.raises(errors.VmmCrashedError, match="SIGKILL"):
        victim.read_memory(g.RESULTS, 8)
    victim.stop()  # stopping a crashed VM is fine and keeps its outcome
    assert victim.outcome.kind == "vmm_crash"
    _counts_on(survivor)
    survivor.pause()
    survivor.resume()
    _counts_on(survivor)


def test_a_sigbus_in_the_vmm_ends_only_its_vm(start_worker: Callable[..., Any], tmp_path: Path) -> None:
    # Guest RAM backed by a file that shrinks under the running VM: the VMM's next access to the
    # lost pages faults with SIGBUS (before the process model this killed the caller).
    ram = tmp_path / "ram"
    victim = start_worker(g.COUNTER, memory_file=str(ram))
    survivor = start_worker(g.COUNTER)
    os.truncate(ram, 0)
    with pytest.raises(errors.VmmCrashedError, match="VMM crashed: SIGBUS"):
        victim.read_memory(0x200000, 4096)
    ended = victim.outcome
    assert ended is not None
    assert (ended.kind, ended.code, ended.reason) == ("vmm_crash", None, "VMM crashed: SIGBUS")
    _counts_on(survivor)


def test_a_memory_limit_below_the_guests_needs_ends_it_as_oom(start_worker: Callable[..., Any]) -> None:
    survivor = start_worker(g.COUNTER)
    starved = start_worker(FILL_48_MIB, limits=worker.Limits(memory_mib=16), memory_mib=64)
    outcome = starved.wait(60)
    assert outcome is not None and outcome.kind == "oom", outcome
    assert "memory limit of 16 MiB" in outcome.reason
    _counts_on(survivor)
    # The same guest with room to spare runs to its end.
    fed = start_worker(FILL_48_MIB, limits=worker.Limits(memory_mib=256), memory_mib=64)
    ended = fed.wait(60)
    assert ended is not None
    assert (ended.kind, ended.code, ended.reason) == ("poweroff", 7, "guest powered off with code 7")


def test_the_console_of_a_crashed_worker_is_kept(start_worker: Callable[..., Any]) -> None:
    vm = start_worker(g.CLI_HLT.replace("    cli\n", "    cli\n" + g._print("m", "before the crash\n"), 1))
    deadline = time.monotonic() + 10
    while b"before the crash" not in vm.console():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(vm.pid, signal.SIGKILL)
    assert vm.wait(10).kind == "vmm_crash"
    assert b"before the crash\n" in vm.console()


def test_bad_limits_and_a_missing_worker_are_one_line_errors(
    kvm: None, guest_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = {"raw": str(g.build(g.HELLO, guest_dir)), "memory_mib": 16}
    with pytest.raises(errors.ResourceLimitError, match="memory"):
        _core.Vm.start(cfg, worker.worker_options(tmp_path, worker.Limits(memory_mib=1)))
    monkeypatch.setenv("SUPERMACHINE_VMM", str(tmp_path / "nowhere"))
    with pytest.raises(errors.WorkerStartError, match="missing or not executable"):
        worker.worker_options(tmp_path, None)
    fake = tmp_path / "not-a-vmm"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("SUPERMACHINE_VMM", str(fake))
    with pytest.raises(errors.VmmCrashedError, match="exited with status 3"):
        _core.Vm.start(cfg, worker.worker_options(tmp_path, None))


def test_workers_end_when_their_owner_is_killed(kvm: None, guest_dir: Path, tmp_path: Path) -> None:
    # An owner killed with SIGKILL cannot stop its VMs: each worker sees its control channel close
    # and ends by itself, so no VM outlives the process that started it.
    binary = g.build(g.CLI_HLT, guest_dir)
    script = (
        "import os, signal, sys, tempfile\n"
        "from supermachine import _core, worker\n"
        f"cfg = {{'raw': {str(binary)!r}, 'memory_mib': 16}}\n"
        "vms = [_core.Vm.start(cfg, worker.worker_options(tempfile.mkdtemp(), None)) for _ in range(2)]\n"
        "print(' '.join(str(vm.pid) for vm in vms), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    for pid in pids:
        while os.path.exists(f"/proc/{pid}") and _state(pid) not in ("Z", None):
            assert time.monotonic() < deadline, f"worker {pid} outlived its owner"
            time.sleep(0.05)


def _state(pid: int) -> str | None:
    try:
        return _status(f"/proc/{pid}/status")["State"][0]
    except (OSError, KeyError):
        return None
