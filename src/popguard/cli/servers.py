"""Servers and mailbox databases: new-server, get-server, new-mailboxdatabase,
get-mailboxdatabase, set-mailboxdatabase."""

from __future__ import annotations

from typing import Any

import click

from popguard.cli.context import AppContext, pass_app
from popguard.cli.render import format_option, render
from popguard.directory.directory import ROLES, DatabaseCopy, Directory, Server
from popguard.directory.exchange_values import (
    format_byte_quantified_size,
    parse_byte_quantified_size,
)
from popguard.errors import UserError

QUOTA_OPTION = "--prohibit-send-receive-quota"
QUOTA_HELP = (
    "Default ProhibitSendReceiveQuota of its mailboxes: a size (50MB, 2GB, octets) or "
    "Unlimited. Mail that would put a mailbox over it is refused (552 5.2.2)."
)


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


def database_rows(directory: Directory, copies: list[DatabaseCopy]) -> list[dict[str, Any]]:
    """Each copy with its database's quota and the copy's last measured sizes."""
    reports = directory.copy_status_reports()
    rows = []
    for copy in copies:
        report = reports.get((copy.database, copy.server))
        rows.append(
            copy_row(copy)
            | {
                "ProhibitSendReceiveQuota": format_byte_quantified_size(
                    directory.database_quota(copy.database)
                ),
                "DatabaseSize": report.database_size if report else None,
                "MessageBytes": report.message_bytes if report else None,
                "LogBytes": report.log_bytes if report else None,
            }
        )
    return rows


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
@click.option(QUOTA_OPTION, "quota", metavar="SIZE", help=QUOTA_HELP + " Default: Unlimited.")
@format_option
@pass_app
def new_mailboxdatabase(
    app: AppContext, name: str, server: str, quota: str | None, output_format: str
) -> None:
    """Create a mailbox database with its first copy, active on SERVER."""
    octets = None if quota is None else parse_byte_quantified_size(quota, QUOTA_OPTION)
    with app.directory() as directory:
        copy = directory.new_database(name, server)
        if octets is not None:
            directory.set_database_quota(copy.database, octets)
        rows = database_rows(directory, [copy])
    render(rows, output_format)


@click.command("set-mailboxdatabase")
@click.argument("name")
@click.option(QUOTA_OPTION, "quota", metavar="SIZE", required=True, help=QUOTA_HELP)
@format_option
@pass_app
def set_mailboxdatabase(app: AppContext, name: str, quota: str, output_format: str) -> None:
    """Set-MailboxDatabase: the default quota of the database's mailboxes."""
    octets = parse_byte_quantified_size(quota, QUOTA_OPTION)
    with app.directory() as directory:
        directory.set_database_quota(name, octets)
        rows = database_rows(directory, directory.database_copies(name))
    render(rows, output_format)


@click.command("get-mailboxdatabase")
@click.argument("name", required=False)
@format_option
@pass_app
def get_mailboxdatabase(app: AppContext, name: str | None, output_format: str) -> None:
    """Show mailbox databases and where their copies are."""
    with app.directory() as directory:
        rows = database_rows(directory, directory.database_copies(name))
    render(rows, output_format)


COMMANDS = [new_server, get_server, new_mailboxdatabase, get_mailboxdatabase, set_mailboxdatabase]
