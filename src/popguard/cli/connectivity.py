"""`popguard test-popconnectivity`, as Exchange's Test-PopConnectivity."""

from __future__ import annotations

import asyncio
import sys

import click

from popguard.cli.context import AppContext, pass_app
from popguard.cli.mailboxes import read_password_from_stdin
from popguard.cli.render import format_option, render
from popguard.errors import UserError
from popguard.health.connectivity import CONNECTION_TYPES, ConnectivityTest, run_test
from popguard.health.health_mailboxes import read_credentials
from popguard.health.probes import Credential


@click.command("test-popconnectivity")
@click.option("--client-access-server", "server", required=True, help="The front end to test.")
@click.option(
    "--mailbox-credential",
    "address",
    help="The mailbox to log in to; its password on standard input. "
    "Default: the health mailbox of the first database.",
)
@click.option(
    "--connection-type",
    type=click.Choice(sorted(CONNECTION_TYPES), case_sensitive=False),
    default="tls",
    show_default=True,
    help="plaintext; tls (STLS on the POP3 port); ssl (TLS from the start, POP3S port).",
)
@click.option("--port-client-access-server", "port", type=click.IntRange(1, 65535))
@click.option("--trust-any-ssl-certificate", is_flag=True, help="Do not verify its certificate.")
@click.option("--light-mode", is_flag=True, help="Connect, TLS and login only.")
@click.option(
    "--per-connection-timeout", type=click.FloatRange(1, 600), default=30, show_default=True
)
@format_option
@pass_app
def test_popconnectivity(
    app: AppContext,
    server: str,
    address: str | None,
    connection_type: str,
    port: int | None,
    trust_any_ssl_certificate: bool,
    light_mode: bool,
    per_connection_timeout: float,
    output_format: str,
) -> None:
    """Connect to a front end as a client would and time each step."""
    if address is None:
        credentials = read_credentials(app.data)
        if not credentials:
            raise UserError(
                "no health mailbox yet (a health service makes them); "
                "give --mailbox-credential ADDRESS with its password on standard input"
            )
        credential = credentials[sorted(credentials)[0]]
    else:
        if sys.stdin.isatty():
            click.echo(f"password for {address}: ", nl=False, err=True)
        credential = Credential(address, read_password_from_stdin())
    test = ConnectivityTest(
        data=app.data, server=server, credential=credential,
        connection_type=connection_type.lower(), port=port,
        trust_any_certificate=trust_any_ssl_certificate, light_mode=light_mode,
        per_connection_timeout=per_connection_timeout,
    )  # fmt: skip
    results = asyncio.run(run_test(test))
    render([r.row() for r in results], output_format)
    failed = next((r for r in results if r.result == "Failure"), None)
    if failed is not None:
        click.echo(f"popguard: {failed.scenario} failed: {failed.error}", err=True)
        sys.exit(1)


COMMANDS = [test_popconnectivity]
