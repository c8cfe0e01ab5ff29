"""A real Linux guest: each exec's process tree is contained (cgroup v2) and ends with it.

A fork bomb is limited and killed without taking the agent down; processes left behind die when the
exec ends unless it asks to keep them; programs that cannot run exit 127/126 like in a shell.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from supermachine.errors import AgentRequestError
from supermachine.vm import Vm

pytestmark = pytest.mark.slow

# Guest kernel code is emulated on some hosts: generous bounds, but bounds.
GRACE = 120.0

# User processes: neither kthreadd (pid 2) nor its children (kernel threads), and no zombies.
COUNT_PROCESSES = (
    "n=0; for d in /proc/[0-9]*; do "
    'read -r s 2>/dev/null < "$d/stat" || continue; '
    'set -- ${s##*) }; [ "$1" = Z ] || [ "$2" = 2 ] || [ "$d" = /proc/2 ] || n=$((n+1)); '
    "done; echo $n"
)


def _process_count(vm: Vm) -> int:
    return int(vm.exec(["sh", "-c", COUNT_PROCESSES], timeout=GRACE).stdout)


def _alive(vm: Vm, pid: int) -> bool:
    """Whether ``pid`` exists in the guest and is not a zombie."""
    script = f'read -r s 2>/dev/null < /proc/{pid}/stat || exit 1; case "${{s##*) }}" in Z*) exit 1;; esac'
    return vm.exec(["sh", "-c", script], timeout=GRACE).status == 0


def test_exec_runs_in_its_own_cgroup_with_a_pids_limit(vm: Vm) -> None:
    show = "g=$(cut -d: -f3 /proc/self/cgroup); echo $g; cat /sys/fs/cgroup$g/pids.max"
    group, limit = vm.exec(["sh", "-c", show], timeout=GRACE).stdout.decode().split()
    assert group.startswith("/exec/") and limit == "1024"
    group, limit = vm.exec(["sh", "-c", show], pids_max=8, timeout=GRACE).stdout.decode().split()
    assert limit == "8"
    # A tree may not grow past its limit: the eighth concurrent process cannot be forked.
    many = "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 5 & done; wait"
    forks = vm.exec(["sh", "-c", many], pids_max=8, timeout=GRACE)
    assert b"fork" in forks.stderr.lower(), forks.stderr


def test_fork_bomb_is_limited_killed_and_leaves_the_agent_responsive(vm: Vm) -> None:
    before = _process_count(vm)
    started = time.monotonic()
    bomb = vm.exec(["sh", "-c", "bomb() { bomb | bomb & }; bomb; sleep 1000"], timeout=5)
    assert time.monotonic() - started < 5 + GRACE
    assert bomb.timed_out
    # Every process of the bomb is gone once the exec has reported its end.
    after = _process_count(vm)
    assert after <= before, f"{after - before} processes of the fork bomb survived it"
    started = time.monotonic()
    assert vm.exec(["true"], timeout=GRACE).status == 0
    assert time.monotonic() - started < GRACE
    # The bomb's cgroup was removed: only the cgroup of the exec that looks is left.
    groups = vm.exec(["sh", "-c", "ls /sys/fs/cgroup/exec | grep -c '^[0-9]'"], timeout=GRACE).stdout
    assert groups == b"1\n"


def test_background_processes_end_with_the_exec_unless_kept(vm: Vm) -> None:
    # setsid: a new session and process group; only the cgroup still holds it.
    start = "sleep 1000 >/dev/null 2>&1 & echo $!; setsid sleep 1000 >/dev/null 2>&1 & echo $!"
    result = vm.exec(["sh", "-c", start], timeout=GRACE)
    assert result.status == 0
    pids = [int(p) for p in result.stdout.split()]
    assert len(pids) == 2
    assert not any(_alive(vm, pid) for pid in pids), "a background process outlived its exec"

    kept = vm.exec(["sh", "-c", start], keep_background=True, timeout=GRACE)
    pids = [int(p) for p in kept.stdout.split()]
    try:
        assert all(_alive(vm, pid) for pid in pids), "keep_background did not keep the processes"
    finally:
        vm.exec(["kill", "-9", *map(str, pids)], timeout=GRACE)


def test_programs_that_cannot_run_exit_127_and_126(vm: Vm) -> None:
    missing = vm.exec(["/nonexistent"], timeout=GRACE)
    assert (missing.returncode, missing.stderr) == (127, b"exec: /nonexistent: not found\n")
    assert vm.exec(["no-such-command"], timeout=GRACE).returncode == 127
    # /etc/motd exists but is not executable (mode 0644).
    refused = vm.exec(["/etc/motd"], timeout=GRACE)
    assert (refused.returncode, refused.stderr) == (126, b"exec: /etc/motd: Permission denied\n")


# Counts its turns in /run/loop; every turn is system calls only, no fork.
TURN_LOOP = 'n=0; while :; do n=$((n + 1)); echo "$n" > /run/loop; done'
EXECS_EVENTS = "/sys/fs/cgroup/exec/cgroup.events"
OBSERVER_LOG = "/run/observer.log"
# Watches the freeze from inside the guest, where a look takes milliseconds (from the host, through
# the agent, it can take seconds on a loaded emulating host, longer than the whole freeze). It first
# moves itself to the root cgroup, which the freeze of the execs' cgroup does not reach, then logs
# every change of "<frozen> <loop count> <frozen>", the kernel's frozen flag read before and after
# the count: a count between two frozen reads was read while frozen (the shell's `read` takes one
# byte per system call, so a count read while the loop runs can be torn). Builtins only, no fork.
OBSERVER = (
    "echo 0 > /sys/fs/cgroup/cgroup.procs; last=; "
    f'frozen() {{ f=0; while read -r k v; do [ "$k" = frozen ] && f=$v; done < {EXECS_EVENTS}; }}; '
    "while :; do "
    "frozen; before=$f; turns=; read -r turns < /run/loop; frozen; "
    f'now="$before $turns $f"; [ "$now" = "$last" ] || echo "$now" >> {OBSERVER_LOG}; last=$now; '
    "done"
)


def _turns(vm: Vm) -> int:
    """The turn loop's count so far (waiting for its first write)."""
    deadline = time.monotonic() + GRACE
    while True:
        try:
            text = vm.read_file("/run/loop").strip()  # empty while the loop rewrites it
        except AgentRequestError:
            text = b""  # not written yet: the loop's shell is still starting
        if text:
            return int(text)
        assert time.monotonic() < deadline, "the turn loop wrote nothing"
        time.sleep(0.2)


def _observed(vm: Vm) -> list[tuple[bool, int | None, bool]]:
    """The observer's log so far: (frozen before, loop count or None mid-write, frozen after)."""
    try:
        text = vm.read_file(OBSERVER_LOG).decode()
    except AgentRequestError:
        return []  # nothing logged yet
    lines = [line.split(" ") for line in text.splitlines()]
    return [(before == "1", int(turns) if turns else None, after == "1") for before, turns, after in lines]


def _keep(vm: Vm, script: str) -> int:
    """Starts a kept background shell running `script`; its pid."""
    return int(vm.exec(["sh", "-c", f"({script}) > /dev/null 2>&1 & echo $!"], keep_background=True).stdout)


def test_a_paused_export_freezes_every_process_while_it_reads_then_thaws_them(vm: Vm, tmp_path: Path) -> None:
    """`export_layer(pause=True)` (what `vm.commit` does by default) freezes the processes that
    commands started, kept background ones included, while the walk runs, so none changes a file
    while it is read; they run on afterwards. Watched by an observer in the guest outside the
    frozen cgroup: the kernel's own report that every process of the execs is frozen, and a kept
    background loop that makes no turn meanwhile."""
    vm.exec(["sh", "-c", "head -c 4194304 /dev/zero > /root/export-me"], check=True, timeout=GRACE)
    pids = [_keep(vm, TURN_LOOP)]
    try:
        turns_before = _turns(vm)
        pids.append(_keep(vm, OBSERVER))
        deadline = time.monotonic() + GRACE
        while not _observed(vm):
            assert time.monotonic() < deadline, "the observer logged nothing"
            time.sleep(0.2)
        assert vm.read_file(f"/proc/{pids[1]}/cgroup") == b"0::/\n", "the observer left the execs' cgroup"
        assert not any(before or after for before, _, after in _observed(vm))

        layer = vm.export_layer(tmp_path / "layer.tar", compress=False, pause=True, timeout=GRACE)
        assert layer.size > 4 << 20
        # Thawed once the export is back: the kernel says so, and the loop turns on.
        deadline = time.monotonic() + GRACE
        while (log := _observed(vm))[-1][0] or log[-1][2]:
            assert time.monotonic() < deadline, f"the execs stayed frozen after the export: {log[-8:]}"
            time.sleep(0.2)
        assert any(before or after for before, _, after in log), "the execs were never seen frozen"
        frozen_turns = {turns for before, turns, after in log if before and after and turns is not None}
        assert len(frozen_turns) <= 1, f"the loop turned while frozen: {frozen_turns}"
        last_frozen = max(frozen_turns, default=turns_before)
        while _turns(vm) <= last_frozen:
            assert time.monotonic() < deadline, "the loop stayed frozen after the export"
            time.sleep(0.2)
        assert last_frozen >= turns_before
    finally:
        vm.exec(["kill", "-9", *map(str, pids)], timeout=GRACE)
        vm.exec(["rm", "-f", "/root/export-me", "/run/loop", OBSERVER_LOG], timeout=GRACE)
