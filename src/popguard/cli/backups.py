"""Backups: backup-mailboxdatabase, restore-mailboxdatabase (into a recovery database),
restore-mailbox (one mailbox from a recovery database back into service)."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

import click

from popguard.cli.context import AppContext, pass_app
from popguard.cli.render import format_option, render
from popguard.directory.exchange_values import format_byte_quantified_size
from popguard.errors import UserError
from popguard.net.tls import TlsMaterial
from popguard.replication.backup import (
    open_recovery_database,
    restore_database,
    restore_mailbox,
    restored_entries,
    take_backup,
)
from popguard.store.mailbox_database import QuotaExceededError


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


@click.command("backup-mailboxdatabase")
@click.argument("database")
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="The backup file to write (owner-only; it holds every mailbox's mail).",
)
@click.option(
    "--server",
    help="Back up this server's copy (default: a healthy passive copy, else the active one).",
)
@format_option
@pass_app
def backup_database(
    app: AppContext, database: str, out: Path, server: str | None, output_format: str
) -> None:
    """A consistent, checksummed snapshot of DATABASE, taken while it serves."""
    if out.exists():
        raise UserError(f"{out} exists already: give a new file")
    with app.directory() as directory:
        header = asyncio.run(
            take_backup(directory, TlsMaterial.of(app.data), database, out, server)
        )
    render(
        [
            {
                "Database": header.database,
                "Server": header.server,
                "LogSequenceNumber": header.lsn,
                "Size": format_byte_quantified_size(header.octets),
                "Sha256": header.sha256,
                "File": str(out),
                "WhenTaken": _when(header.taken),
            }
        ],
        output_format,
    )


@click.command("restore-mailboxdatabase")
@click.argument("backup", type=click.Path(path_type=Path))
@click.option(
    "--recovery-database",
    "recovery",
    type=click.Path(path_type=Path),
    required=True,
    help="The recovery database file to make (must not exist).",
)
@format_option
@pass_app
def restore_database_command(
    app: AppContext, backup: Path, recovery: Path, output_format: str
) -> None:
    """Check BACKUP whole and make it a recovery database, which no service mounts;
    restore-mailbox brings mailboxes back from it."""
    header, store = restore_database(backup, recovery)
    try:
        usage = store.all_usage()
    finally:
        store.close()
    render(
        [
            {
                "Name": str(recovery),
                "Database": header.database,
                "BackedUpFrom": header.server,
                "LogSequenceNumber": header.lsn,
                "WhenTaken": _when(header.taken),
                "Mailboxes": len(usage),
                "ItemCount": sum(u.items for u in usage.values()),
                "Checks": "passed",
            }
        ],
        output_format,
    )


@click.command("restore-mailbox")
@click.argument("address")
@click.option(
    "--from",
    "recovery",
    type=click.Path(path_type=Path),
    required=True,
    help="The recovery database (restore-mailboxdatabase).",
)
@click.option("--source-address", help="The mailbox in the recovery database (default: ADDRESS).")
@click.option(
    "--ignore-quota",
    is_flag=True,
    help="Restore even if ADDRESS goes over its ProhibitSendReceiveQuota.",
)
@format_option
@pass_app
def restore_mailbox_command(
    app: AppContext,
    address: str,
    recovery: Path,
    source_address: str | None,
    ignore_quota: bool,
    output_format: str,
) -> None:
    """Give ADDRESS back the messages its mailbox (or --source-address's) held in a
    recovery database, skipping those it still holds (the same octets), all in one
    transaction: restoring twice stores each message once. A restore that would take
    ADDRESS over its ProhibitSendReceiveQuota is refused whole, unless --ignore-quota."""
    store = open_recovery_database(recovery)
    with app.directory() as directory:
        try:
            target = directory.get_mailbox(address)
            source = (source_address or target.address).strip().lower()
            entries = restored_entries(store, source, target.address)
        finally:
            store.close()
        if not entries:
            raise UserError(f"{recovery} holds no message of {source}")
        quota = None if ignore_quota else directory.mailbox_quota(target)
        try:
            restored = asyncio.run(
                restore_mailbox(
                    directory, TlsMaterial.of(app.data), entries, target.database, quota
                )
            )
        except QuotaExceededError as exc:
            raise UserError(
                f"restoring to {target.address} would take it over its "
                f"ProhibitSendReceiveQuota of {format_byte_quantified_size(exc.quota)}: the "
                f"messages it lacks need {format_byte_quantified_size(exc.size)} and it holds "
                f"{format_byte_quantified_size(exc.used)}; nothing restored (raise the quota, "
                "or pass --ignore-quota)"
            ) from None
    render(
        [
            {
                "TargetMailbox": target.address,
                "SourceMailbox": source,
                "ItemCount": len(entries),
                "Restored": restored.restored,
                "AlreadyThere": restored.already_there,
                "RestoredSize": format_byte_quantified_size(restored.octets),
            }
        ],
        output_format,
    )


COMMANDS = [backup_database, restore_database_command, restore_mailbox_command]
