"""The `popguard` command: the root group, the data folder, and one-line errors."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import click

from popguard import __version__
from popguard.cli import (
    components,
    connectivity,
    copies,
    faults,
    health,
    mailboxes,
    messages,
    overrides,
    popsettings,
    serve,
    servers,
    services,
    up,
)
from popguard.cli.context import AppContext
from popguard.control import permissions
from popguard.errors import UserError
from popguard.paths import DATA_ENV, DEFAULT_DATA


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    envvar=DATA_ENV,
    default=DEFAULT_DATA,
    show_default=True,
    help=f"The data folder (also ${DATA_ENV}).",
)
@click.version_option(__version__, prog_name="popguard")
@click.pass_context
def cli(ctx: click.Context, data: Path) -> None:
    """popguard: a POP3 mail service with managed availability built in."""
    ctx.obj = AppContext(data=data)


for module in (
    servers,
    faults,
    connectivity,
    copies,
    health,
    overrides,
    services,
    mailboxes,
    popsettings,
    components,
    messages,
    serve,
    up,
):
    for command in module.COMMANDS:
        cli.add_command(command)


def main() -> None:
    """Run the CLI; a user's mistake is one line on stderr and exit status 1."""
    permissions.restrict_umask()
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("popguard: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        click.echo(f"popguard: {exc.format_message()}", err=True)
        sys.exit(1 if exc.exit_code != 0 else 0)
    except UserError as exc:
        click.echo(f"popguard: {exc}", err=True)
        sys.exit(1)
    except sqlite3.Error as exc:
        click.echo(f"popguard: directory error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
