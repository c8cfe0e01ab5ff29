"""OCI images end to end: built with umoci, pushed with skopeo to a real registry on loopback,
pulled and run in a microVM with the image's Entrypoint/Cmd, Env, WorkingDir and User."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "oci"))
from _support import Registry, missing_tools, private_cache, skopeo_copy, start_registry, umoci_image
from supermachine.errors import ImageNotFoundError, InputError
from supermachine.image import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, str]]:
    """``127.0.0.1:PORT/e2e/busybox:latest``: every busybox applet, a ``nobody`` user, and a config
    whose Cmd reports what the runtime applied."""
    if missing := missing_tools():
        pytest.fail(f"missing tools {missing}; run scripts/setup.sh")
    work = tmp_path_factory.mktemp("image")
    root = work / "rootfs"
    for d in ("bin", "etc", "tmp", "srv", "root"):
        (root / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout
    for applet in applets.split():
        if applet != "busybox":
            os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/tmp:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    os.chmod(root / "tmp", 0o1777)
    layout = work / "layout"
    umoci_image(
        layout,
        "latest",
        root,
        work,
        {
            "env": "GREETING=hello",
            "workingdir": "/srv",
            "user": "nobody",
            "cmd": "sh",
        },
    )
    # umoci's --config.cmd takes one word per flag; add the rest of the Cmd.
    subprocess.run(
        [
            "umoci",
            "config",
            "--image",
            f"{layout}:latest",
            "--clear=config.cmd",
            "--config.cmd=sh",
            "--config.cmd=-c",
            '--config.cmd=echo "$GREETING from $(pwd) as $(id -u)"; exit 3',
        ],
        check=True,
    )
    registry = start_registry(work / "registry")
    try:
        skopeo_copy(f"oci:{layout}:latest", f"docker://{registry.host}/e2e/busybox:latest")
        yield registry, f"{registry.host}/e2e/busybox:latest"
    finally:
        registry.stop()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private image cache, sharing only the built guest kernel and agent with the user's cache
    (they are keyed by their inputs; rebuilding them per test would take minutes)."""
    private = private_cache(tmp_path / "cache")
    monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(private))
    return private


@pytest.mark.usefixtures("kvm")
def test_cli_run_pulls_converts_and_passes_stdin(registry_image: tuple[Registry, str], cache: Path) -> None:
    """`run -i` pulls and converts the image on the way, streams our stdin to the command and
    closes it at end of file (so `cat` ends)."""
    _, ref = registry_image
    proc = subprocess.run(
        [sys.executable, "-m", "supermachine", "run", "-i", ref, "--", "sh", "-c", "cat; echo done"],
        input="hi\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (proc.returncode, proc.stdout) == (0, "hi\ndone\n"), proc.stderr
    assert (cache / "rootfs").is_dir()


@pytest.mark.usefixtures("kvm", "cache")
def test_image_start_applies_the_image_config(registry_image: tuple[Registry, str]) -> None:
    _, ref = registry_image
    image = Image.from_oci(ref)
    assert image.argv() == ["sh", "-c", 'echo "$GREETING from $(pwd) as $(id -u)"; exit 3']
    assert image.argv(["id"]) == ["id"]
    with image.start(memory_mib=256) as vm:
        result = vm.exec(image.argv())
        assert (result.stdout, result.status) == (b"hello from /srv as 65534\n", 3)
        assert vm.exec(["id", "-u"], user="root").stdout == b"0\n"  # a call may override the image
        assert vm.exec(["pwd"], cwd="/").stdout == b"/\n"


@pytest.mark.usefixtures("cache")
def test_pull_policy_never_and_bad_refs(registry_image: tuple[Registry, str]) -> None:
    registry, _ = registry_image
    with pytest.raises(ImageNotFoundError, match="no stored image matches"):
        Image.from_oci(f"{registry.host}/e2e/busybox:latest", pull="never")
    with pytest.raises(InputError, match="pull must be"):
        Image.from_oci("x", pull="sometimes")  # type: ignore[arg-type]


@pytest.mark.usefixtures("kvm")
def test_cli_snapshot_then_run_from_it(registry_image: tuple[Registry, str], cache: Path) -> None:
    """`supermachine snapshot IMAGE -- WARM` bakes after the warm-up; `run snapshot:NAME` restores
    it with the image's config still applied; `snapshots` lists it."""
    _, ref = registry_image

    def sm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "supermachine", *args], capture_output=True, text=True, timeout=600
        )

    baked = sm("snapshot", "--name", "warm", "--memory", "256", ref, "--", "sh", "-c", "echo warm > /tmp/w")
    assert baked.returncode == 0, baked.stderr
    assert "warm: full, 256 MiB RAM" in baked.stdout
    ran = sm("run", "snapshot:warm", "--", "sh", "-c", 'cat /tmp/w; echo "$GREETING in $(pwd) as $(id -u)"')
    assert (ran.returncode, ran.stdout) == (0, "warm\nhello in /srv as 65534\n"), ran.stderr
    # The image's Cmd (exit 3) is the default command, and its status is passed on.
    assert sm("run", "snapshot:warm").returncode == 3
    listed = sm("snapshots", "--json")
    assert [(s["name"], s["image"], s["base"]) for s in json.loads(listed.stdout)] == [("warm", ref, None)]
    again = sm("snapshot", "--name", "warm", ref)
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert "already holds a snapshot" in again.stderr
    missing = sm("run", "snapshot:nowhere", "--", "true")
    assert missing.returncode == 1 and "metadata.json: missing" in missing.stderr


@pytest.mark.usefixtures("kvm", "cache")
def test_changes_commit_and_run_the_new_image(registry_image: tuple[Registry, str]) -> None:
    """vm.changes() names what a command added, changed and deleted; vm.commit() stores it as an
    image that `supermachine run` starts (a whole command), and `supermachine commit` stacks
    another layer on that image."""
    _, ref = registry_image
    with Image.from_oci(ref).start(memory_mib=256, user="root") as vm:
        vm.exec(
            [
                "sh",
                "-c",
                "echo made > /srv/made && chmod 4750 /srv/made && rm /etc/group"
                " && mkdir -p /opt/new && ln -s /srv/made /opt/new/link && echo x >> /etc/passwd",
            ],
            check=True,
        )
        rows = {str(c) for c in vm.changes()}
        assert {"A /srv/made", "D /etc/group", "A /opt/new/link", "C /etc/passwd", "C /srv"} <= rows, rows
        committed = vm.commit(
            "localhost/e2e/committed:1", changes={"cmd": ["cat", "/opt/new/link"]}, message="e2e"
        )
    assert committed.oci_image is not None and len(committed.oci_image.layers) == 2
    assert committed.config.user == "nobody"  # the parent's, kept
    assert committed.config.cmd == ("cat", "/opt/new/link")

    def sm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "supermachine", *args], capture_output=True, text=True, timeout=600
        )

    # committed:1 runs as a whole command: `supermachine commit` starts it and stacks a layer.
    stacked = sm(
        "commit",
        "--memory",
        "256",
        "-u",
        "root",
        "-c",
        'CMD ["sh", "-c", "cat /opt/new/link; stat -c %a /srv/made; test -e /etc/group || echo gone"]',
        "-c",
        "USER root",
        "localhost/e2e/committed:1",
        "localhost/e2e/committed:2",
        "--",
        "sh",
        "-c",
        "echo again >> /srv/made",
    )
    assert stacked.returncode == 0, stacked.stderr
    assert "docker.io" not in stacked.stdout and "committed:2: image" in stacked.stdout
    result = Image.from_oci("localhost/e2e/committed:2", pull="never").run()
    assert (result.status, result.stdout) == (0, b"made\nagain\n4750\ngone\n"), result.stderr
    failed = sm("commit", "localhost/e2e/committed:2", "localhost/e2e/never:1", "--", "false")
    assert failed.returncode == 1 and "nothing was stored" in failed.stderr
    with pytest.raises(ImageNotFoundError):
        Image.from_oci("localhost/e2e/never:1", pull="never")


@pytest.mark.usefixtures("kvm")
def test_cli_run_reaches_the_host_loopback_and_publishes_a_port(
    registry_image: tuple[Registry, str], cache: Path
) -> None:
    """`--allow-net host`: the guest fetches a page from a server on the host's loopback by the
    host's name; `-p HOST_PORT:GUEST_PORT`: a server in the guest then serves that page on the
    host's loopback. The port is gone with the command."""
    import http.server
    import signal
    import socket
    import threading
    import time
    import urllib.request

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "11")
            self.end_headers()
            self.wfile.write(b"from host!\n")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://host.supermachine.internal:{server.server_address[1]}/"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, ref = registry_image
    serve = f"wget -qO /tmp/index.html {url} && httpd -p 8080 -h /tmp && exec sleep 3600"
    argv = ["run", "--allow-net", "host", "-p", f"{port}:8080", ref, "--", "sh", "-c", serve]
    proc = subprocess.Popen(
        [sys.executable, "-m", "supermachine", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=30) as r:
                    assert r.read() == b"from host!\n"
                break
            except OSError:
                assert time.monotonic() < deadline, "the published port never answered"
                time.sleep(2)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        server.shutdown()
        server.server_close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_cli_network_options_are_checked_before_anything_starts(cache: Path) -> None:
    for args, complaint in [
        (["-p", "80"], "is not [HOST_IP:]HOST_PORT:GUEST_PORT"),
        (["--allow-net", "10.0.0.0/99"], "is not an IPv4 address or network"),
        (["--network", "none", "-p", "8080:80"], "cannot publish ports"),
        (["--add-host", "nocolon"], "expected NAME:IP"),
        (["--dns", "127.0.0.1"], "the guest's own loopback: use 'host'"),
        (["--network", "none", "--dns", "host"], "has no resolver"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "supermachine", "run", *args, "127.0.0.1:1/nothing:here", "--", "true"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode != 0 and complaint in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
