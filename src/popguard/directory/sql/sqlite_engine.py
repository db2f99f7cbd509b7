"""The directory in one SQLite file: one machine, no server to run."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from popguard import sqlite_util
from popguard.directory.sql.engine import Migration, Result, sqlite_statement


class SqliteEngine:
    name = "sqlite"
    # One machine: the directory's clock is that machine's (julianday has milliseconds).
    clock_sql = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite_util.connect(path, timeout=10.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys=ON")

    def describe(self) -> str:
        return f"directory {self.path}"

    def execute(self, sql: str, params: Sequence[object] = ()) -> Result:
        return self._db.execute(sqlite_statement(sql), tuple(params))

    @contextmanager
    def transaction(self) -> Iterator[SqliteEngine]:
        with sqlite_util.transaction(self._db):
            yield self

    def migrate(self, migrations: Sequence[Migration]) -> None:
        sqlite_util.migrate(
            self._db, [step.script(self.name) for step in migrations], self.describe()
        )

    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def change_counter(self) -> int:
        # data_version moves with every commit of another connection: one statement,
        # no disk read.
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        self._db.close()
