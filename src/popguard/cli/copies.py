"""Database copies: add-/remove-mailboxdatabasecopy, get-mailboxdatabasecopystatus,
move-activemailboxdatabase, set-/get-mailboxserver."""

from __future__ import annotations

import asyncio
import datetime
from collections import Counter
from typing import Any

import click

from popguard.cli.context import AppContext, pass_app
from popguard.cli.render import format_option, render
from popguard.directory.directory import ACTIVATION_POLICIES, Directory, Server
from popguard.directory.exchange_values import parse_boolean
from popguard.errors import UserError
from popguard.net.tls import TlsMaterial
from popguard.replication.switchover import Mover, MoveResult, copy_status


def _identity(value: str) -> tuple[str, str]:
    database, sep, server = value.partition("\\")
    if not sep or not database or not server:
        raise UserError(f"a copy is named DATABASE\\SERVER, got '{value}'")
    return database, server


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


def status_rows(
    directory: Directory, server: str | None, identity: str | None
) -> list[dict[str, Any]]:
    if server is not None:
        server = directory.get_server(server).name
    wanted = _identity(identity) if identity else None
    copies = directory.database_copies(wanted[0] if wanted else None)
    reports = directory.copy_status_reports()
    now = datetime.datetime.now(datetime.UTC).timestamp()
    rows = []
    for copy in copies:
        if server is not None and copy.server.lower() != server.lower():
            continue
        if wanted is not None and copy.server.lower() != wanted[1].lower():
            continue
        report = reports.get((copy.database, copy.server))
        status = copy_status(copy, reports, now)
        fresh = status != "ServiceDown"
        active = next(c.server for c in copies if c.database == copy.database and c.is_active)
        rows.append(
            {
                "Name": f"{copy.database}\\{copy.server}",
                "Status": status,
                "CopyQueueLength": report.copy_queue_length if report and fresh else None,
                "ReplayQueueLength": report.replay_queue_length if report and fresh else None,
                "LastInspectedLogTime": _when(report.last_inspected_log_time if report else None),
                "ActivationPreference": copy.activation_preference,
                "ActiveDatabaseCopy": active,
                "LogSequenceNumber": report.applied_lsn if report else None,
                # Octets, as last measured by the copy's replication service.
                "DatabaseSize": report.database_size if report else None,
                "MessageBytes": report.message_bytes if report else None,
                "LogBytes": report.log_bytes if report else None,
                # Acknowledgements wait for this copy; Active Manager may activate it.
                "Synchronous": copy.synchronous,
                "ErrorMessage": (report.error or "")
                if report and fresh
                else (
                    f"no report from the replication service of {copy.server} "
                    f"for {int(now - report.reported)}s"
                    if report
                    else f"no report yet from the replication service of {copy.server}"
                ),
            }
        )
    if wanted is not None and not rows:
        raise UserError(f"no copy {identity}")
    return rows


@click.command("get-mailboxdatabasecopystatus")
@click.option("--server", help="Only the copies on this server.")
@click.option("--identity", help="Only this copy (DATABASE\\SERVER).")
@click.option(
    "--group-by",
    type=click.Choice(["status"], case_sensitive=False),
    help="Count copies per status (as `| group status`).",
)
@format_option
@pass_app
def get_copy_status(
    app: AppContext,
    server: str | None,
    identity: str | None,
    group_by: str | None,
    output_format: str,
) -> None:
    """Each database copy's health and how far behind its active copy it is."""
    with app.directory() as directory:
        rows = status_rows(directory, server, identity)
    if group_by:
        counts = Counter(row["Status"] for row in rows)
        rows = [
            {
                "Count": count,
                "Name": status,
                "Group": [row["Name"] for row in rows if row["Status"] == status],
            }
            for status, count in counts.most_common()
        ]
    render(rows, output_format)


@click.command("add-mailboxdatabasecopy")
@click.argument("database")
@click.option("--server", "server_name", required=True, help="The mailbox server of the new copy.")
@click.option(
    "--activation-preference",
    type=click.IntRange(1),
    default=None,
    help="1 is the most preferred; default: after the existing copies.",
)
@format_option
@pass_app
def add_copy(
    app: AppContext,
    database: str,
    server_name: str,
    activation_preference: int | None,
    output_format: str,
) -> None:
    """Add a passive copy; the replication service on SERVER seeds it from the active one."""
    with app.directory() as directory:
        copies = directory.database_copies(database)
        if activation_preference is None:
            activation_preference = max(c.activation_preference for c in copies) + 1
        directory.add_database_copy(database, server_name, activation_preference)
        rows = status_rows(
            directory, None, f"{copies[0].database}\\{directory.get_server(server_name).name}"
        )
    render(rows, output_format)


@click.command("remove-mailboxdatabasecopy")
@click.argument("identity")
@pass_app
def remove_copy(app: AppContext, identity: str) -> None:
    """Remove a passive copy (DATABASE\\SERVER). Its file stays on the server."""
    database, server = _identity(identity)
    with app.directory() as directory:
        directory.remove_database_copy(database, directory.get_server(server).name)
    click.echo(f"removed {identity}; its replication service stops following it within a second")


def _run_moves(app: AppContext, action: Any) -> list[MoveResult]:
    with app.directory() as directory:
        mover = Mover(TlsMaterial.of(app.data), directory)
        return asyncio.run(action(mover))


@click.command("move-activemailboxdatabase")
@click.argument("database")
@click.option("--activate-on-server", required=True, help="The server whose copy becomes active.")
@click.option(
    "--skip-lag-checks",
    is_flag=True,
    help="Activate even if the copy is behind or the active server is down "
    "(a failover: changes it never received are reported at risk).",
)
@format_option
@pass_app
def move_active(
    app: AppContext,
    database: str,
    activate_on_server: str,
    skip_lag_checks: bool,
    output_format: str,
) -> None:
    """Make the copy on another server the active one (switchover or failover)."""
    with app.directory() as directory:
        active = next(c for c in directory.database_copies(database) if c.is_active)
    if active.server.lower() == activate_on_server.lower():
        # Nothing to move: Succeeded would claim a switchover that never ran.
        already = MoveResult(active.database, active.server, active.server, "NotMoved", 0, 0.0,
                             f"already active on {active.server}")  # fmt: skip
        render([already.row()], output_format)
        return
    results = _run_moves(
        app, lambda mover: _single(mover.move(database, activate_on_server, skip_lag_checks))
    )
    render([r.row() for r in results], output_format)


async def _single(move: Any) -> list[MoveResult]:
    return [await move]


def mailbox_server_row(server: Server, lease: float | None) -> dict[str, Any]:
    return {
        "Name": server.name,
        "DatabaseCopyActivationDisabledAndMoveNow": server.activation_disabled,
        "DatabaseCopyAutoActivationPolicy": server.auto_activation_policy,
        # Seconds its lease has left by the directory's clock (negative: lapsed that
        # long ago); None: its replication service never held one.
        "LeaseSecondsLeft": None if lease is None else round(lease, 1),
    }


@click.command("get-mailboxserver")
@click.argument("name", required=False)
@format_option
@pass_app
def get_mailbox_server(app: AppContext, name: str | None, output_format: str) -> None:
    """Mailbox servers and whether their copies may be activated."""
    with app.directory() as directory:
        servers = [directory.get_server(name)] if name else directory.list_servers()
        leases = directory.leases()
    rows = [mailbox_server_row(s, leases.get(s.name)) for s in servers if "mailbox" in s.roles]
    render(rows, output_format)


@click.command("set-mailboxserver")
@click.argument("name")
@click.option(
    "--database-copy-activation-disabled-and-move-now",
    "move_now",
    metavar="true|false",
    help="true: move every active copy off this server and activate none here.",
)
@click.option(
    "--database-copy-auto-activation-policy",
    "policy",
    type=click.Choice(ACTIVATION_POLICIES, case_sensitive=False),
    help="Blocked: never pick this server's copies for an automatic activation.",
)
@click.option(
    "--move-back/--no-move-back",
    default=True,
    show_default=True,
    help="With ...-move-now false: move back the databases that prefer this server.",
)
@format_option
@pass_app
def set_mailbox_server(
    app: AppContext,
    name: str,
    move_now: str | None,
    policy: str | None,
    move_back: bool,
    output_format: str,
) -> None:
    """Set-MailboxServer: take a server's databases away (maintenance) or allow them back."""
    disabled = (
        None
        if move_now is None
        else parse_boolean(move_now, "--database-copy-activation-disabled-and-move-now")
    )
    if disabled is None and policy is None:
        raise UserError(
            "nothing to set: give --database-copy-activation-disabled-and-move-now "
            "or --database-copy-auto-activation-policy"
        )
    with app.directory() as directory:
        server = directory.set_mailbox_server(name, disabled, policy)
        lease = directory.leases().get(server.name)
    results: list[MoveResult] = []
    if disabled is True:
        results = _run_moves(app, lambda mover: mover.move_all_away(server.name))
    elif disabled is False and move_back:
        results = _run_moves(app, lambda mover: mover.move_preferred_back(server.name))
    if results:
        render([r.row() for r in results], output_format)
    else:
        render([mailbox_server_row(server, lease)], output_format)
    unmoved = [r for r in results if r.status != "Succeeded"]
    if unmoved:
        raise UserError("; ".join(f"{r.database} not moved: {r.error}" for r in unmoved))


COMMANDS = [
    add_copy,
    remove_copy,
    get_copy_status,
    move_active,
    get_mailbox_server,
    set_mailbox_server,
]
