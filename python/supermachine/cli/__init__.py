"""The ``supermachine`` command line. Each user task keeps its commands in a module of its own.

The top-level group imports a command's module only when that command is run (or shows its own
help), so ``supermachine --help`` and the start of every command pay for click alone, not for
what the other commands import (registry clients, rich, the VMM, the probes' numerics).
"""

from __future__ import annotations

import importlib
import sys
from gettext import gettext as _
from typing import NamedTuple

import click

from supermachine import __version__
from supermachine.errors import SupermachineError


class LazyCommand(NamedTuple):
    """Where a top-level command is defined, and what the listing says about it."""

    module: str
    """Its module, under ``supermachine.cli``."""
    attribute: str
    """The click command's name in that module."""
    summary: str
    """The first sentence of its help; click shortens it for the listing as it would the help."""


COMMANDS: dict[str, LazyCommand] = {
    "boot": LazyCommand(
        "vm", "boot", "Boot a microVM on a root filesystem image and run COMMAND in it; exit with its status."
    ),
    "build": LazyCommand(
        "build",
        "build_cmd",
        "Build the image described by a Dockerfile in CONTEXT, like docker build: every RUN runs in a"
        " microVM, every step is cached, and the result is stored (`supermachine run NAME`).",
    ),
    "commit": LazyCommand(
        "commit",
        "commit_cmd",
        "Boot IMAGE, run COMMAND in it (it must succeed), and store what it changed as the new image"
        " TAG: IMAGE's layers plus one layer of the changes (docker run, then docker commit).",
    ),
    "dedup": LazyCommand(
        "snapshots", "dedup_cmd", "Share the RAM pages of snapshots in STORE with their golden snapshot."
    ),
    "diff": LazyCommand(
        "commit",
        "diff_cmd",
        "Boot IMAGE, run COMMAND in it (it must succeed), and list the paths it added (A), changed (C)"
        " and deleted (D) in the root file system, like docker diff.",
    ),
    "doctor": LazyCommand(
        "doctor",
        "doctor",
        "Which protections VM workers get on this host, and why the others are not available.",
    ),
    "images": LazyCommand("images", "images_command", "List the images in the local cache."),
    "probe": LazyCommand(
        "probe",
        "probe",
        "Measure what makes VMs dense: sub-layer redundancy of images, page overlap of RAM images, RAM"
        " shared between snapshots, host memory per restored or booted VM.",
    ),
    "prune": LazyCommand(
        "images",
        "prune_command",
        "Delete cached blobs and root filesystems that no image uses, and what interrupted pulls and"
        " builds left behind (partial downloads, temporary files and build trees).",
    ),
    "pull": LazyCommand("images", "pull_command", "Download REF into the local cache."),
    "push": LazyCommand(
        "images",
        "push_command",
        "Upload a stored IMAGE to a registry, as DESTINATION (a registry reference; default: IMAGE's"
        " own name).",
    ),
    "rmi": LazyCommand(
        "images", "rmi_command", "Remove images (by ref or image id) and the cached data only they used."
    ),
    "run": LazyCommand(
        "vm",
        "run",
        "Run IMAGE in a microVM, like docker run: its Entrypoint with COMMAND (or its Cmd), its Env,"
        " WorkingDir and User; output is streamed and the exit status passed on.",
    ),
    "snapshot": LazyCommand(
        "snapshots",
        "snapshot_cmd",
        "Boot IMAGE, run the WARM command in it (if given; it must succeed), and snapshot the VM.",
    ),
    "snapshots": LazyCommand(
        "snapshots",
        "snapshots_cmd",
        "List the snapshots in STORE (default: supermachine's snapshot store), oldest first.",
    ),
    "volume": LazyCommand(
        "volumes", "volume", "Named volumes: ext4 disks that keep data across VMs (`run -v NAME:/DIR`)."
    ),
}
"""Every top-level command by name. The summaries live here so that the listing imports nothing;
``tests/cli/test_lazy_cli.py`` keeps them equal to the commands' own help."""


class LazyGroup(click.Group):
    """A group whose commands are those of :data:`COMMANDS`, each imported on first use, plus
    any added directly."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if cmd_name not in self.commands and entry is not None:
            module = importlib.import_module(f"supermachine.cli.{entry.module}")
            command = getattr(module, entry.attribute)
            assert isinstance(command, click.Command)
            self.add_command(command, cmd_name)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click's own listing calls get_command for every name, importing every module; a
        # stand-in with the same first sentence gets the same shortened text.
        listed = [(name, self.commands.get(name) or _stand_in(name)) for name in self.list_commands(ctx)]
        rows = [(name, command) for name, command in listed if not command.hidden]
        limit = formatter.width - 6 - max(len(name) for name, _ in rows)
        with formatter.section(_("Commands")):
            formatter.write_dl([(name, command.get_short_help_str(limit)) for name, command in rows])


def _stand_in(name: str) -> click.Command:
    return click.Command(name, help=COMMANDS[name].summary)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="supermachine")
def cli() -> None:
    """Run OCI images as KVM microVMs, and measure what makes them fast and dense."""


def main() -> None:
    """Console entry point: one-line errors and a non-zero exit for every expected failure."""
    try:
        status = cli.main(standalone_mode=False)
        if isinstance(status, int) and status:
            sys.exit(status)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SupermachineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
