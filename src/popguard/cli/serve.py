"""`popguard serve SERVICE --server NAME`: run one service in the foreground.

Each command imports only its own service: an organization starts a dozen services
and their worker processes, and every one of them paying for all the others' imports
(aiohttp, aiosmtpd, httpx, the replication service) made `popguard up` CPU-bound.
"""

from __future__ import annotations

import click

from popguard.cli.context import AppContext, pass_app
from popguard.services import lmtp_limits


@click.group("serve")
def serve() -> None:
    """Run one popguard service in the foreground (SIGTERM stops it)."""


@serve.command("pop3be")
@click.option("--server", required=True, help="The mailbox server to serve as.")
@pass_app
def serve_pop3be(app: AppContext, server: str) -> None:
    """The POP3 back end of a mailbox server."""
    from popguard.services import backend

    backend.serve(app.data, server)


@serve.command("pop3")
@click.option("--server", required=True, help="The front-end server to serve as.")
@pass_app
def serve_pop3(app: AppContext, server: str) -> None:
    """The POP3 front end (proxy) of a client access server."""
    from popguard.services import frontend

    frontend.serve(app.data, server)


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    # click's FloatRange lets NaN through: no comparison with a bound is true for it.
    if value != value:
        raise click.BadParameter(f"{value} is not a number of seconds", ctx, param)
    return value


_SECONDS = click.FloatRange(lmtp_limits.MIN_TIMEOUT, lmtp_limits.MAX_TIMEOUT)


@serve.command("delivery")
@click.option("--server", required=True, help="The mailbox server to deliver on.")
@click.option(
    "--max-message-size",
    type=click.IntRange(1024),
    default=lmtp_limits.DEFAULT_MAX_MESSAGE_SIZE,
    show_default=True,
    help="Largest message accepted, in octets.",
)
@click.option(
    "--max-line-length",
    type=click.IntRange(lmtp_limits.MIN_LINE_LENGTH, lmtp_limits.MAX_LINE_LENGTH),
    default=lmtp_limits.DEFAULT_MAX_LINE_LENGTH,
    show_default=True,
    help="Longest message line accepted, in octets (RFC 5321 asks for 1000).",
)
@click.option(
    "--idle-timeout",
    type=_SECONDS,
    callback=_finite,
    default=lmtp_limits.DEFAULT_IDLE_TIMEOUT,
    show_default=True,
    help="Seconds a connection may wait between commands before it is closed.",
)
@click.option(
    "--command-timeout",
    type=_SECONDS,
    callback=_finite,
    default=lmtp_limits.DEFAULT_COMMAND_TIMEOUT,
    show_default=True,
    help="Seconds from a command line's first octet to its end; DATA may take this "
    "plus the size limit at 64 KiB/s.",
)
@pass_app
def serve_delivery(
    app: AppContext,
    server: str,
    max_message_size: int,
    max_line_length: int,
    idle_timeout: float,
    command_timeout: float,
) -> None:
    """LMTP delivery on a mailbox server, for a mailbox of any database.

    Mail for a database active here is written here; mail for one active on another
    mailbox server is handed to that server (LMTP over TLS, its lmtp-peer port), and
    each recipient gets that server's reply."""
    from popguard.services import delivery

    limits = lmtp_limits.LmtpLimits(
        max_message_size=max_message_size,
        max_line_length=max_line_length,
        idle_timeout=idle_timeout,
        command_timeout=command_timeout,
    )
    delivery.serve(app.data, server, limits)


@serve.command("replication")
@click.option("--server", required=True, help="The mailbox server to replicate for.")
@pass_app
def serve_replication(app: AppContext, server: str) -> None:
    """Ship this server's active copies' logs; keep its passive copies in step."""
    from popguard.replication import service as replication_service

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


@serve.command("web")
@click.option("--server", required=True, help="The front end whose web page to serve.")
@click.option("--listen", help="The address to listen on [default: the server's own if it is "
              "loopback, else 127.0.0.1]; HTTPS anywhere but loopback.")  # fmt: skip
@pass_app
def serve_web(app: AppContext, server: str, listen: str | None) -> None:
    """The operator's web page: the organization at a glance, live, with the runbook's
    actions for operators."""
    from popguard.web import service

    service.serve(app.data, server, listen)


COMMANDS = [serve]
