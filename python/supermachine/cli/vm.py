"""``supermachine boot``: boot a microVM on a root filesystem image and run one command in it."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import click

from supermachine import ui
from supermachine.errors import InputError


def parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="-e/--env")
        env[key] = value
    return env


def exit_status(status: int | None, signal: int | None, timed_out: bool) -> int:
    """The process exit status the CLI passes on, shell-style: 124 for a timeout (as timeout(1)),
    128 + N for death by signal N."""
    if timed_out:
        return 124
    if signal is not None:
        return 128 + signal
    return status or 0


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("--rootfs", type=click.Path(path_type=Path), help="Root filesystem image (squashfs).")
@click.option("--memory", "memory_mib", default=512, show_default=True, help="Guest RAM in MiB.")
@click.option("--vcpus", default=1, show_default=True, help="Virtual CPUs.")
@click.option("-e", "--env", "env_pairs", multiple=True, metavar="KEY=VALUE", help="Environment variable.")
@click.option("-w", "--workdir", help="Working directory in the guest.")
@click.option("-u", "--user", help="User to run as (name, uid, name:group or uid:gid).")
@click.option("--timeout", type=float, help="Kill the command after this many seconds (exit 124).")
@click.option("--kernel", type=click.Path(path_type=Path), help="vmlinux to boot [default: built-in].")
@click.option("--console", "show_console", is_flag=True, help="Print the guest's console log at the end.")
@click.argument("command", nargs=-1, required=True)
def boot(
    rootfs: Path | None,
    memory_mib: int,
    vcpus: int,
    env_pairs: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    timeout: float | None,
    kernel: Path | None,
    show_console: bool,
    command: tuple[str, ...],
) -> None:
    """Boot a microVM and run COMMAND in it, streaming its output; exit with its status.

    A development entry point: it takes a root filesystem image directly. `supermachine run IMAGE`
    does the same for OCI images.
    """
    from supermachine.vm import Vm, VmConfig

    if rootfs is not None and not rootfs.is_file():
        raise InputError(f"root filesystem image {rootfs} does not exist")
    env = parse_env(env_pairs)
    config = VmConfig(rootfs=rootfs, memory_mib=memory_mib, vcpus=vcpus, kernel=kernel, env=env)
    with ui.stderr.status("booting the microVM", spinner="dots") if ui.stderr.is_terminal else nullcontext():
        vm = Vm.start(config)
    with vm:
        process = vm.spawn(
            list(command),
            cwd=workdir,
            user=user,
            timeout=timeout,
        )
        for event in process:
            stream = sys.stdout.buffer if event.stream == "stdout" else sys.stderr.buffer
            stream.write(event.data)
            stream.flush()
        result = process.wait()
        if show_console:
            ui.stderr.print(vm.console_log, markup=False, highlight=False)
    if result.timed_out:
        ui.warn(f"command timed out after {timeout:g} s and was killed")
    sys.exit(exit_status(result.status, result.signal, result.timed_out))


def register(group: click.Group) -> None:
    group.add_command(boot)
