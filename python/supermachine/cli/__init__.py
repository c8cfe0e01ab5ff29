"""The ``supermachine`` command line. Each user task registers its commands from its own module."""

from __future__ import annotations

import sys

import click

from supermachine import __version__
from supermachine.errors import SupermachineError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="supermachine")
def cli() -> None:
    """Run OCI images as KVM microVMs, and measure what makes them fast and dense."""


def _register() -> None:
    from supermachine.cli import build, commit, doctor, images, probe, snapshots, vm

    probe.register(cli)
    images.register(cli)
    vm.register(cli)
    snapshots.register(cli)
    commit.register(cli)
    build.register(cli)
    doctor.register(cli)


def main() -> None:
    """Console entry point: one-line errors and a non-zero exit for every expected failure."""
    _register()
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
