"""The directory in PostgreSQL: one directory for every host of the organization.

psycopg 3 with a connection pool per process (shared by the directory handles and
threads of that process). Writers take one advisory lock per transaction, so
directory writes are serialized as SQLite's single writer serializes them: every
read-then-write of directory.py stays correct without a retry loop, and directory
writes are rare and short (moves, settings, copy status every few seconds).

While PostgreSQL cannot be reached, a read answers with what the same read last
returned in this process (a bounded memory of them), at once: POP3 logins and
deliveries for mailboxes this process has seen go on through a directory outage, and
a read it never made, or a write, fails at once with DirectoryUnavailable instead of
each caller waiting out a connection time-out. A thread of its own tries PostgreSQL
again every RETRY_INTERVAL; its first success ends the outage for all.

Another process's change is noticed through LISTEN/NOTIFY: triggers on the tables a
running service caches from send a notification at commit; one listener thread per
process counts them. A notification is a hint: after the listener reconnects it
counts once more, since whatever was sent while it was away is lost, so caches are
read again in full.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg_pool

from popguard.directory.location import PostgresLocation
from popguard.directory.schema import NOTIFY_CHANNEL
from popguard.directory.sql.engine import (
    DirectoryUnavailable,
    Migration,
    Result,
    psycopg_statement,
)
from popguard.errors import UserError

# Any constant: the key of the one lock every directory writer takes.
WRITERS_LOCK = 0x706F70_6775617264 & 0x7FFFFFFFFFFFFFFF
CONNECT_TIMEOUT = 5  # seconds, libpq's connect_timeout and the pool's wait
# A caller waits for a pooled connection in slices this long, asking between them
# whether the process has declared an outage (see PostgresEngine._connection).
POOL_WAIT_SLICE = 0.2
POOL_SIZE = 4
RETRY_INTERVAL = 2.0  # seconds between tries while the directory is unreachable
REMEMBERED_READS = 50_000  # about 200 bytes each: a mailbox row per user seen

# The pool reports every failed connection attempt as a warning: a command would print
# them beside popguard's one line, a service once a second through an outage. The
# outage's start and end are logged once, below.
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())
log = logging.getLogger("popguard.directory")


class PgRow:
    """A row by column name or position, like sqlite3.Row."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values = values
        self._index = index

    def __getitem__(self, key: int | str) -> Any:
        return self._values[key if isinstance(key, int) else self._index[key]]

    def keys(self) -> list[str]:
        return list(self._index)


def _rows(cursor: Any) -> Any:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: PgRow(values, index)


@dataclass
class PgResult:
    rows: list[PgRow]
    rowcount: int

    def fetchone(self) -> PgRow | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[PgRow]:
        return self.rows


def _run(connection: psycopg.Connection[Any], sql: str, params: Sequence[object]) -> PgResult:
    statement, ordered = psycopg_statement(sql, params)
    cursor = connection.execute(statement, ordered)
    rows = cursor.fetchall() if cursor.description is not None else []
    return PgResult(rows, cursor.rowcount)


class _Transaction:
    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self._connection = connection

    def execute(self, sql: str, params: Sequence[object] = ()) -> Result:
        return _run(self._connection, sql, params)


class _GaveUpWaiting(psycopg_pool.PoolTimeout):
    """Stopped waiting for a pooled connection: this process found the directory
    unreachable meanwhile."""


def _unavailable(location: PostgresLocation, exc: psycopg.Error) -> DirectoryUnavailable:
    if isinstance(exc, _GaveUpWaiting):
        why = "found unreachable while waiting for a connection"
    elif isinstance(exc, psycopg_pool.PoolTimeout):
        why = f"no connection within {CONNECT_TIMEOUT} s"
    else:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        why = why.removeprefix("connection failed: ")
    return DirectoryUnavailable(f"directory unreachable ({location.describe()}): {why}")


def connection_kwargs(location: PostgresLocation) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "connect_timeout": CONNECT_TIMEOUT,
        "application_name": "popguard",
        # A directory host cut off silently is noticed in seconds rather than the
        # kernel's hours: keepalives on an idle connection, and a bound on how long
        # sent data may stay unacknowledged while a query waits for its answer.
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": CONNECT_TIMEOUT * 1000,
    }
    password = location.password()
    if password is not None:
        kwargs["password"] = password
    return kwargs


class Reachability:
    """Whether this process can reach the directory, and what it read last.

    Shared by every handle and thread of the process on one directory."""

    def __init__(self, location: PostgresLocation, on_back: Callable[[], None]) -> None:
        self._location = location
        self._on_back = on_back
        self._lock = threading.Lock()
        self._reads: OrderedDict[tuple[str, tuple[object, ...]], PgResult] = OrderedDict()
        self.down_since: float | None = None
        self.last_error: DirectoryUnavailable | None = None

    @property
    def up(self) -> bool:
        return self.down_since is None

    def failed(self, error: DirectoryUnavailable) -> None:
        with self._lock:
            self.last_error = error
            if self.down_since is not None:
                return
            self.down_since = time.monotonic()
        log.error("%s; serving from what this process read last until it is back", error)
        threading.Thread(target=self._wait_until_back, name="popguard-directory-retry",
                         daemon=True).start()  # fmt: skip

    def _wait_until_back(self) -> None:
        while True:
            time.sleep(RETRY_INTERVAL)
            try:
                psycopg.connect(self._location.url, **connection_kwargs(self._location)).close()
                self._on_back()
            except (psycopg.Error, OSError, UserError):
                continue
            with self._lock:
                lasted = time.monotonic() - (self.down_since or time.monotonic())
                self.down_since = None
                self.last_error = None
            log.warning("the directory is reachable again, after %.0f s", lasted)
            return

    def remember(self, key: tuple[str, tuple[object, ...]], result: PgResult) -> None:
        with self._lock:
            self._reads[key] = result
            self._reads.move_to_end(key)
            while len(self._reads) > REMEMBERED_READS:
                self._reads.popitem(last=False)

    def recall(self, key: tuple[str, tuple[object, ...]]) -> PgResult | None:
        with self._lock:
            return self._reads.get(key)

    def unavailable(self) -> DirectoryUnavailable:
        return self.last_error or DirectoryUnavailable(
            f"directory unreachable ({self._location.describe()})"
        )


_pools: dict[PostgresLocation, psycopg_pool.ConnectionPool[Any]] = {}
_reachability: dict[PostgresLocation, Reachability] = {}
_listeners: dict[PostgresLocation, ChangeListener] = {}
_shared_lock = threading.Lock()


def _pool(location: PostgresLocation) -> psycopg_pool.ConnectionPool[Any]:
    with _shared_lock:
        pool = _pools.get(location)
        if pool is not None:
            return pool
        kwargs = connection_kwargs(location)
        # One connection made here, so that a wrong URL or password is reported with
        # libpq's own reason rather than as a pool's time-out.
        try:
            psycopg.connect(location.url, **kwargs).close()
        except psycopg.Error as exc:
            raise _unavailable(location, exc) from None
        pool = psycopg_pool.ConnectionPool(
            location.url,
            kwargs=kwargs | {"row_factory": _rows},
            min_size=1,
            max_size=POOL_SIZE,
            timeout=CONNECT_TIMEOUT,
            name="popguard-directory",
            open=True,
        )
        _pools[location] = pool
        return pool


class ChangeListener:
    """Counts NOTIFYs on the directory's channel, in a thread of its own."""

    def __init__(self, location: PostgresLocation) -> None:
        self._location = location
        self.count = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._listen, name="popguard-directory-listener", daemon=True
        )
        self._thread.start()

    def _listen(self) -> None:
        while not self._stopping.is_set():
            try:
                kwargs = connection_kwargs(self._location)
                with psycopg.connect(self._location.url, **kwargs) as connection:
                    connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.count += 1  # (re)connected: what was sent meanwhile is lost
                    while not self._stopping.is_set():
                        # Waits on the socket, a second at a time so that stop() is
                        # heard; nothing is sent to the server while nothing changes.
                        for _ in connection.notifies(timeout=1.0):
                            self.count += 1
            except (psycopg.Error, OSError, UserError):  # password file gone, too
                self.count += 1
                self._check_reachable()
                self._stopping.wait(1.0)

    def _check_reachable(self) -> None:
        """The listening connection broke: if a new connection fails too, the outage
        starts now for the whole process, so that its reads answer from memory at once
        instead of the first of them waiting out the pool's CONNECT_TIMEOUT (a stopped
        PostgreSQL refuses at once; this thread alone waits for a silent one)."""
        with _shared_lock:
            reachability = _reachability.get(self._location)
        if reachability is None or not reachability.up:
            return
        try:
            psycopg.connect(self._location.url, **connection_kwargs(self._location)).close()
        except psycopg.Error as exc:
            reachability.failed(_unavailable(self._location, exc))
        except (OSError, UserError):
            pass

    def stop(self) -> None:
        self._stopping.set()


class PostgresEngine:
    name = "postgresql"
    # clock_timestamp(), not now(): the time of this statement, not of the transaction's
    # start (a transaction that waited for the writers' lock must not judge a lease by
    # the moment it began waiting).
    clock_sql = "extract(epoch FROM clock_timestamp())::double precision"

    def __init__(self, location: PostgresLocation) -> None:
        self.location = location
        self._pool = _pool(location)
        with _shared_lock:
            reachability = _reachability.get(location)
            if reachability is None:
                # Back: connections the pool held from before are dead; test them all.
                reachability = Reachability(location, self._pool.check)
                _reachability[location] = reachability
            self._reachability = reachability

    def describe(self) -> str:
        return f"directory {self.location.describe()}"

    def execute(self, sql: str, params: Sequence[object] = ()) -> Result:
        key = (sql, tuple(params))
        reachability = self._reachability
        if reachability.up:
            try:
                result = self._read(sql, params)
            except psycopg.OperationalError as exc:
                reachability.failed(_unavailable(self.location, exc))
            else:
                reachability.remember(key, result)
                return result
        remembered = reachability.recall(key)
        if remembered is None:
            raise reachability.unavailable()
        return remembered

    def _read(self, sql: str, params: Sequence[object]) -> PgResult:
        try:
            with self._connection(CONNECT_TIMEOUT) as connection:
                return _run(connection, sql, params)
        except psycopg_pool.PoolTimeout:
            raise
        except psycopg.OperationalError:
            # A connection that died while idle in the pool (PostgreSQL restarted):
            # have the pool test the others, and try once more on a fresh one.
            self._pool.check()
            with self._connection(1.0) as connection:
                return _run(connection, sql, params)

    @contextmanager
    def _connection(self, patience: float) -> Iterator[psycopg.Connection[Any]]:
        """A connection from the pool, as the pool's own `connection()` gives it (its
        transaction ended on the way out), waited for in short slices while this
        process finds the directory reachable. A read or write that began just before
        an outage is declared (in milliseconds, by the LISTEN connection) then gives
        up at once and answers from memory or fails, instead of holding its thread for
        the whole wait: a passive copy's replicator behind its status report no longer
        misses the 3 s a delivery waits for its pull. PoolTimeout when none came."""
        deadline = time.monotonic() + patience
        while True:
            left = deadline - time.monotonic()
            try:
                connection = self._pool.getconn(timeout=max(0.001, min(POOL_WAIT_SLICE, left)))
                break
            except psycopg_pool.PoolTimeout:
                if not self._reachability.up:
                    raise _GaveUpWaiting() from None
                if left <= POOL_WAIT_SLICE:
                    raise
        try:
            with connection:
                yield connection
        finally:
            self._pool.putconn(connection)

    def reachable(self) -> bool:
        """False while this process finds the directory unreachable."""
        return self._reachability.up

    @contextmanager
    def transaction(self) -> Iterator[_Transaction]:
        reachability = self._reachability
        if not reachability.up:
            raise reachability.unavailable()
        try:
            with self._connection(CONNECT_TIMEOUT) as connection, connection.transaction():
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (WRITERS_LOCK,))
                yield _Transaction(connection)
        except psycopg.OperationalError as exc:
            error = _unavailable(self.location, exc)
            reachability.failed(error)
            raise error from None

    def migrate(self, migrations: Sequence[Migration]) -> None:
        # Up to date is one read (remembered through an outage): a service thread that
        # opens a handle while PostgreSQL is away still gets one.
        with contextlib.suppress(psycopg.errors.UndefinedTable):
            if self.schema_version() == len(migrations):
                return
        with self.transaction() as tx:
            tx.execute("CREATE TABLE IF NOT EXISTS popguard_schema (version BIGINT NOT NULL)")
            row = tx.execute("SELECT version FROM popguard_schema").fetchone()
            if row is None:
                tx.execute("INSERT INTO popguard_schema (version) VALUES (0)")
                version = 0
            else:
                version = int(row[0])
            if version > len(migrations):
                raise UserError(
                    f"{self.describe()} has schema version {version}, newer than this "
                    f"popguard ({len(migrations)}); upgrade popguard"
                )
            if version < len(migrations):
                # The column words ({name}, {ref}) are citext here: a trusted extension
                # since PostgreSQL 13, which the directory database's owner may create.
                self._script(tx, "CREATE EXTENSION IF NOT EXISTS citext")
            for target in range(version, len(migrations)):
                # A script without parameters goes as one simple query: several statements.
                self._script(tx, migrations[target].script(self.name))
                tx.execute("UPDATE popguard_schema SET version = $1", (target + 1,))

    @staticmethod
    def _script(tx: _Transaction, script: str) -> None:
        tx._connection.execute(script.encode())  # bytes: no placeholder parsing at all

    def schema_version(self) -> int:
        row = self.execute("SELECT version FROM popguard_schema").fetchone()
        return 0 if row is None else int(row[0])

    def change_counter(self) -> int:
        with _shared_lock:
            listener = _listeners.get(self.location)
            if listener is None:
                listener = _listeners[self.location] = ChangeListener(self.location)
        return listener.count

    def close(self) -> None:
        """The pool and listener are the process's, shared by every handle: they end
        with it."""
