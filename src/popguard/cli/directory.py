"""port-directory: move a one-machine organization's directory into PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import click

from popguard.cli.context import AppContext, pass_app
from popguard.errors import UserError


@click.command("port-directory")
@click.option("--to", "url", required=True, metavar="URL", help="postgresql://USER@HOST:PORT/DB")
@click.option(
    "--password-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A file (mode 0600) holding the PostgreSQL password; else libpq's PGPASSFILE.",
)
@pass_app
def port_directory_command(app: AppContext, url: str, password_file: Path | None) -> None:
    """Copy this data folder's SQLite directory into PostgreSQL.

    Safe to run again: it goes on where a cut-short run stopped and brings what
    changed since. Stop the services first (popguard down) so that nothing changes
    while it copies; then point popguard.toml at PostgreSQL as it prints."""
    from pydantic import ValidationError

    from popguard.directory.directory import Directory
    from popguard.directory.location import (
        DirectorySection,
        PostgresLocation,
        SqliteLocation,
        directory_location,
    )
    from popguard.directory.port import port_directory

    source_location = directory_location(app.data)
    if not isinstance(source_location, SqliteLocation):
        raise UserError(f"{app.data}/popguard.toml already names a PostgreSQL directory")
    if not source_location.path.exists():
        raise UserError(f"no SQLite directory to copy: {source_location.path} does not exist")
    try:
        DirectorySection(url=url)
    except ValidationError as exc:
        message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise UserError(f"--to: {message}") from None
    password = password_file.resolve() if password_file else None
    with (
        Directory(app.data, source_location) as source,
        Directory(app.data, PostgresLocation(url, password)) as target,
    ):
        copied = port_directory(source, target)
    for table in copied:
        click.echo(f"{table.table:<22} {table.new:>7} new  {table.refreshed:>7} already there")
    click.echo(f"copied {sum(t.new for t in copied)} rows into {url}.")
    click.echo("To use it, add to popguard.toml on every host and restart the services:")
    click.echo(f'  [directory]\n  url = "{url}"')
    if password:
        click.echo(f'  password_file = "{password}"')


COMMANDS = [port_directory_command]
