"""How popguard opens SQLite files and runs a write transaction, in one place."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from popguard.errors import UserError


def connect(
    path: Path, timeout: float, check_same_thread: bool = True, durable: bool = True
) -> sqlite3.Connection:
    """WAL (readers never block the writer) and FULL sync (durable at COMMIT).

    `durable=False` (NORMAL sync) is for data whose last commits may go with a power
    loss but not with a crash of the process: health results, not mail.
    """
    connection = sqlite3.connect(
        path, timeout=timeout, isolation_level=None, check_same_thread=check_same_thread
    )
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    return connection


@contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE takes the write lock up front, so two processes writing at
    once wait for each other instead of failing half way; any error rolls back."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        if connection.in_transaction:  # SQLite may have rolled back itself (a full disk)
            connection.execute("ROLLBACK")
        raise
    try:
        connection.execute("COMMIT")
    except sqlite3.Error:
        # A COMMIT that failed (SQLITE_FULL, an I/O error) may leave the transaction
        # open: rolled back here, so that the connection's next BEGIN works once the
        # cause is gone.
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def statements(script: str) -> list[str]:
    """Split a script into statements as SQLite does (a ';' in a comment is no end)."""
    found, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            found.append(pending)
            pending = ""
    return found


def migrate(
    connection: sqlite3.Connection,
    migrations: Sequence[str | Callable[[sqlite3.Connection], None]],
    what: str,
) -> None:
    """Bring a file to `len(migrations)` with `PRAGMA user_version`, in one transaction.

    `migrations[i]` takes version i to i+1: a script, or a function for what SQL
    alone cannot do. A file newer than this popguard is refused, not guessed at.
    """
    with transaction(connection) as db:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(migrations):
            raise UserError(
                f"{what} has schema version {version}, newer than this popguard "
                f"({len(migrations)}); upgrade popguard"
            )
        for target in range(version, len(migrations)):
            step = migrations[target]
            if isinstance(step, str):
                for statement in statements(step):
                    db.execute(statement)
            else:
                step(db)
            db.execute(f"PRAGMA user_version = {target + 1}")
