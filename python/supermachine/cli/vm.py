"""Commands that run something in a microVM: ``run IMAGE`` (OCI images) and ``boot`` (a raw
root filesystem image, for development).

The VM, image and terminal-output machinery is imported inside the commands, so that loading this
module to parse a command line, or to show its help, costs next to nothing. ``_core``, for
the options' defaults, stays: loading the Rust extension takes under a millisecond.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import click

from supermachine import _core
from supermachine.cli.terminal import PLAIN, Stdio, guest_env, raw_terminal, window_size
from supermachine.errors import AgentError, InputError, SupermachineError

if TYPE_CHECKING:
    from supermachine.agent import Process
    from supermachine.network import Network
    from supermachine.vm import SharedFolder, VolumeMount

#: Bytes read from the host's stdin at a time with ``-i`` (one stdin frame).
_STDIN_CHUNK = 64 * 1024


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


def _forward_stdin(process: Process) -> None:
    """Copies the host's stdin to the process until end of file, then closes the process's stdin
    (also when our stdin cannot be read). Runs in a thread of its own; it stops quietly once the
    process or the VM is gone."""
    try:
        with contextlib.suppress(AgentError, OSError, ValueError, AttributeError):
            while chunk := os.read(sys.stdin.fileno(), _STDIN_CHUNK):
                process.write_stdin(chunk)
    finally:
        with contextlib.suppress(AgentError):
            process.close_stdin()


def _copy_output(process: Process) -> bool:
    """Writes the process's output to ours as it comes; ``False`` if our stdout or stderr was
    closed by the reader (``| head``), which ends the copy (and, with the VM, the command)."""
    try:
        for event in process:
            stream = sys.stdout.buffer if event.stream == "stdout" else sys.stderr.buffer
            stream.write(event.data)
            stream.flush()
    except BrokenPipeError:
        # Nothing more can be shown; keep Python's exit-time flush from failing on the pipe too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return False
    except OSError as e:
        raise SupermachineError(f"cannot pass on the command's output: {e.strerror or e}") from None
    return True


def _run_streaming(
    config: object,
    argv: list[str],
    timeout: float | None,
    show_console: bool,
    snapshot: Path | None = None,
    stdio: Stdio = PLAIN,
) -> int:
    """Boots a VM from ``config`` (or restores ``snapshot``), runs ``argv`` streaming its output
    (and, ``interactive``, our stdin to its stdin; with ``tty``, on a terminal in the guest),
    returns the exit status."""
    from supermachine import ui
    from supermachine.vm import Vm, VmConfig

    assert isinstance(config, VmConfig)
    stdio.check()
    doing = "booting the microVM" if snapshot is None else "restoring the microVM"
    status = ui.stderr.status(doing, spinner="dots")
    with status if ui.stderr.is_terminal else nullcontext():
        if snapshot is None:
            vm = Vm.start(config)
        else:
            vm = Vm.restore(
                snapshot,
                env=config.env or None,
                workdir=config.workdir,
                user=config.user,
                network=None if config.network == "egress" else config.network,
                mounts=config.mounts,
                volumes=config.volumes,
            )
    with vm:
        if stdio.tty:
            process = vm.spawn(
                argv,
                env=guest_env(config.env),
                timeout=timeout,
                stdin=stdio.interactive,
                tty=True,
                tty_size=window_size(),
            )
            with raw_terminal(process, stdio.interactive):
                copied = _copy_output(process)
        else:
            process = vm.spawn(argv, timeout=timeout, stdin=stdio.interactive)
            if stdio.interactive:
                threading.Thread(target=_forward_stdin, args=(process,), name="stdin", daemon=True).start()
            copied = _copy_output(process)
        if not copied:
            return 128 + signal.SIGPIPE  # as a shell reports a command killed by SIGPIPE
        result = process.wait()
        if show_console:
            ui.stderr.print(vm.console_log, markup=False, highlight=False)
    if result.timed_out:
        ui.warn(f"command timed out after {timeout:g} s and was killed")
    return exit_status(result.status, result.signal, result.timed_out)


def vm_options(f: click.decorators.FC) -> click.decorators.FC:
    """Options shared by every command that starts a VM."""
    for option in reversed(
        [
            click.option(
                "--memory",
                "memory_mib",
                default=_core.DEFAULT_MEMORY_MIB,
                show_default=True,
                help="Guest RAM in MiB.",
            ),
            click.option("--vcpus", default=_core.DEFAULT_VCPUS, show_default=True, help="Virtual CPUs."),
            click.option(
                "-e", "--env", "env_pairs", multiple=True, metavar="KEY=VALUE", help="Set a variable."
            ),
            click.option("-w", "--workdir", help="Working directory in the guest."),
            click.option("-u", "--user", help="User to run as (name, uid, name:group or uid:gid)."),
            click.option(
                "--timeout", type=float, help="Kill the command after this many seconds (exit 124)."
            ),
            click.option(
                "--kernel", type=click.Path(path_type=Path), help="vmlinux to boot [default: built-in]."
            ),
            click.option(
                "--console", "show_console", is_flag=True, help="Print the guest console log at the end."
            ),
            click.option(
                "--network",
                "network_mode",
                type=click.Choice(["egress", "none"]),
                default="egress",
                show_default=True,
                help="egress: outbound connections (private, loopback and metadata ranges refused "
                "unless allowed); none: no network card.",
            ),
            click.option(
                "--allow-net",
                "allow",
                multiple=True,
                metavar="TARGET",
                help="Allow a destination: an IPv4 address or CIDR, 'host' (this host's loopback, "
                "as host.supermachine.internal), a domain or *.domain. Repeatable.",
            ),
            click.option(
                "--deny-net",
                "deny",
                multiple=True,
                metavar="TARGET",
                help="Refuse a destination (same forms; 0.0.0.0/0: all but what is allowed). "
                "The most specific rule wins. Repeatable.",
            ),
            click.option(
                "-p",
                "--publish",
                "published",
                multiple=True,
                metavar="[IP:]HOST_PORT:GUEST_PORT[/udp]",
                help="Forward a host port (on 127.0.0.1 unless IP is given) to a guest port. Repeatable.",
            ),
            click.option(
                "--add-host",
                "add_hosts",
                multiple=True,
                metavar="NAME:IP",
                help="Add a line to the guest's /etc/hosts (IP may be 'host'). Repeatable.",
            ),
            click.option(
                "--dns",
                "dns_server",
                metavar="IP",
                help="The guest's DNS server: an IPv4 address, or 'host' for one on this host's "
                "loopback [default: the host's own resolvers, forwarded].",
            ),
        ]
    ):
        f = option(f)
    return f


def network_from_options(
    network_mode: str,
    allow: tuple[str, ...],
    deny: tuple[str, ...],
    published: tuple[str, ...],
    add_hosts: tuple[str, ...],
    dns_server: str | None = None,
) -> Network | None:
    """The VM's network as the command line asks for it (docker's habits); ``None`` when nothing
    was asked (the default: egress for a boot, the snapshot's for a restore)."""
    from supermachine.errors import NetworkError
    from supermachine.network import Network, PortMapping

    if network_mode == "egress" and not (allow or deny or published or add_hosts or dns_server):
        return None
    hosts: dict[str, str] = {}
    for pair in add_hosts:
        name, sep, address = pair.partition(":")
        if not sep or not name or not address:
            raise NetworkError(f"--add-host expected NAME:IP, got {pair!r}")
        hosts[name] = address
    return Network(
        mode="none" if network_mode == "none" else "egress",
        allow=allow,
        deny=deny,
        ports=tuple(PortMapping.parse(spec) for spec in published),
        hosts=hosts,
        dns_server=dns_server,
    ).validated()


def volume_option(f: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "-v",
        "--volume",
        "volume_specs",
        multiple=True,
        metavar="SOURCE:/DIR[:ro]",
        help="Mount at DIR a host folder (SOURCE starts with /, . or ~; the guest works in it "
        "directly) or a named volume (supermachine volume create NAME; one VM at a time may write "
        "to it). Repeatable.",
    )(f)


def _mounts(specs: tuple[str, ...]) -> tuple[tuple[VolumeMount, ...], tuple[SharedFolder, ...]]:
    """The ``-v`` specs: named volumes, and host folders."""
    from supermachine.vm import SharedFolder, VolumeMount, parse_mount

    parsed = [parse_mount(spec) for spec in specs]
    return (
        tuple(m for m in parsed if isinstance(m, VolumeMount)),
        tuple(m for m in parsed if isinstance(m, SharedFolder)),
    )


def stdio_options(f: click.decorators.FC) -> click.decorators.FC:
    """``-i`` and ``-t``, as docker run has them."""
    f = click.option(
        "-t",
        "--tty",
        is_flag=True,
        help="Run the command on a terminal in the guest (with -i: ours in raw mode, keys and "
        "window size passed on).",
    )(f)
    return click.option(
        "-i",
        "--interactive",
        is_flag=True,
        help="Pass this program's stdin to the command's stdin until end of file.",
    )(f)


@click.command(context_settings={"allow_interspersed_args": False})
@vm_options
@stdio_options
@volume_option
@click.option("--platform", metavar="OS/ARCH[/VARIANT]", help="Platform to pick from a multi-arch image.")
@click.option("--insecure/--secure", default=None, help="Plain HTTP (default: only for loopback registries).")
@click.option(
    "--pull",
    type=click.Choice(["missing", "always", "never"]),
    default="missing",
    show_default=True,
    help="When to fetch the image from its registry.",
)
@click.argument("image")
@click.argument("command", nargs=-1)
def run(
    image: str,
    command: tuple[str, ...],
    memory_mib: int,
    vcpus: int,
    env_pairs: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    timeout: float | None,
    kernel: Path | None,
    show_console: bool,
    network_mode: str,
    allow: tuple[str, ...],
    deny: tuple[str, ...],
    published: tuple[str, ...],
    add_hosts: tuple[str, ...],
    dns_server: str | None,
    interactive: bool,
    tty: bool,
    volume_specs: tuple[str, ...],
    platform: str | None,
    insecure: bool | None,
    pull: str,
) -> None:
    """Run IMAGE in a microVM, like docker run: its Entrypoint with COMMAND (or its Cmd), its Env,
    WorkingDir and User; output is streamed and the exit status passed on.

    IMAGE is a registry reference, oci:DIR[:TAG] or docker-archive:FILE; it is pulled if needed.
    snapshot:DIR restores a snapshot made by `supermachine snapshot` (or `vm.snapshot`) instead
    of booting; a bare name there is looked up in the snapshot store.
    Put COMMAND after `--` when it has options of its own. With -i, stdin is passed to COMMAND
    (`echo hi | supermachine run -i IMAGE -- cat`); without it COMMAND reads nothing.
    """
    from supermachine import ui
    from supermachine.image import Image, PullPolicy
    from supermachine.oci.progress import RichProgress
    from supermachine.vm import VmConfig

    if command[:1] == ("--",):  # options stop at IMAGE, so click keeps a `--` that follows it
        command = command[1:]
    env = parse_env(env_pairs)
    network = network_from_options(network_mode, allow, deny, published, add_hosts, dns_server)
    named_volumes, folders = _mounts(volume_specs)
    if image.startswith("snapshot:"):
        where = image.removeprefix("snapshot:")
        stdio = Stdio(interactive, tty)
        mounted = (named_volumes, folders)
        sys.exit(
            _run_snapshot(where, command, env, workdir, user, timeout, show_console, stdio, network, mounted)
        )
    policy: PullPolicy = "always" if pull == "always" else "never" if pull == "never" else "missing"
    with RichProgress() if ui.stderr.is_terminal else nullcontext() as progress:
        img = Image.from_oci(image, platform=platform, insecure=insecure, pull=policy, progress=progress)
    argv = img.argv(command or None)
    config = img.vm_config(
        VmConfig(
            memory_mib=memory_mib,
            vcpus=vcpus,
            kernel=kernel,
            env=env,
            workdir=workdir,
            user=user,
            network=network or "egress",
            volumes=named_volumes,
            mounts=folders,
        )
    )
    sys.exit(_run_streaming(config, argv, timeout, show_console, stdio=Stdio(interactive, tty)))


def _run_snapshot(
    where: str,
    command: tuple[str, ...],
    env: dict[str, str],
    workdir: str | None,
    user: str | None,
    timeout: float | None,
    show_console: bool,
    stdio: Stdio = PLAIN,
    network: Network | None = None,
    mounted: tuple[tuple[VolumeMount, ...], tuple[SharedFolder, ...]] = ((), ()),
) -> int:
    from supermachine.image import Image
    from supermachine.snapshots import store_dir
    from supermachine.vm import VmConfig

    directory = Path(where)
    if "/" not in where and not directory.exists():
        directory = store_dir() / where
    img = Image.from_snapshot(directory)
    argv = img.argv(command or None)
    config = img.vm_config(
        VmConfig(
            env=env,
            workdir=workdir,
            user=user,
            network=network or "egress",
            volumes=mounted[0],
            mounts=mounted[1],
        )
    )
    return _run_streaming(config, argv, timeout, show_console, snapshot=directory, stdio=stdio)


@click.command()
@vm_options
@stdio_options
@volume_option
@click.option("--rootfs", type=click.Path(path_type=Path), help="Root filesystem image (squashfs).")
@click.argument("command", nargs=-1, required=True)
def boot(
    rootfs: Path | None,
    command: tuple[str, ...],
    memory_mib: int,
    vcpus: int,
    env_pairs: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    timeout: float | None,
    kernel: Path | None,
    show_console: bool,
    network_mode: str,
    allow: tuple[str, ...],
    deny: tuple[str, ...],
    published: tuple[str, ...],
    add_hosts: tuple[str, ...],
    dns_server: str | None,
    interactive: bool,
    tty: bool,
    volume_specs: tuple[str, ...],
) -> None:
    """Boot a microVM on a root filesystem image and run COMMAND in it; exit with its status.

    A development entry point; `supermachine run IMAGE` does the same for OCI images.
    """
    from supermachine.vm import VmConfig

    if rootfs is not None and not rootfs.is_file():
        raise InputError(f"root filesystem image {rootfs} does not exist")
    named_volumes, folders = _mounts(volume_specs)
    config = VmConfig(
        rootfs=rootfs,
        memory_mib=memory_mib,
        vcpus=vcpus,
        kernel=kernel,
        env=parse_env(env_pairs),
        workdir=workdir,
        user=user,
        network=network_from_options(network_mode, allow, deny, published, add_hosts, dns_server) or "egress",
        volumes=named_volumes,
        mounts=folders,
    )
    sys.exit(_run_streaming(config, list(command), timeout, show_console, stdio=Stdio(interactive, tty)))
