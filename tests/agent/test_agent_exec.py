"""exec through the real agent on a Unix socket: output, exit, stdin, environment, users, timeouts."""

from __future__ import annotations

import os
import pwd
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import AgentServer
from supermachine.agent import AgentClient, Output
from supermachine.errors import AgentError, AgentRequestError


def _gone(pid: int, within: float = 5.0) -> bool:
    """Whether ``pid`` has disappeared (or is a zombie) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


def test_echo(client: AgentClient) -> None:
    result = client.exec(["echo", "hello", "world"])
    assert result.stdout == b"hello world\n"
    assert result.stderr == b""
    assert (result.status, result.signal, result.timed_out) == (0, None, False)
    assert result.ok and result.returncode == 0
    assert 0 <= result.duration < 5


@pytest.mark.parametrize("code", [1, 2, 42, 255])
def test_exit_codes(client: AgentClient, code: int) -> None:
    result = client.exec(["sh", "-c", f"exit {code}"])
    assert (result.status, result.signal) == (code, None)
    assert not result.ok


def test_stderr_is_separate(client: AgentClient) -> None:
    result = client.exec(["sh", "-c", "echo out; echo err >&2; echo out2"])
    assert result.stdout == b"out\nout2\n"
    assert result.stderr == b"err\n"


def test_killed_by_signal(client: AgentClient) -> None:
    result = client.exec(["sh", "-c", "kill -TERM $$"])
    assert (result.status, result.signal) == (None, signal.SIGTERM)
    assert result.returncode == -signal.SIGTERM


def test_signal_request_reaches_the_process_group(client: AgentClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    process = client.spawn(["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"])
    deadline = time.monotonic() + 5
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # SIGTERM: background jobs of a non-interactive shell ignore SIGINT.
    process.signal(signal.SIGTERM)
    result = process.wait()
    assert (result.status, result.signal) == (None, signal.SIGTERM)
    assert _gone(int(pidfile.read_text()))


def test_stdin_round_trip_large(client: AgentClient) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    result = client.exec(["cat"], input=data)
    assert result.status == 0
    assert result.stdout == data


def test_stdin_while_output_flows(client: AgentClient) -> None:
    # Both directions at once: sha256 of 2 MiB input plus 2 MiB of output, no deadlock.
    data = os.urandom(2 * 1024 * 1024)
    result = client.exec(["sh", "-c", "head -c 2097152 /dev/zero; sha256sum"], input=data)
    assert result.status == 0
    assert result.stdout[: 2 * 1024 * 1024] == b"\0" * (2 * 1024 * 1024)
    import hashlib

    assert result.stdout[2 * 1024 * 1024 :].split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_no_stdin_reads_dev_null(client: AgentClient) -> None:
    result = client.exec(["cat"])
    assert (result.status, result.stdout) == (0, b"")


def test_process_that_ignores_stdin(client: AgentClient) -> None:
    result = client.exec(["true"], input=os.urandom(4 * 1024 * 1024))
    assert result.status == 0
    # The connection is still in sync afterwards.
    assert client.exec(["echo", "next"]).stdout == b"next\n"


def test_env_replaces_the_environment(client: AgentClient) -> None:
    result = client.exec(["/usr/bin/env"], env={"ONLY": "this", "OTHER": "a=b c"})
    assert sorted(result.stdout.decode().splitlines()) == ["ONLY=this", "OTHER=a=b c"]


def test_default_environment(client: AgentClient) -> None:
    lines = client.exec(["env"]).stdout.decode().splitlines()
    assert sorted(line.split("=", 1)[0] for line in lines) == ["HOME", "PATH"]
    assert "HOME=/root" in lines


def test_path_search_uses_the_new_environment(client: AgentClient, tmp_path: Path) -> None:
    tool = tmp_path / "mytool"
    tool.write_text("#!/bin/sh\necho found me\n")
    tool.chmod(0o755)
    result = client.exec(["mytool"], env={"PATH": f"/nonexistent:{tmp_path}"})
    assert result.stdout == b"found me\n"


def test_cwd(client: AgentClient, tmp_path: Path) -> None:
    assert client.exec(["pwd"], cwd=str(tmp_path)).stdout.decode().strip() == str(tmp_path)
    assert client.exec(["pwd"]).stdout == b"/\n"


def test_missing_cwd_is_a_request_error(client: AgentClient) -> None:
    with pytest.raises(AgentRequestError, match=r"^chdir /nonexistent-dir: No such file or directory$"):
        client.exec(["pwd"], cwd="/nonexistent-dir")
    assert client.ping()


def test_command_not_found_exits_127(client: AgentClient) -> None:
    result = client.exec(["definitely-not-a-command-xyz", "arg"])
    assert (result.status, result.signal, result.timed_out) == (127, None, False)
    assert result.returncode == 127
    assert result.stderr == b"exec: definitely-not-a-command-xyz: not found\n"
    assert result.stdout == b""
    missing = client.exec(["/nonexistent/tool"])
    assert (missing.returncode, missing.stderr) == (127, b"exec: /nonexistent/tool: not found\n")
    assert client.exec(["true"]).status == 0


def test_not_executable_exits_126(client: AgentClient, tmp_path: Path) -> None:
    not_executable = tmp_path / "data.txt"
    not_executable.write_text("data\n")
    not_executable.chmod(0o644)
    result = client.exec([str(not_executable)])
    assert result.returncode == 126
    assert result.stderr == f"exec: {not_executable}: Permission denied\n".encode()
    # Found in PATH but not executable: the path that was refused is named.
    found = client.exec(["data.txt"], env={"PATH": str(tmp_path)})
    assert (found.returncode, found.stderr) == (126, f"exec: {not_executable}: Permission denied\n".encode())
    directory = client.exec([str(tmp_path)])
    assert directory.returncode == 126
    assert client.exec(["true"]).status == 0


def test_spawn_reports_a_missing_command_as_its_exit(client: AgentClient) -> None:
    process = client.spawn(["definitely-not-a-command-xyz"])
    result = process.wait()
    assert result.returncode == 127
    assert client.ping()


def test_run_as_nobody(client: AgentClient) -> None:
    nobody = pwd.getpwnam("nobody")
    result = client.exec(["sh", "-c", "id -u; id -g; id -G"], user="nobody")
    uid, gid, groups = result.stdout.decode().split("\n")[:3]
    assert int(uid) == nobody.pw_uid
    assert int(gid) == nobody.pw_gid
    assert [int(g) for g in groups.split()] == [nobody.pw_gid]


def test_run_as_numeric_uid_and_gid(client: AgentClient) -> None:
    result = client.exec(["sh", "-c", "id -u; id -g; id -G"], user="12345:23456")
    assert result.stdout.decode().split() == ["12345", "23456", "23456"]
    # An unknown numeric uid without a group gets gid 0, as in container runtimes.
    assert client.exec(["id", "-g"], user=54321).stdout == b"0\n"


def test_unknown_user(client: AgentClient) -> None:
    with pytest.raises(AgentRequestError, match=r"^user no-such-user not found in /etc/passwd$"):
        client.exec(["id"], user="no-such-user")


def test_timeout_kills_the_process_group(client: AgentClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    started = time.monotonic()
    result = client.exec(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; sleep 60"], timeout=0.5)
    elapsed = time.monotonic() - started
    assert result.timed_out
    assert result.signal == signal.SIGKILL
    assert 0.4 < elapsed < 5
    assert _gone(int(pidfile.read_text())), "the background child survived the timeout"


def test_exit_waits_for_output_but_not_for_lingering_background_children(client: AgentClient) -> None:
    started = time.monotonic()
    result = client.exec(["sh", "-c", "sleep 3 & echo done"], keep_background=True)
    assert result.stdout == b"done\n"
    assert time.monotonic() - started < 2


def test_background_processes_end_with_the_exec(client: AgentClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    result = client.exec(["sh", "-c", f"sleep 1000 >/dev/null 2>&1 & echo $! > {pidfile}"])
    assert result.status == 0
    assert _gone(int(pidfile.read_text())), "the background process outlived its exec"


def test_keep_background_keeps_them(client: AgentClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    result = client.exec(
        ["sh", "-c", f"sleep 1000 >/dev/null 2>&1 & echo $! > {pidfile}"], keep_background=True
    )
    assert result.status == 0
    pid = int(pidfile.read_text())
    try:
        assert not _gone(pid, within=0.5), "keep_background did not keep the background process"
    finally:
        os.kill(pid, signal.SIGKILL)


def test_pids_max_is_validated(client: AgentClient) -> None:
    with pytest.raises(AgentError, match="pids_max must not be negative"):
        client.exec(["true"], pids_max=-1)
    # Outside a VM there are no cgroups: the limit is accepted and has no effect.
    assert client.exec(["true"], pids_max=5).status == 0


def test_spawn_streams_output_as_it_arrives(client: AgentClient) -> None:
    process = client.spawn(["sh", "-c", "echo first; read line; echo got $line; echo oops >&2"], stdin=True)
    assert process.pid > 0
    events = iter(process)
    assert next(events) == Output("stdout", b"first\n")
    process.write_stdin(b"hello\n")
    process.close_stdin()
    rest = list(events)
    assert b"".join(e.data for e in rest if e.stream == "stdout") == b"got hello\n"
    assert b"".join(e.data for e in rest if e.stream == "stderr") == b"oops\n"
    assert process.result is not None and process.result.status == 0
    assert process.wait().status == 0


def test_connection_is_busy_while_a_spawned_process_runs(client: AgentClient) -> None:
    process = client.spawn(["sleep", "0.2"])
    with pytest.raises(AgentError, match="busy"):
        client.ping()
    assert process.wait().status == 0
    assert client.ping()


def test_disconnect_kills_the_process_group(agent: AgentServer, tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    client = agent.connect()
    client.spawn(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; sleep 60"])
    deadline = time.monotonic() + 5
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client.close()
    assert _gone(int(pidfile.read_text()))
    with agent.connect() as again:
        assert again.exec(["true"]).status == 0


def test_concurrent_connections(agent: AgentServer) -> None:
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with agent.connect() as c:
                results[i] = c.exec(["sh", "-c", f"sleep 0.5; echo {i}"]).stdout
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    assert not errors
    assert results == {i: f"{i}\n".encode() for i in range(8)}
    assert elapsed < 3, f"8 concurrent 0.5 s commands took {elapsed:.1f} s"


def test_many_requests_on_one_connection(client: AgentClient) -> None:
    for i in range(50):
        assert client.exec(["echo", str(i)]).stdout == f"{i}\n".encode()


def test_ping_reports_version(client: AgentClient) -> None:
    assert client.ping() == "0.1.0"


def test_no_agent_descriptors_leak_into_processes(agent: AgentServer) -> None:
    # Several connections open at once, so the agent holds several sockets and pipes.
    with agent.connect() as other, agent.connect() as client:
        assert other.ping()
        result = client.exec(["sh", "-c", "ls /proc/$$/fd"])
    assert sorted(int(fd) for fd in result.stdout.split()) == [0, 1, 2]


def test_signal_dispositions_are_reset(client: AgentClient) -> None:
    # The agent ignores SIGPIPE itself; its children must get the default (killed by SIGPIPE).
    result = client.exec(
        ["sh", "-c", "yes | head -c 1 >/dev/null; grep -E '^Sig(Ign|Blk)' /proc/self/status"]
    )
    lines = dict(line.split(":\t") for line in result.stdout.decode().splitlines())
    assert int(lines["SigBlk"], 16) == 0
    assert int(lines["SigIgn"], 16) == 0
