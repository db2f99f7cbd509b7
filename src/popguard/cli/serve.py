"""`popguard serve SERVICE --server NAME`: run one service in the foreground."""

from __future__ import annotations

import click

from popguard.cli.context import AppContext, pass_app
from popguard.replication import service as replication_service
from popguard.services import backend, delivery, frontend


@click.group("serve")
def serve() -> None:
    """Run one popguard service in the foreground (SIGTERM stops it)."""


@serve.command("pop3be")
@click.option("--server", required=True, help="The mailbox server to serve as.")
@pass_app
def serve_pop3be(app: AppContext, server: str) -> None:
    """The POP3 back end of a mailbox server."""
    backend.serve(app.data, server)


@serve.command("pop3")
@click.option("--server", required=True, help="The front-end server to serve as.")
@pass_app
def serve_pop3(app: AppContext, server: str) -> None:
    """The POP3 front end (proxy) of a client access server."""
    frontend.serve(app.data, server)


@serve.command("delivery")
@click.option("--server", required=True, help="The mailbox server to deliver on.")
@click.option(
    "--max-message-size",
    type=click.IntRange(1024),
    default=delivery.DEFAULT_MAX_MESSAGE_SIZE,
    show_default=True,
    help="Largest message accepted, in octets.",
)
@pass_app
def serve_delivery(app: AppContext, server: str, max_message_size: int) -> None:
    """LMTP delivery into the mailbox databases active on a mailbox server."""
    delivery.serve(app.data, server, max_message_size)


@serve.command("replication")
@click.option("--server", required=True, help="The mailbox server to replicate for.")
@pass_app
def serve_replication(app: AppContext, server: str) -> None:
    """Ship this server's active copies' logs; keep its passive copies in step."""
    replication_service.serve(app.data, server)


@serve.command("health")
@click.option("--server", required=True, help="The server whose health to watch.")
@click.option(
    "--profile",
    type=click.Choice(["default", "exchange2013"]),
    default="default",
    show_default=True,
    help="exchange2013: Exchange 2013's probe intervals, timeouts and thresholds.",
)
@pass_app
def serve_health(app: AppContext, server: str, profile: str) -> None:
    """Run this server's probes and monitors, and the health API.

    Health sets of your own (DATA/health/sets/*.toml) run beside popguard's."""
    from popguard.health import service

    service.serve(app.data, server, profile)


COMMANDS = [serve]
