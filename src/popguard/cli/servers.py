"""Servers and mailbox databases: new-server, get-server, new-mailboxdatabase, ..."""

from __future__ import annotations

from typing import Any

import click

from popguard.cli.context import AppContext, pass_app
from popguard.cli.render import format_option, render
from popguard.directory.directory import ROLES, DatabaseCopy, Server
from popguard.errors import UserError


def server_row(server: Server) -> dict[str, Any]:
    return {
        "Name": server.name,
        "Roles": list(server.roles),
        "Address": server.address,
        "Ports": server.ports,
    }


def copy_row(copy: DatabaseCopy) -> dict[str, Any]:
    return {
        "Name": f"{copy.database}\\{copy.server}",
        "DatabaseName": copy.database,
        "MailboxServer": copy.server,
        "ActivationPreference": copy.activation_preference,
        "IsActive": copy.is_active,
    }


def _parse_ports(values: tuple[str, ...]) -> dict[str, int]:
    ports = {}
    for value in values:
        endpoint, sep, number = value.partition("=")
        if not sep or not (number.isascii() and number.isdigit()):
            raise UserError(f"--port wants ENDPOINT=NUMBER, got {value!r}")
        ports[endpoint] = int(number)
    return ports


@click.command("new-server")
@click.argument("name")
@click.option("--role", "roles", multiple=True, required=True, type=click.Choice(ROLES))
@click.option("--address", required=True, help="The server's IP address (loopback here).")
@click.option("--port", "ports", multiple=True, help="ENDPOINT=PORT, e.g. pop3be=1110.")
@format_option
@pass_app
def new_server(
    app: AppContext,
    name: str,
    roles: tuple[str, ...],
    address: str,
    ports: tuple[str, ...],
    output_format: str,
) -> None:
    """Add a server to the directory."""
    with app.directory() as directory:
        server = directory.new_server(name, list(roles), address, _parse_ports(ports))
    render([server_row(server)], output_format)


@click.command("get-server")
@click.argument("name", required=False)
@format_option
@pass_app
def get_server(app: AppContext, name: str | None, output_format: str) -> None:
    """Show servers: roles, address and ports."""
    with app.directory() as directory:
        servers = [directory.get_server(name)] if name else directory.list_servers()
    render([server_row(s) for s in servers], output_format)


@click.command("new-mailboxdatabase")
@click.argument("name")
@click.option("--server", required=True, help="The mailbox server of its first, active copy.")
@format_option
@pass_app
def new_mailboxdatabase(app: AppContext, name: str, server: str, output_format: str) -> None:
    """Create a mailbox database with its first copy, active on SERVER."""
    with app.directory() as directory:
        copy = directory.new_database(name, server)
    render([copy_row(copy)], output_format)


@click.command("get-mailboxdatabase")
@click.argument("name", required=False)
@format_option
@pass_app
def get_mailboxdatabase(app: AppContext, name: str | None, output_format: str) -> None:
    """Show mailbox databases and where their copies are."""
    with app.directory() as directory:
        copies = directory.database_copies(name)
    render([copy_row(c) for c in copies], output_format)


COMMANDS = [new_server, get_server, new_mailboxdatabase, get_mailboxdatabase]
