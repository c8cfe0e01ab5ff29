"""Commands that make images from what a VM did: ``commit IMAGE TAG -- CMD`` (docker run + docker
commit) and ``diff IMAGE -- CMD`` (docker run + docker diff)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import click

from supermachine.cli.vm import _copy_output, exit_status, network_from_options, parse_env, vm_options
from supermachine.errors import CommandFailedError
from supermachine.units import human_bytes

if TYPE_CHECKING:
    from supermachine.vm import Vm


@contextmanager
def _ran(
    image: str,
    command: tuple[str, ...],
    *,
    insecure: bool | None,
    timeout: float | None,
    show_console: bool,
    **config: object,
) -> Iterator[Vm]:
    """Boots IMAGE, runs COMMAND (streaming its output; it must succeed) and yields the VM."""
    from supermachine import ui
    from supermachine.image import Image
    from supermachine.oci.progress import RichProgress
    from supermachine.vm import VmConfig

    if command[:1] == ("--",):
        command = command[1:]
    with RichProgress() if ui.stderr.is_terminal else nullcontext() as progress:
        img = Image.from_oci(image, insecure=insecure, progress=progress)
    status = ui.stderr.status("booting the microVM", spinner="dots")
    with status if ui.stderr.is_terminal else nullcontext():
        vm = img.start(VmConfig(**config))  # type: ignore[arg-type]
    with vm:
        if command:
            process = vm.spawn(list(command), timeout=timeout)
            if not _copy_output(process):
                sys.exit(128 + signal.SIGPIPE)
            result = process.wait()
            if result.timed_out or result.returncode != 0:
                status_text = exit_status(result.status, result.signal, result.timed_out)
                raise CommandFailedError(
                    f"the command failed with exit status {status_text}; nothing was stored"
                )
        if show_console:
            ui.stderr.print(vm.console_log, markup=False, highlight=False)
        yield vm


def _config(options: dict[str, Any]) -> dict[str, object]:
    """The VmConfig fields the shared VM options (``vm_options``) ask for."""
    network = network_from_options(
        options["network_mode"],
        options["allow"],
        options["deny"],
        options["published"],
        options["add_hosts"],
        options["dns_server"],
    )
    return {
        "memory_mib": options["memory_mib"],
        "vcpus": options["vcpus"],
        "kernel": options["kernel"],
        "env": parse_env(options["env_pairs"]),
        "workdir": options["workdir"],
        "user": options["user"],
        "network": network or "egress",
    }


@click.command("commit", context_settings={"allow_interspersed_args": False})
@vm_options
@click.option(
    "-c",
    "--change",
    "change_lines",
    multiple=True,
    metavar="INSTRUCTION",
    help="Set the new image's config with a Dockerfile instruction: CMD, ENTRYPOINT, ENV, WORKDIR, "
    "USER, LABEL, EXPOSE, VOLUME or STOPSIGNAL (docker commit --change). Repeatable.",
)
@click.option("-m", "--message", help="A comment for the image's history.")
@click.option("--insecure/--secure", default=None, help="Plain HTTP (default: only for loopback registries).")
@click.argument("image")
@click.argument("tag")
@click.argument("command", nargs=-1)
def commit_cmd(
    image: str,
    tag: str,
    command: tuple[str, ...],
    change_lines: tuple[str, ...],
    message: str | None,
    insecure: bool | None,
    timeout: float | None,
    show_console: bool,
    **options: Any,
) -> None:
    """Boot IMAGE, run COMMAND in it (it must succeed), and store what it changed as the new image
    TAG: IMAGE's layers plus one layer of the changes (docker run, then docker commit).

    `supermachine run TAG` then starts from the changed file system. -u, -w and -e apply to
    COMMAND only; use --change to set them in the new image.
    """
    from supermachine import ui
    from supermachine.oci.commit import ConfigChanges, check_new_ref

    changes = ConfigChanges.parse(change_lines)  # before anything boots: a typo costs nothing
    check_new_ref(tag)
    config = _config(options)
    with _ran(image, command, insecure=insecure, timeout=timeout, show_console=show_console, **config) as vm:
        status = ui.stderr.status("storing the changes as a layer", spinner="dots")
        with status if ui.stderr.is_terminal else nullcontext():
            new = vm.commit(tag, changes=changes, message=message)
    assert new.oci_image is not None
    record = new.oci_image.record
    ui.stdout.print(
        f"{record.ref}: image {record.image_id}, {len(record.layers)} layers, {human_bytes(record.size)}",
        markup=False,
        highlight=False,
    )


@click.command("diff", context_settings={"allow_interspersed_args": False})
@vm_options
@click.option("--insecure/--secure", default=None, help="Plain HTTP (default: only for loopback registries).")
@click.argument("image")
@click.argument("command", nargs=-1)
def diff_cmd(
    image: str,
    command: tuple[str, ...],
    insecure: bool | None,
    timeout: float | None,
    show_console: bool,
    **options: Any,
) -> None:
    """Boot IMAGE, run COMMAND in it (it must succeed), and list the paths it added (A), changed
    (C) and deleted (D) in the root file system, like docker diff."""
    config = _config(options)
    with _ran(image, command, insecure=insecure, timeout=timeout, show_console=show_console, **config) as vm:
        rows = vm.changes()
    for row in rows:
        click.echo(str(row))
