"""``supermachine build``: Dockerfile builds, each RUN in a microVM (:mod:`supermachine.build`)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import click

from supermachine.errors import InputError
from supermachine.units import human_bytes


class BuildPrinter:
    """Progress as buildah prints it: a line per step, the steps' output as it comes (with
    ``output_to_stderr``, all of it on stderr, for commands whose stdout is a report)."""

    def __init__(self, quiet: bool, *, output_to_stderr: bool = False) -> None:
        self.quiet = quiet
        self.output_to_stderr = output_to_stderr

    def step(self, number: int, total: int, text: str) -> None:
        from supermachine import ui

        if not self.quiet:
            ui.stderr.print(
                f"[bold]STEP {number}/{total}:[/bold] {text}", markup=True, highlight=False, soft_wrap=True
            )

    def note(self, text: str) -> None:
        from supermachine import ui

        if not self.quiet:
            ui.stderr.print(text, markup=False, highlight=False)

    def output(self, data: bytes, stderr: bool) -> None:
        if self.quiet:
            return
        if self.output_to_stderr:
            from supermachine import ui

            # Through the console, so a progress display on it stays below the output.
            ui.stderr.out(data.decode(errors="replace"), end="", highlight=False)
            return
        stream = sys.stderr.buffer if stderr else sys.stdout.buffer
        stream.write(data)
        stream.flush()


def build_args_of(pairs: tuple[str, ...]) -> dict[str, str]:
    """``--build-arg`` values by name."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not key:
            raise InputError(f"--build-arg expected KEY=VALUE or KEY, got {pair!r}")
        if not sep:
            # docker's habit: `--build-arg KEY` takes KEY's value from this environment.
            if key not in os.environ:
                continue
            value = os.environ[key]
        out[key] = value
    return out


#: Largest secret read for a build (docker's limit is 500 KiB).
MAX_SECRET_BYTES = 512 << 10


def _secrets(specs: tuple[str, ...]) -> dict[str, bytes]:
    """``--secret id=NAME,src=FILE`` (or ``env=VAR``), docker's syntax: the secrets by id."""
    out: dict[str, bytes] = {}
    for spec in specs:
        fields = dict(item.partition("=")[::2] for item in spec.split(","))
        secret_id = fields.get("id", "")
        if not secret_id or set(fields) - {"id", "src", "source", "env", "type"}:
            raise InputError(f"--secret {spec!r}: expected id=NAME,src=FILE or id=NAME,env=VAR")
        if "env" in fields:
            if fields["env"] not in os.environ:
                raise InputError(f"--secret {spec!r}: the variable {fields['env']} is not set")
            data = os.environ[fields["env"]].encode()
        else:
            source = Path(fields.get("src") or fields.get("source") or secret_id)
            try:
                fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as exc:
                raise InputError(f"--secret {spec!r}: cannot read {source}: {exc.strerror}") from None
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise InputError(f"--secret {spec!r}: {source} is not a regular file")
                data = f.read(MAX_SECRET_BYTES + 1)
        if len(data) > MAX_SECRET_BYTES:
            raise InputError(f"--secret {spec!r}: larger than {MAX_SECRET_BYTES // 1024} KiB")
        out[secret_id] = data
    return out


@click.command("build")
@click.option("-t", "--tag", "tags", multiple=True, metavar="NAME[:TAG]", help="Name the image. Repeatable.")
@click.option(
    "-f",
    "--file",
    "dockerfile",
    type=click.Path(path_type=Path),
    help="The Dockerfile [default: CONTEXT/Dockerfile].",
)
@click.option(
    "--build-arg",
    "build_args",
    multiple=True,
    metavar="KEY[=VALUE]",
    help="Set a build argument. Repeatable.",
)
@click.option("--target", metavar="STAGE", help="Build this stage (and what it needs) only.")
@click.option(
    "--secret",
    "secret_specs",
    multiple=True,
    metavar="id=NAME[,src=FILE|,env=VAR]",
    help="A secret for RUN --mount=type=secret,id=NAME (never stored in the image). Repeatable.",
)
@click.option("--no-cache", is_flag=True, help="Run every step, taking nothing from the build cache.")
@click.option("--platform", metavar="OS/ARCH", help="Only linux/amd64 is built.")
@click.option("--memory", "memory_mib", default=1024, show_default=True, help="RAM of the build VMs in MiB.")
@click.option("--vcpus", default=1, show_default=True, help="vCPUs of the build VMs.")
@click.option(
    "--network",
    "network_mode",
    type=click.Choice(["egress", "none"]),
    default="egress",
    show_default=True,
    help="The network of RUN steps.",
)
@click.option(
    "--insecure/--secure",
    default=None,
    help="Plain HTTP for base images (default: only for loopback registries).",
)
@click.option(
    "--output",
    metavar="oci:DIR",
    help="Also write the image as an OCI layout in the new directory DIR.",
)
@click.option("--push", "push_to", metavar="REF", help="Also push the image to a registry as REF.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image id.")
@click.argument("context", type=click.Path(path_type=Path))
def build_cmd(
    tags: tuple[str, ...],
    dockerfile: Path | None,
    build_args: tuple[str, ...],
    target: str | None,
    secret_specs: tuple[str, ...],
    no_cache: bool,
    platform: str | None,
    memory_mib: int,
    vcpus: int,
    network_mode: str,
    insecure: bool | None,
    output: str | None,
    push_to: str | None,
    quiet: bool,
    context: Path,
) -> None:
    """Build the image described by a Dockerfile in CONTEXT, like docker build: every RUN runs in a
    microVM, every step is cached, and the result is stored (`supermachine run NAME`).

    Steps whose inputs did not change are taken from the build cache; a rebuild with nothing
    changed boots no VM. Consecutive RUN steps share one build VM.
    """
    from supermachine import ui
    from supermachine.build.builder import BuildOptions, build
    from supermachine.oci.push import push, write_oci_layout

    if output is not None and not output.startswith("oci:"):
        raise InputError(f"--output {output}: expected oci:DIR")
    if push_to is not None:
        from supermachine.oci.reference import Reference

        Reference.parse(push_to)  # a malformed name fails before the build
    options = BuildOptions(
        context=context,
        dockerfile=dockerfile,
        tags=tags,
        build_args=build_args_of(build_args),
        target=target,
        no_cache=no_cache,
        platform=platform,
        memory_mib=memory_mib,
        vcpus=vcpus,
        network=network_mode,
        insecure=insecure,
        secrets=_secrets(secret_specs),
    )
    result = build(options, BuildPrinter(quiet))
    record = result.image.record
    if not quiet:
        ui.stderr.print(
            f"COMMIT {', '.join(result.refs) or '(no tag)'}: {result.steps} steps,"
            f" {result.cached} from the cache, {result.ran} run, {len(record.layers)} layers,"
            f" {human_bytes(record.size)}",
            markup=False,
            highlight=False,
        )
    if output is not None:
        directory, _, tag = output.removeprefix("oci:").partition(":")
        write_oci_layout(result.image, Path(directory), name=tag or None)
        if not quiet:
            ui.stderr.print(f"Wrote the OCI layout {directory}", markup=False, highlight=False)
    if push_to is not None:
        digest = push(result.image, push_to, insecure=insecure)
        if not quiet:
            ui.stderr.print(f"Pushed {push_to} ({digest})", markup=False, highlight=False)
    click.echo(record.config_digest)
