"""`port-directory`: copy a SQLite directory into PostgreSQL, resumably.

Tables go in the order their foreign keys need, in batches of one transaction each,
and every row is an upsert on its primary key: a run cut short (kill -9, a lost
connection) is run again and goes on, and a run after services changed the SQLite
directory brings those changes too. The organization id comes along, since popguard's
own clients check it (LMTP greetings); a PostgreSQL directory that already holds
another organization is refused, not merged into.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from popguard.directory.directory import Directory
from popguard.directory.sql.engine import Engine, Row
from popguard.errors import UserError

BATCH = 500

# Foreign-key order, with each table's primary key (the upsert's conflict target).
TABLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("servers", ("name",)),
    ("databases", ("name",)),
    ("database_copies", ("database", "server")),
    ("mailboxes", ("address",)),
    ("pop_settings", ("server",)),
    ("component_states", ("server", "component", "requester")),
    ("copy_status", ("database", "server")),
    ("monitoring_overrides", ("id",)),
    ("monitor_repairing", ("server", "identity")),
    ("repairs", ("id",)),
)
GENERATED_KEYS = ("monitoring_overrides", "repairs")


@dataclass(frozen=True)
class TableCopied:
    table: str
    new: int
    refreshed: int


def port_directory(source: Directory, target: Directory) -> list[TableCopied]:
    if source.engine != "sqlite" or target.engine != "postgresql":
        raise UserError("port-directory copies a SQLite directory into a PostgreSQL one")
    _adopt_organization(source, target)
    return [_copy_table(source, target, table, key) for table, key in TABLES]


def _adopt_organization(source: Directory, target: Directory) -> None:
    theirs, ours = target.organization_id(), source.organization_id()
    if theirs == ours:
        return
    target_engine = _engine(target)
    if target_engine.execute("SELECT 1 FROM servers LIMIT 1").fetchone() is not None:
        raise UserError(
            f"{target.describe()} holds another organization ({theirs}, this one is "
            f"{ours}); port into an empty database"
        )
    with target_engine.transaction() as tx:
        tx.execute("UPDATE organization SET id = $1", (ours,))


def _copy_table(
    source: Directory, target: Directory, table: str, key: tuple[str, ...]
) -> TableCopied:
    rows = _engine(source).execute(f"SELECT * FROM {table} ORDER BY {', '.join(key)}")
    all_rows = rows.fetchall()
    if not all_rows:
        return TableCopied(table, 0, 0)
    columns = list(all_rows[0].keys())
    values = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
    others = [c for c in columns if c not in key]
    update = ", ".join(f"{c} = excluded.{c}" for c in others)
    statement = (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({values}) "
        f"ON CONFLICT ({', '.join(key)}) DO "
        + (f"UPDATE SET {update}" if others else "NOTHING")
        # xmax is 0 in a row version this statement inserted, not one it updated.
        + " RETURNING (xmax = 0) AS inserted"
    )
    new = refreshed = 0
    target_engine = _engine(target)
    for batch in _batches(all_rows, BATCH):
        with target_engine.transaction() as tx:
            for row in batch:
                result = tx.execute(statement, [row[c] for c in columns]).fetchone()
                if result is None:  # DO NOTHING: the row was there already
                    refreshed += 1
                elif result[0]:
                    new += 1
                else:
                    refreshed += 1
    if table in GENERATED_KEYS:
        # Rows came with their ids: the next id PostgreSQL makes must come after them.
        target_engine.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
        )
    return TableCopied(table, new, refreshed)


def _batches(rows: Sequence[Row], size: int) -> Iterator[Sequence[Row]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _engine(directory: Directory) -> Engine:
    return directory.raw_engine()
