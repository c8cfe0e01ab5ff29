"""`supermachine build` against the reference builder: the same Dockerfiles and context built by
supermachine (each RUN in a microVM) and by buildah must give the same root file systems (paths,
types, modes, owners, symlink targets, file contents, hard links) and the same configs (Env, Cmd,
Entrypoint, WorkingDir, User, ExposedPorts, Labels, Volumes, StopSignal).

Documented differences, left out of the comparison: times (every builder stamps its own), the
label buildah adds (``io.buildah.version``), and the mount points a container builder's runtime
leaves behind (see ``_RUNTIME_LEFTOVERS``). Also the cache (a rebuild takes every step from it; a
changed COPY source reruns that step and the later ones), a failing RUN and a malformed Dockerfile.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "oci"))
from _support import full_busybox_rootfs, private_cache, tree_metadata, umoci_image
from supermachine.errors import KvmUnavailableError
from supermachine.oci import build_rootfs, load_image
from supermachine.vm import check_kvm

pytestmark = pytest.mark.slow

#: Paths buildah's RUN runtime may create that are no image content (mount points of its bind
#: mounts and API file systems); supermachine's build VM keeps its mounts out of the layers.
_RUNTIME_LEFTOVERS = {
    "run",
    "dev",
    "proc",
    "sys",
    "etc/hosts",
    "etc/resolv.conf",
    "etc/hostname",
}

DOCKERFILE_SINGLE = """\
ARG BASE
FROM ${BASE}
ARG GREETING=hello
ENV APP=/app NAME="with space"
WORKDIR $APP
COPY --chown=1000:1000 dir/ ./dir/
COPY hello.txt notes.* ./
ADD app.tar /opt/unpacked/
# a comment, and a continued line
RUN echo "$GREETING $NAME" > made.txt \\
 && rm /etc/motd \\
 && rm -rf /etc/removed && mkdir /etc/removed && echo new > /etc/removed/other \\
 && chmod 0600 hello.txt && ln -s made.txt link && ln made.txt hard \\
 && mkdir -p /var/tmpdir && echo x > /var/tmpdir/f && echo t > /tmp/kept
RUN rm /var/tmpdir/f && echo y >> made.txt && chown 1000:1000 made.txt
RUN --mount=type=secret,id=tok,required=true wc -c < /run/secrets/tok > /app/secret-size
USER app
EXPOSE 8080/tcp 53/udp
LABEL org.test.a=1 b="two words"
VOLUME /data
STOPSIGNAL SIGTERM
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["cat made.txt"]
"""

DOCKERFILE_MULTI = """\
ARG BASE
FROM ${BASE} AS build
RUN mkdir -p /out/sub && echo built > /out/artifact && chmod 0750 /out/artifact && echo s > /out/sub/s \
 && ln -s ../../../../../../../etc/passwd /out/evil
FROM ${BASE}
COPY --from=build /out/artifact /usr/local/bin/
COPY --from=build /out/sub /srv/sub
# A link that climbs out of the stage's root resolves inside it, as in a container.
COPY --from=build /out/evil /copied-passwd
RUN cat /usr/local/bin/artifact > /copied
"""


@dataclass
class Setup:
    base: str
    context: Path
    cache: Path
    buildah_root: Path
    secret: Path


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1800, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    try:
        check_kvm()
    except KvmUnavailableError as exc:
        pytest.skip(f"KVM is not usable here: {exc}")
    if shutil.which("buildah") is None:
        pytest.fail("buildah is not installed; run scripts/setup.sh")
    work = tmp_path_factory.mktemp("buildah-compare")
    root = full_busybox_rootfs(
        work / "rootfs",
        "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        "root:x:0:\napp:x:1000:\n",
        ("etc/removed", "usr/local/bin", "var"),
    )
    (root / "etc/motd").write_text("motd\n")
    (root / "etc/removed/a").write_text("a\n")
    (root / "etc/removed/b").write_text("b\n")
    layout = work / "layout"
    umoci_image(layout, "base", root, work, {"cmd": "sh"})
    context = work / "context"
    (context / "dir/nested").mkdir(parents=True)
    (context / "dir/nested/deep.txt").write_text("deep\n")
    (context / "dir/top.sh").write_text("#!/bin/sh\necho top\n")
    os.chmod(context / "dir/top.sh", 0o755)
    os.symlink("top.sh", context / "dir/link")
    (context / "hello.txt").write_text("hello\n")
    (context / "notes.md").write_text("notes\n")
    (context / "notes.log").write_text("excluded\n")
    (context / ".dockerignore").write_text("*.log\nsecret/\n")
    (context / "secret").mkdir()
    (context / "secret/key").write_text("never copied\n")
    with tarfile.open(context / "app.tar", "w") as tar:
        for name, data, mode in (
            ("bin/app", b"#!/bin/sh\necho app\n", 0o755),
            ("share/readme", b"r\n", 0o644),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), mode, 0, 0
            tar.addfile(info, io.BytesIO(data))
    cache = private_cache(work / "cache")
    secret = work / "tok.secret"
    secret.write_text("s3cr3t-value\n")
    yield Setup(f"oci:{layout}:base", context, cache, work / "buildah", secret)


def base_args(setup: Setup) -> list[str]:
    """The arguments every build here takes: the base image and the step secret."""
    return ["--build-arg", f"BASE={setup.base}", "--secret", f"id=tok,src={setup.secret}"]


def sm(setup: Setup, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SUPERMACHINE_CACHE_DIR": str(setup.cache)}
    return _run([sys.executable, "-m", "supermachine", *args], env=env)


def buildah(setup: Setup, *args: str) -> subprocess.CompletedProcess[str]:
    base = [
        "buildah",
        "--root",
        str(setup.buildah_root / "root"),
        "--runroot",
        str(setup.buildah_root / "run"),
    ]
    return _run([*base, "--storage-driver", "vfs", *args])


def build_both(setup: Setup, name: str, dockerfile: str) -> tuple[str, str]:
    """Builds ``dockerfile`` with both builders; returns supermachine's and buildah's image ids."""
    path = setup.context.parent / f"{name}.Dockerfile"
    path.write_text(dockerfile)
    ours = sm(
        setup,
        "build",
        "-f",
        str(path),
        *base_args(setup),
        "-t",
        f"{name}:1",
        str(setup.context),
    )
    assert ours.returncode == 0, ours.stderr[-3000:]
    theirs = buildah(
        setup,
        "bud",
        "--isolation",
        "chroot",
        "-f",
        str(path),
        *base_args(setup),
        "-t",
        f"{name}:1",
        str(setup.context),
    )
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    return ours.stdout.strip().splitlines()[-1], theirs.stdout.strip().splitlines()[-1]


def our_tree(
    setup: Setup, image_id: str, dest: Path
) -> tuple[dict[str, tuple[object, ...]], dict[str, object]]:
    os.environ["SUPERMACHINE_CACHE_DIR"] = str(setup.cache)
    try:
        image = load_image(image_id)
        build_rootfs(image, dest)
        config = json.loads(image.store.blobs.read_bytes(image.config_digest))["config"]
    finally:
        del os.environ["SUPERMACHINE_CACHE_DIR"]
    return tree_metadata(dest), config


def their_tree(setup: Setup, name: str) -> tuple[dict[str, tuple[object, ...]], dict[str, object]]:
    container = buildah(setup, "from", "--pull-never", f"{name}:1").stdout.strip()
    mount = buildah(setup, "mount", container).stdout.strip()
    try:
        tree = tree_metadata(Path(mount))
    finally:
        buildah(setup, "umount", container)
        buildah(setup, "rm", container)
    inspect = json.loads(buildah(setup, "inspect", "--type", "image", f"{name}:1").stdout)
    return tree, inspect["OCIv1"]["config"]


def compare(ours: dict[str, tuple[object, ...]], theirs: dict[str, tuple[object, ...]]) -> None:
    leftovers = {
        p for p in theirs if p in _RUNTIME_LEFTOVERS or any(p.startswith(f"{d}/") for d in _RUNTIME_LEFTOVERS)
    }
    theirs = {p: v for p, v in theirs.items() if p not in leftovers}
    ours = {p: v for p, v in ours.items() if p not in leftovers}
    assert (sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())) == ([], [])
    different = {p: (ours[p], theirs[p]) for p in ours if ours[p] != theirs[p]}
    assert different == {}


_CONFIG_KEYS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "ExposedPorts", "Volumes", "StopSignal")


def compare_config(ours: dict[str, object], theirs: dict[str, object]) -> None:
    for key in _CONFIG_KEYS:
        assert (key, ours.get(key) or None) == (key, theirs.get(key) or None)
    their_labels = {k: v for k, v in (theirs.get("Labels") or {}).items() if k != "io.buildah.version"}  # type: ignore[attr-defined]
    assert (ours.get("Labels") or {}) == their_labels


@pytest.mark.heavy
def test_single_stage_build_matches_buildah(setup: Setup, tmp_path: Path) -> None:
    ours, _ = build_both(setup, "single", DOCKERFILE_SINGLE)
    our, our_config = our_tree(setup, ours, tmp_path / "ours")
    their, their_config = their_tree(setup, "single")
    compare(our, their)
    compare_config(our_config, their_config)
    assert our["app/made.txt"][2:4] == (1000, 1000)
    assert "app/notes.log" not in our and "app/secret" not in our  # .dockerignore
    assert "var/tmpdir/f" not in our and "etc/motd" not in our and "etc/removed/a" not in our
    assert our["tmp/kept"][0] == stat.S_IFREG  # /tmp is the image's own in a build
    # The secret was there for its step, and is in no layer.
    assert (tmp_path / "ours/app/secret-size").read_text().strip() == "13"
    assert "run" not in our
    os.environ["SUPERMACHINE_CACHE_DIR"] = str(setup.cache)
    try:
        image = load_image(ours)
        for layer in image.layers:
            with image.store.blobs.open(layer.digest) as f:
                assert b"s3cr3t" not in gzip.decompress(f.read())
    finally:
        del os.environ["SUPERMACHINE_CACHE_DIR"]


@pytest.mark.heavy
def test_multi_stage_build_matches_buildah(setup: Setup, tmp_path: Path) -> None:
    ours, _ = build_both(setup, "multi", DOCKERFILE_MULTI)
    our, our_config = our_tree(setup, ours, tmp_path / "ours")
    their, their_config = their_tree(setup, "multi")
    compare(our, their)
    compare_config(our_config, their_config)
    assert "out" not in our  # the build stage's files stay there
    image_passwd = "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
    assert our["copied-passwd"][4] == hashlib.sha256(image_passwd.encode()).hexdigest()


@pytest.mark.heavy
def test_rebuild_uses_the_cache_and_a_changed_source_reruns_from_its_step(setup: Setup) -> None:
    path = setup.context.parent / "single.Dockerfile"
    path.write_text(DOCKERFILE_SINGLE)
    args = (
        "build",
        "-f",
        str(path),
        *base_args(setup),
        "-t",
        "single:2",
        str(setup.context),
    )
    first = sm(setup, *args)  # all from the cache when the single-stage test ran before
    assert first.returncode == 0, first.stderr[-3000:]
    again = sm(setup, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 run" in again.stderr and "booting" not in again.stderr
    (setup.context / "notes.md").write_text("notes, changed\n")
    try:
        changed = sm(setup, *args)
    finally:
        (setup.context / "notes.md").write_text("notes\n")
    assert changed.returncode == 0, changed.stderr[-3000:]
    # WORKDIR and the first COPY come from the cache; the changed COPY, ADD and the three RUNs run.
    assert "2 from the cache, 5 run" in changed.stderr, changed.stderr[-2000:]


@pytest.mark.heavy
def test_a_failing_run_stops_the_build_with_its_output_and_keeps_the_cache(setup: Setup) -> None:
    path = setup.context.parent / "failing.Dockerfile"
    path.write_text("ARG BASE\nFROM ${BASE}\nWORKDIR /app\nRUN echo doing it && echo broken >&2 && exit 3\n")
    failed = sm(setup, "build", "-f", str(path), *base_args(setup), str(setup.context))
    assert failed.returncode == 1
    assert "failing.Dockerfile:4: RUN" in failed.stderr and "exit status 3" in failed.stderr
    assert "broken" in failed.stderr and "doing it" in failed.stdout
    assert failed.stderr.strip().splitlines()[-1].startswith("error: ")
    for entry in (setup.cache / "build" / "steps").iterdir():
        json.loads(entry.read_text())  # every cache entry complete
    again = sm(setup, "build", "-f", str(path), *base_args(setup), str(setup.context))
    assert "Using cache" in again.stderr  # the WORKDIR step before it was kept


def _vmm_pids() -> set[int]:
    found = subprocess.run(["pgrep", "-f", "supermachine-vmm"], capture_output=True, text=True).stdout
    return {int(p) for p in found.split()}


@pytest.mark.heavy
def test_kill_9_mid_build_leaves_the_stores_consistent(setup: Setup) -> None:
    """A build killed while its VM boots leaves complete cache entries and images only, no VM
    behind, and nothing `prune` cannot clear; the next build works."""
    path = setup.context.parent / "slow.Dockerfile"
    path.write_text("ARG BASE\nFROM ${BASE}\nRUN sleep 600\n")
    before = _vmm_pids()
    env = {**os.environ, "SUPERMACHINE_CACHE_DIR": str(setup.cache)}
    cmd = [
        sys.executable,
        "-m",
        "supermachine",
        "build",
        "-f",
        str(path),
        *base_args(setup),
    ]
    proc = subprocess.Popen([*cmd, str(setup.context)], env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "booting a build VM" in line:
            break
    time.sleep(3)
    proc.kill()
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while _vmm_pids() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _vmm_pids() - before == set(), "a VMM worker outlived the killed build"
    for entry in (setup.cache / "build" / "steps").iterdir():
        json.loads(entry.read_text())
    json.loads((setup.cache / "images.json").read_text())
    pruned = sm(setup, "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert not any((setup.cache / "tmp").iterdir())
    again = sm(
        setup,
        "build",
        "-f",
        str(setup.context.parent / "single.Dockerfile"),
        *base_args(setup),
        str(setup.context),
    )
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.heavy
def test_a_changed_later_step_restores_the_vm_of_the_step_before(setup: Setup, tmp_path: Path) -> None:
    """Each step that ran leaves a snapshot of its build VM (a diff against the previous one); a
    rebuild whose first changed step follows it restores that VM instead of booting one."""
    path = setup.context.parent / "restore.Dockerfile"
    path.write_text('ARG BASE\nFROM ${BASE}\nRUN echo one > /one\nARG LAST=a\nRUN echo "$LAST" > /last\n')
    args = ("build", "-f", str(path), *base_args(setup))
    first = sm(setup, *args, "-t", "restore:1", str(setup.context))
    assert first.returncode == 0, first.stderr[-2000:]
    again = sm(setup, *args, "--build-arg", "LAST=b", "-t", "restore:2", str(setup.context))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "restoring the build VM of the last step" in again.stderr and "booting" not in again.stderr
    assert "1 from the cache, 1 run" in again.stderr
    our_tree(setup, again.stdout.strip().splitlines()[-1], tmp_path / "tree")
    assert (tmp_path / "tree/last").read_text() == "b\n" and (tmp_path / "tree/one").read_text() == "one\n"
    assert len(list((setup.cache / "build" / "snapshots").iterdir())) >= 2


def _step_snapshot_of_layer(cache: Path, digest: str) -> str:
    """The snapshot name of the cache entry that made the layer ``digest``."""
    for entry in (cache / "build" / "steps").iterdir():
        data = json.loads(entry.read_text())
        if data.get("layer") and data["layer"]["digest"] == digest and data.get("snapshot"):
            return str(data["snapshot"]["name"])
    raise AssertionError(f"no cache entry with a snapshot made {digest}")


@pytest.mark.heavy
def test_prune_drops_the_steps_and_snapshots_of_removed_images_only(setup: Setup) -> None:
    """After the restore test: removing ``restore:1`` (its own last layer) deletes that step's cache
    entry and build VM snapshot; the snapshots of ``restore:2``'s steps stay, with the root file
    system they run on, and still serve a rebuild."""
    from supermachine.oci.store import ImageStore

    store = ImageStore(setup.cache)
    gone_layer = store.resolve("restore:1").layers[-1]
    kept_layer = store.resolve("restore:2").layers[-1]
    gone = _step_snapshot_of_layer(setup.cache, gone_layer)
    kept = _step_snapshot_of_layer(setup.cache, kept_layer)
    snapshots = setup.cache / "build" / "snapshots"
    assert (snapshots / gone).is_dir() and (snapshots / kept).is_dir()
    removed = sm(setup, "rmi", "restore:1")
    assert removed.returncode == 0, removed.stderr
    pruned = sm(setup, "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert not (snapshots / gone).exists()
    assert (snapshots / kept).is_dir()
    steps = [json.loads(p.read_text()) for p in (setup.cache / "build" / "steps").iterdir()]
    assert all(not s.get("layer") or s["layer"]["digest"] != gone_layer for s in steps)
    path = setup.context.parent / "restore.Dockerfile"
    args = ("build", "-f", str(path), *base_args(setup), "--build-arg", "LAST=c", str(setup.context))
    again = sm(setup, *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "restoring the build VM of the last step" in again.stderr and "booting" not in again.stderr
