"""Mailboxes: new-mailbox, get-mailbox, set-mailbox, remove-mailbox."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import click

from popguard import paths
from popguard.cli.context import AppContext, pass_app
from popguard.cli.render import format_option, render
from popguard.directory.directory import Directory, Mailbox
from popguard.directory.exchange_values import (
    format_byte_quantified_size,
    parse_boolean,
    parse_byte_quantified_size,
)
from popguard.directory.location import directory_elsewhere
from popguard.directory.passwords import generate_password, hash_password
from popguard.errors import UserError
from popguard.store.mailbox_database import MailboxDatabase, MailboxUsage

# Longer than any password a person types; bounds the KDF's input.
MAX_PASSWORD_LENGTH = 1024
# NIST SP 800-63B 5.1.1.2: a memorized secret chosen by its user is at least 8 characters.
MIN_PASSWORD_LENGTH = 8
# The status of an active copy that serves mail (copy_replicator reports it).
SERVING_ACTIVE_STATUS = "Mounted"


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


def mailbox_row(mailbox: Mailbox) -> dict[str, Any]:
    return {
        "PrimarySmtpAddress": mailbox.address,
        "Database": mailbox.database,
        "WhenCreated": _when(mailbox.created),
        "WhenPasswordChanged": _when(mailbox.password_changed),
    }


def quota_fields(
    directory: Directory, mailbox: Mailbox, usage: MailboxUsage | None
) -> dict[str, Any]:
    """Get-Mailbox's quota properties and Get-MailboxStatistics' size used (None where
    no copy of the mailbox's database is in this data folder)."""
    return {
        "UseDatabaseQuotaDefaults": mailbox.use_database_quota_defaults,
        "ProhibitSendReceiveQuota": format_byte_quantified_size(directory.mailbox_quota(mailbox)),
        "ItemCount": None if usage is None else usage.items,
        "TotalItemSize": None if usage is None else format_byte_quantified_size(usage.octets),
    }


def usage_here(app: AppContext, directory: Directory, database: str) -> dict[str, MailboxUsage]:
    """Every mailbox's usage in `database`, from its active copy if that copy's file is
    in this data folder, else from another copy here (as far as it has replayed);
    None when no copy is here (another host's: run get-mailbox there)."""
    copies = sorted(directory.database_copies(database), key=lambda c: not c.is_active)
    for copy in copies:
        if _active_copy_here(app, database, copy.server):
            with _store(app, database, copy.server) as store:
                return store.all_usage()
    raise LookupError(database)


def usage_of(
    app: AppContext, directory: Directory, database: str
) -> dict[str, MailboxUsage] | None:
    """Every mailbox's usage in `database`: from a copy here, else from the active
    copy's replication service (as the operator); None if neither can tell."""
    try:
        return usage_here(app, directory, database)
    except LookupError:
        pass
    from popguard.net.tls import TlsMaterial
    from popguard.replication.peer import (
        PeerProtocolError,
        PeerRefused,
        PeerUnavailable,
        ReplicationPeer,
    )

    async def ask() -> dict[str, tuple[int, int]]:
        material = TlsMaterial.of(app.data)
        context = material.mutual_client_context(material.admin_identity())
        server = directory.get_server(directory.active_server(database))
        async with ReplicationPeer(server, context) as peer:
            return await peer.usage(database)

    try:
        found = asyncio.run(ask())
    except (PeerUnavailable, PeerRefused, PeerProtocolError, UserError):
        return None
    return {address: MailboxUsage(items, octets) for address, (items, octets) in found.items()}


@contextlib.contextmanager
def _store(app: AppContext, database: str, server: str) -> Iterator[MailboxDatabase]:
    store = MailboxDatabase(
        paths.server_folder(app.data, server).database_copy_file(database), database
    )
    try:
        yield store
    finally:
        store.close()


def _active_copy_here(app: AppContext, database: str, server: str) -> bool:
    return paths.server_folder(app.data, server).database_copy_file(database).exists()


def _on_another_host(app: AppContext, server: str) -> bool:
    """`server` has no folder here, and this host is one of several: its directory is
    another host's, or its supervisord runs other servers but not this one."""
    if paths.server_folder(app.data, server).root.exists():
        return False
    if directory_elsewhere(app.data):
        return True
    from popguard.control.service_control import SupervisorControl

    control = SupervisorControl(app.data)
    return control.alive() and not control.runs(server)


def read_password_from_stdin() -> str:
    password = sys.stdin.read().rstrip("\r\n")
    if not password:
        raise UserError("no password on standard input")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UserError(f"password longer than {MAX_PASSWORD_LENGTH} characters")
    if "\0" in password or "\n" in password:
        raise UserError("password must be one line without NUL characters")
    return password


def chosen_password() -> str:
    """A password a person picked, read from standard input, long enough to keep."""
    password = read_password_from_stdin()
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(
            f"password of {len(password)} characters: at least {MIN_PASSWORD_LENGTH} please"
        )
    return password


def pick_database(directory: Directory) -> tuple[str, int]:
    """As Exchange does without -Database: of the databases whose active copy serves
    mail, the one with the fewest mailboxes (the first by name on a tie)."""
    from popguard.replication.switchover import copy_status

    reports = directory.copy_status_reports()
    now = time.time()
    serving = sorted(
        copy.database
        for copy in directory.database_copies()
        if copy.is_active and copy_status(copy, reports, now) == SERVING_ACTIVE_STATUS
    )
    if not serving:
        raise UserError(
            f"no database has an active copy that is {SERVING_ACTIVE_STATUS}: give --database"
        )
    counts = Counter(mailbox.database for mailbox in directory.list_mailboxes())
    best = min(serving, key=lambda database: (counts[database], database))
    return best, counts[best]


@click.command("new-mailbox")
@click.argument("address")
@click.option(
    "--database",
    help="The mailbox database to create it in (default: of the databases whose active "
    "copy is Mounted, the one with the fewest mailboxes).",
)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@format_option
@pass_app
def new_mailbox(
    app: AppContext, address: str, database: str | None, password_stdin: bool, output_format: str
) -> None:
    """Create a mailbox; without --password-stdin a password is generated and shown once."""
    password = chosen_password() if password_stdin else generate_password()
    with app.directory() as directory:
        if database is None:
            database, count = pick_database(directory)
            click.echo(
                f"new-mailbox: in {database}, which has the fewest mailboxes ({count}) of the "
                f"databases whose active copy is {SERVING_ACTIVE_STATUS}",
                err=True,
            )
        mailbox = directory.new_mailbox(address, database, hash_password(password))
        server = directory.active_server(mailbox.database)
    # A delivery that was in flight when an earlier mailbox of this address was
    # removed may have left messages behind: a new mailbox starts empty. Only where the
    # active copy's file is in this data folder: another host's is not opened (nor
    # made, empty, here).
    if _active_copy_here(app, mailbox.database, server):
        with _store(app, mailbox.database, server) as store:
            if store.maildrop(mailbox.address):
                store.purge(mailbox.address)
    row = mailbox_row(mailbox)
    if not password_stdin:
        row["Password"] = password
    render([row], output_format)


@click.command("get-mailbox")
@click.argument("address", required=False)
@click.option("--database", help="Only mailboxes in this database.")
@format_option
@pass_app
def get_mailbox(
    app: AppContext, address: str | None, database: str | None, output_format: str
) -> None:
    """Show mailboxes."""
    rows = []
    with app.directory() as directory:
        if address:
            mailboxes = [directory.get_mailbox(address)]
        else:
            mailboxes = directory.list_mailboxes(database)
        usage: dict[str, dict[str, MailboxUsage] | None] = {}
        for mailbox in mailboxes:
            if mailbox.database not in usage:
                usage[mailbox.database] = usage_of(app, directory, mailbox.database)
            found = usage[mailbox.database]
            used = None if found is None else found.get(mailbox.address, MailboxUsage(0, 0))
            rows.append(mailbox_row(mailbox) | quota_fields(directory, mailbox, used))
    render(rows, output_format)


@click.command("set-mailbox")
@click.argument("address")
@click.option("--password-stdin", is_flag=True, help="Read the new password.")
@click.option(
    "--prohibit-send-receive-quota",
    "quota",
    metavar="SIZE",
    help="This mailbox's own quota (50MB, 2GB, octets, or Unlimited); sets "
    "UseDatabaseQuotaDefaults to false.",
)
@click.option(
    "--use-database-quota-defaults",
    "use_defaults",
    metavar="true|false",
    help="true: the database's quota holds again (this mailbox's own is dropped).",
)
@pass_app
def set_mailbox(
    app: AppContext,
    address: str,
    password_stdin: bool,
    quota: str | None,
    use_defaults: str | None,
) -> None:
    """Change a mailbox's password (at the next login) or its quota (at the next
    delivery)."""
    if not password_stdin and quota is None and use_defaults is None:
        raise UserError(
            "nothing to set: give --password-stdin, --prohibit-send-receive-quota or "
            "--use-database-quota-defaults"
        )
    defaults = (
        None
        if use_defaults is None
        else parse_boolean(use_defaults, "--use-database-quota-defaults")
    )
    if defaults is True and quota is not None:
        raise UserError(
            "--prohibit-send-receive-quota with --use-database-quota-defaults true: the "
            "mailbox's own quota would not hold; give one of them"
        )
    octets = (
        None
        if quota is None
        else parse_byte_quantified_size(quota, "--prohibit-send-receive-quota")
    )
    password = chosen_password() if password_stdin else None
    with app.directory() as directory:
        mailbox = directory.get_mailbox(address)
        if password is not None:
            directory.set_password_hash(address, hash_password(password))
            click.echo(f"password of {mailbox.address} changed")
        if quota is not None or defaults is not None:
            keep = mailbox.prohibit_send_receive_quota if quota is None else octets
            mailbox = directory.set_mailbox_quota(address, bool(defaults), keep)
            click.echo(
                f"quota of {mailbox.address}: "
                f"{format_byte_quantified_size(directory.mailbox_quota(mailbox))}"
                + (" (the database's)" if mailbox.use_database_quota_defaults else "")
            )


@click.command("remove-mailbox")
@click.argument("address")
@click.option("--confirm/--no-confirm", default=True, help="Ask before removing.")
@pass_app
def remove_mailbox(app: AppContext, address: str, confirm: bool) -> None:
    """Remove a mailbox and every message in it (in no file of any copy once each copy
    has applied it and run its forgetting: [store] forget_interval, 60 s by default)."""
    with app.directory() as directory:
        mailbox = directory.get_mailbox(address)
        if confirm and sys.stdin.isatty():
            click.confirm(f"Remove {mailbox.address} and all its mail?", abort=True)
        server = directory.active_server(mailbox.database)
        here = _active_copy_here(app, mailbox.database, server)
        if not here and _on_another_host(app, server):
            # Its messages are in a file of another host's data folder: removed from the
            # directory alone, they would stay there.
            raise UserError(
                f"the active copy of {mailbox.database} is on {server}, whose files are not "
                f"in {app.data}: run remove-mailbox on the host of {server}"
            )
        directory.remove_mailbox(mailbox.address)
    removed = 0  # no copy file yet: nothing was ever delivered to it
    if here:
        with _store(app, mailbox.database, server) as store:
            removed = store.purge(mailbox.address)
    click.echo(f"removed {mailbox.address} and {removed} messages")


COMMANDS = [new_mailbox, get_mailbox, set_mailbox, remove_mailbox]
