"""`supermachine build` refusing bad input before any VM: one line naming the file and line, exit 1,
no traceback, nothing stored."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def context(tmp_path: Path) -> Path:
    ctx = tmp_path / "context"
    ctx.mkdir()
    (ctx / "notes.log").write_text("excluded\n")
    (ctx / ".dockerignore").write_text("*.log\n")
    return ctx


def build(context: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = context.parent / "bad.Dockerfile"
    path.write_text(text)
    env = {**os.environ, "SUPERMACHINE_CACHE_DIR": str(context.parent / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "supermachine", "build", "-q", "-f", str(path), *args, str(context)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("text", "args", "message"),
    [
        ("FROM scratch\nRUNN x\n", (), "bad.Dockerfile:2: unknown instruction RUNN"),
        ("RUN x\n", (), "bad.Dockerfile:1:"),
        ("FROM scratch\nONBUILD RUN x\n", (), "bad.Dockerfile:2: ONBUILD is not supported"),
        (
            "FROM scratch\nCOPY missing /x\n",
            (),
            "bad.Dockerfile:2: 'missing' does not exist in the build context",
        ),
        ("FROM scratch\nCOPY notes.log /x\n", (), "does not exist in the build context"),
        ("FROM scratch\nCOPY ../../etc/passwd /x\n", (), "does not exist in the build context"),
        ("FROM scratch\nCOPY https://example.com/x /x\n", (), "remote sources are not supported"),
        ("FROM scratch\nRUN --mount=type=cache,target=/x true\n", (), "is not supported"),
        ("FROM scratch\nEXPOSE http\n", (), "bad.Dockerfile:2: EXPOSE: 'http' is not PORT"),
        ("FROM scratch AS a\nFROM scratch\n", ("--target", "nope"), "no build stage named 'nope'"),
        ("FROM scratch\n", ("--platform", "linux/arm64"), "builds only linux/amd64"),
        ("FROM scratch\n", ("-t", "Bad:Name"), "cannot name the new image"),
    ],
)
def test_bad_input_fails_in_one_line_before_any_vm(
    context: Path, text: str, args: tuple[str, ...], message: str
) -> None:
    result = build(context, text, *args)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not (context.parent / "cache" / "images.json").exists()


def test_a_scratch_image_with_metadata_only_is_built_without_a_vm(context: Path) -> None:
    """Config-only steps need no VM: FROM scratch + ENV/LABEL/CMD builds on any host."""
    result = build(context, 'FROM scratch\nENV A=1\nLABEL x=y\nCMD ["/app"]\n', "-t", "meta:1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("sha256:")


def test_image_build_returns_the_stored_image(context: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from supermachine.image import Image

    monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(context.parent / "cache"))
    (context / "Dockerfile").write_text('FROM scratch\nENV A=1\nCMD ["/app"]\nEXPOSE 80\n')
    image = Image.build(context, tag="meta:2")
    assert image.ref == "docker.io/library/meta:2"
    assert image.config.cmd == ("/app",) and image.config.exposed_ports == ("80/tcp",)
    assert image.config.environment()["A"] == "1" and "PATH" in image.config.environment()
    assert image.rootfs is not None and image.rootfs.is_file()
    assert Image.from_oci("meta:2", pull="never").config == image.config


def test_an_untagged_build_is_listed_as_none_and_runs_by_id(context: Path) -> None:
    result = build(context, 'FROM scratch\nCMD ["/x"]\n')
    assert result.returncode == 0, result.stderr
    digest = result.stdout.strip()
    env = {**os.environ, "SUPERMACHINE_CACHE_DIR": str(context.parent / "cache")}
    listed = subprocess.run(
        [sys.executable, "-m", "supermachine", "images"], capture_output=True, text=True, env=env, timeout=60
    )
    row = next(line for line in listed.stdout.splitlines() if digest[7:19] in line)
    assert row.split()[:2] == ["<none>", "<none>"]
    from supermachine.oci import ImageStore

    assert ImageStore(context.parent / "cache").resolve(digest[7:19]).config_digest == digest
