"""The directory: servers, mailbox databases and their copies, mailboxes, settings.

Exchange keeps these in Active Directory; popguard keeps them in one SQLite file in
the data folder that every process of one machine opens, or in a PostgreSQL database
that every host of the organization shares (directory/location.py says which). The
SQL here is written once for both (directory/sql/), the schema is directory/schema.py.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from popguard.directory.location import (
    DirectoryLocation,
    PostgresLocation,
    SqliteLocation,
    directory_location,
)
from popguard.directory.schema import MIGRATIONS
from popguard.directory.settings import PopSettings
from popguard.directory.sql.engine import Engine, Executor, Row
from popguard.directory.sql.sqlite_engine import SqliteEngine
from popguard.errors import NotFoundError, UserError

# A mailbox server's lease: renewed every LEASE_RENEWAL seconds, it lapses LEASE_SECONDS
# after the last renewal by the directory's clock.
LEASE_SECONDS = 10.0
# Cached reads are read again at least this often, NOTIFY or not: a LISTEN connection
# across a partition may look alive and have missed changes (a failover meanwhile).
MAX_CACHE_AGE = 3.0
LEASE_RENEWAL = 2.0

# A service's cache of hot reads (cache_reads) starts again past this many rows: one per
# mailbox seen since the last change, about 300 bytes each.
MAX_CACHED_READS = 100_000

# Longer than the longest move can take (catch-up at most 120 s, plus dismount and mount).
MOVE_CLAIM_TIMEOUT = 300.0
ACTIVATION_POLICIES = ("Unrestricted", "Blocked")

COMPONENTS = ("PopProxy",)
COMPONENT_STATES = ("Active", "Inactive", "Draining")
# Exchange's requesters; a state is kept per requester so that, say, the health
# engine bringing a component back does not undo an operator's maintenance.
REQUESTERS = ("HealthApi", "Maintenance", "Sidelined", "Functional", "Deployment")

ROLES = ("mailbox", "frontend")

# Ports per role. Each logical server has its own loopback address, so every
# server can use the same port numbers, as real hosts would.
DEFAULT_PORTS: dict[str, dict[str, int]] = {
    # 64327 is the port Exchange's replication service (MSExchangeRepl) uses.
    "mailbox": {
        "pop3be": 1110,
        "pop3be-tls": 1995,
        "lmtp": 2424,
        # LMTP from the other mailbox servers only, TLS from the first octet with a
        # client certificate: mail they accepted for a copy active here.
        "lmtp-peer": 2425,
        "replication": 64327,
        "health": 8480,
    },
    # web: the operator's web page (popguard serve web).
    "frontend": {"pop3": 10110, "pop3-tls": 10995, "health": 8480, "web": 8088},
}

_SERVER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,62}$")
_DATABASE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
# Deliberately narrow: popguard's own mailboxes are plain ASCII local@domain.
_ADDRESS = re.compile(r"^[A-Za-z0-9._%+=-]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


@dataclass(frozen=True)
class Server:
    name: str
    roles: tuple[str, ...]
    address: str
    ports: dict[str, int] = field(default_factory=dict)
    activation_disabled: bool = False  # DatabaseCopyActivationDisabledAndMoveNow
    auto_activation_policy: str = "Unrestricted"

    @property
    def may_activate_copies(self) -> bool:
        return not self.activation_disabled and self.auto_activation_policy != "Blocked"

    def port(self, endpoint: str) -> int:
        try:
            return self.ports[endpoint]
        except KeyError:
            raise UserError(f"server {self.name} has no {endpoint} endpoint") from None


@dataclass(frozen=True)
class DatabaseCopy:
    database: str
    server: str
    activation_preference: int
    is_active: bool
    # A passive copy the active copy's acknowledgements wait for (Active Manager fails
    # over by itself only to one of these).
    synchronous: bool = False


@dataclass(frozen=True)
class Mailbox:
    address: str
    database: str
    password_hash: str
    created: float
    password_changed: float
    # Exchange's UseDatabaseQuotaDefaults and ProhibitSendReceiveQuota (octets; None:
    # unlimited), the latter used only when the former is False.
    use_database_quota_defaults: bool = True
    prohibit_send_receive_quota: int | None = None


def normalize_address(address: str) -> str:
    address = address.strip().lower()
    if not _ADDRESS.match(address):
        raise UserError(f"not a valid mailbox address: {address!r}")
    return address


class Directory:
    """One connection to the directory; cheap to open, safe across processes."""

    def __init__(self, data: Path, location: DirectoryLocation | None = None) -> None:
        self.data = data
        self.location = location if location is not None else directory_location(data)
        data.mkdir(parents=True, exist_ok=True)
        self._engine = open_engine(self.location)
        self._cached_reads: dict[tuple[str, tuple[object, ...]], Row | None] | None = None
        self._cached_version = -1
        self._cached_since = 0.0
        try:
            self._engine.migrate(MIGRATIONS)
        except BaseException:
            self._engine.close()
            raise

    @property
    def engine(self) -> str:
        return self._engine.name

    def describe(self) -> str:
        return self._engine.describe()

    def raw_engine(self) -> Engine:
        """The engine under this handle, for whole-table work (port-directory) only."""
        return self._engine

    def cache_reads(self) -> None:
        """Keep the rows of the reads on a service's hot path (a mailbox, a server, the
        active copy, settings, a move) until the directory changes.

        For a long-running service on PostgreSQL: there each read is a network round
        trip that holds up the event loop (three per login), while a change is told by
        NOTIFY and ends the whole cache at once (change_counter). SQLite's reads cost
        microseconds, so it reads every time."""
        if self._engine.name == "postgresql":
            self._cached_reads = {}
            self._cached_version = self._engine.change_counter()

    def _read_one(self, sql: str, params: tuple[object, ...]) -> Row | None:
        cache = self._cached_reads
        if cache is None:
            return self._engine.execute(sql, params).fetchone()
        version = self._engine.change_counter()
        now = time.monotonic()
        if (
            version != self._cached_version
            or len(cache) > MAX_CACHED_READS
            or now - self._cached_since > MAX_CACHE_AGE
        ):
            cache.clear()
            self._cached_version = version
            self._cached_since = now
        key = (sql, params)
        try:
            return cache[key]
        except KeyError:
            row = cache[key] = self._engine.execute(sql, params).fetchone()
            return row

    def organization_id(self) -> str:
        """The organization's random name, the same for every server of it."""
        row = self._engine.execute("SELECT id FROM organization").fetchone()
        if row is None:
            raise UserError(f"{self.describe()} has no organization id; it is damaged")
        return str(row[0])

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _transaction(self) -> AbstractContextManager[Executor]:
        # This handle's own write is seen by its next read at once, not only once its
        # NOTIFY comes back.
        if self._cached_reads is not None:
            self._cached_reads.clear()
        return self._engine.transaction()

    def schema_version(self) -> int:
        return self._engine.schema_version()

    def change_counter(self) -> int:
        """Changes whenever another process commits to the directory (cheap to poll:
        SQLite reads a number in memory, PostgreSQL counts notifications)."""
        return self._engine.change_counter()

    # Servers -------------------------------------------------------------------

    def new_server(
        self,
        name: str,
        roles: list[str],
        address: str,
        ports: dict[str, int] | None = None,
    ) -> Server:
        if not _SERVER_NAME.match(name):
            raise UserError(f"not a valid server name: {name!r} (letters, digits, '-')")
        if not roles:
            raise UserError("a server needs at least one role (mailbox, frontend)")
        for role in roles:
            if role not in ROLES:
                raise UserError(f"unknown role {role!r}; roles are: {', '.join(ROLES)}")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise UserError(f"not an IP address: {address!r}") from None
        merged: dict[str, int] = {}
        for role in roles:
            merged |= DEFAULT_PORTS[role]
        merged |= ports or {}
        for endpoint, port in merged.items():
            if not 1 <= port <= 65535:
                raise UserError(f"port for {endpoint} out of range: {port}")
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM servers WHERE name = $1", (name,)).fetchone():
                raise UserError(f"server {name} already exists")
            db.execute(
                "INSERT INTO servers (name, roles, address, ports) VALUES ($1, $2, $3, $4)",
                (name, json.dumps(sorted(set(roles))), address, json.dumps(merged)),
            )
        return self.get_server(name)

    def get_server(self, name: str) -> Server:
        row = self._read_one("SELECT * FROM servers WHERE name = $1", (name,))
        if row is None:
            raise NotFoundError(f"no server named {name!r}")
        return _server(row)

    def list_servers(self) -> list[Server]:
        rows = self._engine.execute("SELECT * FROM servers ORDER BY name").fetchall()
        return [_server(row) for row in rows]

    # Databases and copies ----------------------------------------------------------

    def new_database(self, name: str, server: str) -> DatabaseCopy:
        """A database with its first copy, active, on `server`."""
        if not _DATABASE_NAME.match(name):
            raise UserError(f"not a valid database name: {name!r}")
        host = self.get_server(server)
        if "mailbox" not in host.roles:
            raise UserError(f"server {server} does not have the mailbox role")
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM databases WHERE name = $1", (name,)).fetchone():
                raise UserError(f"database {name} already exists")
            db.execute("INSERT INTO databases (name, created) VALUES ($1, $2)", (name, time.time()))
            db.execute(
                "INSERT INTO database_copies (database, server, activation_preference, "
                "is_active) VALUES ($1, $2, 1, 1)",
                (name, host.name),
            )
        return DatabaseCopy(name, host.name, 1, True)

    def add_database_copy(self, database: str, server: str, activation_preference: int) -> None:
        """A passive copy of `database` on `server` (its data comes with replication)."""
        database = self._require_database(database)
        host = self.get_server(server)
        if "mailbox" not in host.roles:
            raise UserError(f"server {server} does not have the mailbox role")
        if activation_preference < 1:
            raise UserError("activation preference must be 1 or more")
        with self._transaction() as db:
            if db.execute(
                "SELECT 1 FROM database_copies WHERE database = $1 AND server = $2",
                (database, host.name),
            ).fetchone():
                raise UserError(f"database {database} already has a copy on {host.name}")
            db.execute(
                "INSERT INTO database_copies (database, server, activation_preference, "
                "is_active) VALUES ($1, $2, $3, 0)",
                (database, host.name, activation_preference),
            )

    def remove_database_copy(self, database: str, server: str) -> None:
        """Forget a passive copy; the active one cannot be removed (move it first)."""
        database = self._require_database(database)
        with self._transaction() as db:
            row = db.execute(
                "SELECT is_active FROM database_copies WHERE database = $1 AND server = $2",
                (database, server),
            ).fetchone()
            if row is None:
                raise NotFoundError(f"database {database} has no copy on {server}")
            if row["is_active"]:
                raise UserError(
                    f"{database}\\{server} is the active copy; move the database to another "
                    "copy first (move-activemailboxdatabase)"
                )
            db.execute(
                "DELETE FROM database_copies WHERE database = $1 AND server = $2",
                (database, server),
            )

    # Moves: claimed, then finished or released, so two at once cannot both win.

    def claim_move(self, database: str, claimant: str) -> None:
        database = self._require_database(database)
        now = time.time()
        with self._transaction() as db:
            claimed = db.execute(
                "UPDATE databases SET move_claim = $1, move_claimed = $2 WHERE name = $3 "
                "AND (move_claim IS NULL OR move_claimed < $4)",
                (claimant, now, database, now - MOVE_CLAIM_TIMEOUT),
            ).rowcount
        if not claimed:
            raise UserError(f"database {database} is being moved by another command; try later")

    def finish_move(
        self,
        database: str,
        claimant: str,
        server: str,
        reports: list[CopyStatusReport],
        source: str,
        source_lease_lapsed: bool = False,
    ) -> None:
        """Activate the copy on `server`, record the copies' new statuses and end the
        move, in one transaction; only if the move is still ours and `source` still
        the active copy (and, for Active Manager's failover, `source`'s lease still
        lapsed by the directory's clock: a server that came back keeps its copy)."""
        with self._transaction() as db:
            claim = db.execute(
                "SELECT move_claim FROM databases WHERE name = $1", (database,)
            ).fetchone()
            if claim is None or claim[0] != claimant:
                raise UserError(f"the move of {database} was taken over by another command")
            active = db.execute(
                "SELECT server FROM database_copies WHERE database = $1 AND is_active = 1",
                (database,),
            ).fetchone()
            if active is None or active[0].lower() != source.lower():
                raise UserError(f"{database} is no longer active on {source}; move not applied")
            if source_lease_lapsed:
                lease = db.execute(
                    f"SELECT expires - {self._engine.clock_sql} FROM leases "
                    "WHERE kind = 'server' AND name = $1",
                    (source,),
                ).fetchone()
                if lease is not None and float(lease[0]) > 0:
                    raise UserError(f"{source} renewed its lease meanwhile; not failed over")
            self._activate(db, database, server)
            for report in reports:
                self._write_copy_status(db, report)
            db.execute("UPDATE databases SET move_claim = NULL WHERE name = $1", (database,))

    def release_move(self, database: str, claimant: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE databases SET move_claim = NULL WHERE name = $1 AND move_claim = $2",
                (database, claimant),
            )

    def move_in_progress(self, database: str) -> bool:
        row = self._read_one(
            "SELECT move_claim, move_claimed FROM databases WHERE name = $1", (database,)
        )
        return bool(row and row[0] and row[1] >= time.time() - MOVE_CLAIM_TIMEOUT)

    def activate_copy(self, database: str, server: str) -> None:
        """Make the copy on `server` the active one, in one transaction."""
        database = self._require_database(database)
        with self._transaction() as db:
            self._activate(db, database, server)

    @staticmethod
    def _activate(db: Executor, database: str, server: str) -> None:
        target = db.execute(
            "SELECT 1 FROM database_copies WHERE database = $1 AND server = $2",
            (database, server),
        ).fetchone()
        if target is None:
            raise UserError(f"database {database} has no copy on {server}")
        db.execute(
            "UPDATE database_copies SET is_active = 0, synchronous = 0 WHERE database = $1",
            (database,),
        )
        db.execute(
            "UPDATE database_copies SET is_active = 1 WHERE database = $1 AND server = $2",
            (database, server),
        )
        db.execute("UPDATE databases SET epoch = epoch + 1 WHERE name = $1", (database,))

    def database_epoch(self, database: str) -> int:
        """The fencing token of `database`'s active copy: it grows with every activation."""
        row = self._engine.execute(
            "SELECT epoch FROM databases WHERE name = $1", (self._require_database(database),)
        ).fetchone()
        return 0 if row is None else int(row[0])

    # Leases (Active Manager), judged by the directory's clock ---------------------------

    def renew_lease(self, server: str, seconds: float = LEASE_SECONDS) -> float:
        """Extend `server`'s lease to `seconds` from now by the directory's clock; the
        seconds it has left (`seconds`, less the statement's own time)."""
        return self._take_lease("server", server, server, seconds, steal=True)

    def claim_role(self, role: str, server: str, seconds: float = LEASE_SECONDS) -> bool:
        """Hold `role` (one server at a time, e.g. the one that decides failovers) for
        `seconds`: granted when nobody holds it, its holder's lease expired, or
        `server` holds it already."""
        return self._take_lease("role", role, server, seconds, steal=False) > 0

    def _take_lease(self, kind: str, name: str, holder: str, seconds: float, steal: bool) -> float:
        if not 0 < seconds <= 3600:
            raise UserError(f"a lease lasts more than 0 and at most 3600 seconds, not {seconds}")
        holder = self.get_server(holder).name
        if kind == "server":
            name = holder  # its spelling in the directory
        clock = self._engine.clock_sql
        with self._transaction() as db:
            current = db.execute(
                f"SELECT holder, expires - {clock} AS remaining FROM leases "
                "WHERE kind = $1 AND name = $2",
                (kind, name),
            ).fetchone()
            if (
                current is not None
                and not steal
                and current["holder"].lower() != holder.lower()
                and current["remaining"] > 0
            ):
                return 0.0
            db.execute(
                f"INSERT INTO leases (kind, name, holder, expires, renewed) "
                f"VALUES ($1, $2, $3, {clock} + $4, {clock}) "
                "ON CONFLICT (kind, name) DO UPDATE SET holder = excluded.holder, "
                "expires = excluded.expires, renewed = excluded.renewed",
                (kind, name, holder, float(seconds)),
            )
            row = db.execute(
                f"SELECT expires - {clock} FROM leases WHERE kind = $1 AND name = $2",
                (kind, name),
            ).fetchone()
        return 0.0 if row is None else float(row[0])

    def leases(self) -> dict[str, float]:
        """Each server's lease: the seconds it has left by the directory's clock
        (negative: expired that long ago). A server that never held one is absent."""
        rows = self._engine.execute(
            f"SELECT name, expires - {self._engine.clock_sql} AS remaining FROM leases "
            "WHERE kind = 'server' ORDER BY name"
        ).fetchall()
        return {str(r["name"]): float(r["remaining"]) for r in rows}

    def role_holder(self, role: str) -> tuple[str, float] | None:
        row = self._engine.execute(
            f"SELECT holder, expires - {self._engine.clock_sql} AS remaining FROM leases "
            "WHERE kind = 'role' AND name = $1",
            (role,),
        ).fetchone()
        return None if row is None else (str(row["holder"]), float(row["remaining"]))

    def fail_over(self, database: str, source: str, target: str, epoch: int) -> int:
        """Activate `database`'s copy on `target` in place of `source`'s, in one
        compare-and-set: only while `source` still holds the active copy at `epoch` and
        its lease has expired by the directory's clock. The new epoch; UserError with
        the reason when any of that no longer holds (another decider was first, the
        server came back)."""
        database = self._require_database(database)
        clock = self._engine.clock_sql
        with self._transaction() as db:
            row = db.execute(
                "SELECT d.epoch, c.server FROM databases d JOIN database_copies c "
                "ON c.database = d.name AND c.is_active = 1 WHERE d.name = $1",
                (database,),
            ).fetchone()
            if row is None or str(row["server"]).lower() != source.lower():
                raise UserError(f"{database} is no longer active on {source}; not failed over")
            if int(row["epoch"]) != epoch:
                raise UserError(
                    f"{database} was activated again meanwhile (epoch {row['epoch']}, "
                    f"not {epoch}); not failed over"
                )
            lease = db.execute(
                f"SELECT expires - {clock} FROM leases WHERE kind = 'server' AND name = $1",
                (source,),
            ).fetchone()
            if lease is not None and float(lease[0]) > 0:
                raise UserError(
                    f"{source}'s lease has {float(lease[0]):.1f} s left; not failed over"
                )
            self._activate(db, database, target)
            return epoch + 1

    def list_databases(self) -> list[str]:
        rows = self._engine.execute("SELECT name FROM databases ORDER BY name").fetchall()
        return [row["name"] for row in rows]

    def database_copies(self, database: str | None = None) -> list[DatabaseCopy]:
        if database is None:
            rows = self._engine.execute(
                "SELECT * FROM database_copies ORDER BY database, activation_preference"
            ).fetchall()
        else:
            database = self._require_database(database)  # its spelling in the directory
            rows = self._engine.execute(
                "SELECT * FROM database_copies WHERE database = $1 ORDER BY activation_preference",
                (database,),
            ).fetchall()
        return [
            DatabaseCopy(
                r["database"],
                r["server"],
                r["activation_preference"],
                bool(r["is_active"]),
                bool(r["synchronous"]),
            )
            for r in rows
        ]

    def copy_count(self, database: str) -> int:
        """How many copies `database` has (0 for a database the directory lacks); a hot
        read, cached while the directory sends no change."""
        row = self._read_one(
            "SELECT count(*) FROM database_copies WHERE database = $1", (database,)
        )
        return 0 if row is None else int(row[0])

    def set_copy_synchronous(self, database: str, server: str, synchronous: bool) -> None:
        """Say whether the passive copy of `database` on `server` is one the active
        copy's acknowledgements wait for (the active copy's replication service does)."""
        database = self._require_database(database)
        with self._transaction() as db:
            db.execute(
                "UPDATE database_copies SET synchronous = $1 "
                "WHERE database = $2 AND server = $3 AND is_active = 0",
                (int(synchronous), database, server),
            )

    def active_server(self, database: str) -> str:
        row = self._read_one(
            "SELECT server FROM database_copies WHERE database = $1 AND is_active = 1", (database,)
        )
        if row is None:
            spelled = self._require_database(database)
            if spelled != database:  # a name in another case: SQLite compares copies' exactly
                return self.active_server(spelled)
            raise UserError(f"database {database} has no active copy")
        return str(row["server"])

    def _require_database(self, name: str) -> str:
        row = self._engine.execute("SELECT name FROM databases WHERE name = $1", (name,)).fetchone()
        if row is None:
            known = ", ".join(self.list_databases()) or "none"
            raise NotFoundError(f"no database named {name!r} (databases: {known})")
        return str(row["name"])

    # Copy status, as each server's replication service reports it -------------------------

    def report_copy_status(self, report: CopyStatusReport) -> None:
        with self._transaction() as db:
            self._write_copy_status(db, report)

    def _write_copy_status(self, db: Executor, report: CopyStatusReport) -> None:
        exists = db.execute(
            "SELECT 1 FROM database_copies WHERE database = $1 AND server = $2",
            (report.database, report.server),
        ).fetchone()
        if exists is None:  # the copy was removed meanwhile
            return
        db.execute(
            "INSERT INTO copy_status (database, server, status, copy_queue_length, "
            "replay_queue_length, applied_lsn, last_inspected_log_time, error, reported, "
            "database_size, message_bytes, log_bytes) "
            # When it was reported is the directory's clock, not the reporter's
            # (report.reported): a report is judged fresh or stale (ServiceDown) on other
            # hosts, and a host whose clock is stepped an hour back would otherwise look
            # dead to all of them, an hour ahead alive an hour after it died.
            f"VALUES ($1, $2, $3, $4, $5, $6, $7, $8, {self._engine.clock_sql}, $9, $10, $11) "
            "ON CONFLICT (database, server) DO UPDATE SET status = excluded.status, "
            "copy_queue_length = excluded.copy_queue_length, "
            "replay_queue_length = excluded.replay_queue_length, "
            "applied_lsn = excluded.applied_lsn, "
            "last_inspected_log_time = excluded.last_inspected_log_time, "
            "error = excluded.error, reported = excluded.reported, "
            # A report without sizes (a move's, a suspension's) keeps the last measured.
            "database_size = COALESCE(excluded.database_size, copy_status.database_size), "
            "message_bytes = COALESCE(excluded.message_bytes, copy_status.message_bytes), "
            "log_bytes = COALESCE(excluded.log_bytes, copy_status.log_bytes)",
            (
                report.database, report.server, report.status, report.copy_queue_length,
                report.replay_queue_length, report.applied_lsn,
                report.last_inspected_log_time, report.error,
                report.database_size, report.message_bytes, report.log_bytes,
            ),
        )  # fmt: skip

    def copy_status_reports(self) -> dict[tuple[str, str], CopyStatusReport]:
        """Each copy's last report; `reported` on this host's clock, as long ago as the
        directory's clock says (so a reader judges its age with time.time(), whatever
        its own clock or the reporter's says)."""
        rows = self._engine.execute(
            f"SELECT *, {self._engine.clock_sql} AS directory_now FROM copy_status"
        ).fetchall()
        now = time.time()
        return {
            (r["database"], r["server"]): CopyStatusReport(
                database=r["database"],
                server=r["server"],
                status=r["status"],
                copy_queue_length=r["copy_queue_length"],
                replay_queue_length=r["replay_queue_length"],
                applied_lsn=r["applied_lsn"],
                last_inspected_log_time=r["last_inspected_log_time"],
                error=r["error"],
                reported=now - (float(r["directory_now"]) - float(r["reported"])),
                database_size=r["database_size"],
                message_bytes=r["message_bytes"],
                log_bytes=r["log_bytes"],
            )
            for r in rows
        }

    def set_mailbox_server(
        self,
        server: str,
        activation_disabled: bool | None = None,
        auto_activation_policy: str | None = None,
    ) -> Server:
        host = self.get_server(server)
        if "mailbox" not in host.roles:
            raise UserError(f"server {host.name} does not have the mailbox role")
        with self._transaction() as db:
            if activation_disabled is not None:
                db.execute(
                    "UPDATE servers SET activation_disabled = $1 WHERE name = $2",
                    (int(activation_disabled), host.name),
                )
            if auto_activation_policy is not None:
                policy = _choice(auto_activation_policy, ACTIVATION_POLICIES, "policy")
                db.execute(
                    "UPDATE servers SET auto_activation_policy = $1 WHERE name = $2",
                    (policy, host.name),
                )
        return self.get_server(host.name)

    # Monitoring overrides and repairing flags ---------------------------------------------

    def add_monitoring_override(self, override: MonitoringOverride) -> int:
        if override.server is not None:
            self.get_server(override.server)
        with self._transaction() as db:
            # Expired ones go here, so the table (read whole by every health service)
            # holds only what still counts.
            db.execute("DELETE FROM monitoring_overrides WHERE expires <= $1", (override.created,))
            row = db.execute(
                "INSERT INTO monitoring_overrides (server, identity, item_type, property_name, "
                "property_value, created, expires) VALUES ($1, $2, $3, $4, $5, $6, $7) "
                "RETURNING id",
                (
                    override.server, override.identity, override.item_type,
                    override.property_name, override.property_value, override.created,
                    override.expires,
                ),
            ).fetchone()  # fmt: skip
            return 0 if row is None else int(row[0])

    def monitoring_overrides(self, server: str | None, now: float) -> list[MonitoringOverride]:
        """Unexpired overrides for `server` (its own and the global ones), or all with None.

        The clock is applied here, not in the query: the same statement every time is
        one a process remembers through a directory outage, and an override that
        expires during one stops counting even so."""
        if server is None:
            rows = self._engine.execute("SELECT * FROM monitoring_overrides ORDER BY id").fetchall()
        else:
            rows = self._engine.execute(
                "SELECT * FROM monitoring_overrides "
                "WHERE server IS NULL OR lower(server) = lower($1) ORDER BY id",
                (server,),
            ).fetchall()
        return [
            MonitoringOverride(
                r["server"], r["identity"], r["item_type"], r["property_name"],
                r["property_value"], r["created"], r["expires"], r["id"],
            )
            for r in rows
            if r["expires"] > now
        ]  # fmt: skip

    def remove_monitoring_override(
        self, server: str | None, identity: str, item_type: str, property_name: str
    ) -> int:
        matching = (
            "DELETE FROM monitoring_overrides WHERE identity = $1 AND item_type = $2 "
            "AND lower(property_name) = lower($3) AND "
        )
        with self._transaction() as db:
            if server is None:
                result = db.execute(
                    matching + "server IS NULL", (identity, item_type, property_name)
                )
            else:
                result = db.execute(
                    matching + "lower(server) = lower($4)",
                    (identity, item_type, property_name, server),
                )
            return int(result.rowcount)

    def set_monitor_repairing(self, server: str, identity: str, repairing: bool) -> None:
        name = self.get_server(server).name
        with self._transaction() as db:
            if repairing:
                db.execute(
                    "INSERT INTO monitor_repairing (server, identity, since) "
                    "VALUES ($1, $2, $3) ON CONFLICT (server, identity) "
                    "DO UPDATE SET since = excluded.since",
                    (name, identity, time.time()),
                )
            else:
                db.execute(
                    "DELETE FROM monitor_repairing WHERE server = $1 AND identity = $2",
                    (name, identity),
                )

    def monitors_repairing(self, server: str) -> set[str]:
        rows = self._engine.execute(
            "SELECT identity FROM monitor_repairing WHERE lower(server) = lower($1)", (server,)
        ).fetchall()
        return {str(r["identity"]).lower() for r in rows}

    # Repairs (group throttles) ------------------------------------------------------------

    def record_repair(self, server: str, role: str, kind: str, service: str, at: float) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO repairs (server, role, kind, service, started) "
                "VALUES ($1, $2, $3, $4, $5)",
                (self.get_server(server).name, role, kind, service, at),
            )

    def prune_repairs(self, server: str, before: float) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM repairs WHERE server = $1 AND started < $2", (server, before))

    def repairs_since(self, role: str, since: float) -> list[tuple[str, str, str, float]]:
        """(server, kind, service, started) of the repairs on servers of `role`, oldest first."""
        rows = self._engine.execute(
            "SELECT server, kind, service, started FROM repairs WHERE role = $1 AND started >= $2 "
            "ORDER BY started",
            (role, since),
        ).fetchall()
        return [(r["server"], r["kind"], r["service"], float(r["started"])) for r in rows]

    # Mailboxes -----------------------------------------------------------------------

    def new_mailbox(self, address: str, database: str, password_hash: str) -> Mailbox:
        address = normalize_address(address)
        database = self._require_database(database)
        now = time.time()
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM mailboxes WHERE address = $1", (address,)).fetchone():
                raise UserError(f"mailbox {address} already exists")
            db.execute(
                "INSERT INTO mailboxes (address, database, password_hash, created, "
                "password_changed) VALUES ($1, $2, $3, $4, $5)",
                (address, database, password_hash, now, now),
            )
        return self.get_mailbox(address)

    def find_mailbox(self, address: str) -> Mailbox | None:
        row = self._read_one(
            "SELECT * FROM mailboxes WHERE address = $1", (address.strip().lower(),)
        )
        return None if row is None else _mailbox(row)

    def get_mailbox(self, address: str) -> Mailbox:
        mailbox = self.find_mailbox(address)
        if mailbox is None:
            raise NotFoundError(f"no mailbox {address!r}")
        return mailbox

    def list_mailboxes(self, database: str | None = None) -> list[Mailbox]:
        if database is None:
            rows = self._engine.execute("SELECT * FROM mailboxes ORDER BY address").fetchall()
        else:
            rows = self._engine.execute(
                "SELECT * FROM mailboxes WHERE database = $1 ORDER BY address", (database,)
            ).fetchall()
        return [_mailbox(row) for row in rows]

    def set_password_hash(self, address: str, password_hash: str) -> None:
        with self._transaction() as db:
            updated = db.execute(
                "UPDATE mailboxes SET password_hash = $1, password_changed = $2 WHERE address = $3",
                (password_hash, time.time(), address.strip().lower()),
            ).rowcount
        if not updated:
            raise NotFoundError(f"no mailbox {address!r}")

    def remove_mailbox(self, address: str) -> Mailbox:
        mailbox = self.get_mailbox(address)
        with self._transaction() as db:
            db.execute("DELETE FROM mailboxes WHERE address = $1", (mailbox.address,))
        return mailbox

    # Quotas (store-ops) -------------------------------------------------------------------

    def set_database_quota(self, database: str, quota: int | None) -> None:
        """A database's default ProhibitSendReceiveQuota in octets (None: unlimited)."""
        database = self._require_database(database)
        with self._transaction() as db:
            db.execute(
                "UPDATE databases SET prohibit_send_receive_quota = $1 WHERE name = $2",
                (quota, database),
            )

    def database_quota(self, database: str) -> int | None:
        row = self._read_one(
            "SELECT prohibit_send_receive_quota FROM databases WHERE name = $1", (database,)
        )
        return None if row is None or row[0] is None else int(row[0])

    def set_mailbox_quota(
        self, address: str, use_database_quota_defaults: bool, quota: int | None
    ) -> Mailbox:
        with self._transaction() as db:
            updated = db.execute(
                "UPDATE mailboxes SET use_database_quota_defaults = $1, "
                "prohibit_send_receive_quota = $2 WHERE address = $3",
                (int(use_database_quota_defaults), quota, address.strip().lower()),
            ).rowcount
        if not updated:
            raise NotFoundError(f"no mailbox {address!r}")
        return self.get_mailbox(address)

    def mailbox_quota(self, mailbox: Mailbox) -> int | None:
        """The quota that holds for `mailbox`: its own, or its database's (None: unlimited)."""
        if not mailbox.use_database_quota_defaults:
            return mailbox.prohibit_send_receive_quota
        return self.database_quota(mailbox.database)

    # Server component states ------------------------------------------------------------

    def set_component_state(self, server: str, component: str, state: str, requester: str) -> None:
        name = self.get_server(server).name
        component = _choice(component, COMPONENTS, "component")
        state = _choice(state, COMPONENT_STATES, "state")
        requester = _choice(requester, REQUESTERS, "requester")
        with self._transaction() as db:
            db.execute(
                "INSERT INTO component_states (server, component, requester, state, updated) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT(server, component, requester) "
                "DO UPDATE SET state = excluded.state, updated = excluded.updated",
                (name, component, requester, state, time.time()),
            )

    def component_states(self, server: str) -> list[ComponentState]:
        name = self.get_server(server).name
        rows = self._engine.execute(
            "SELECT component, requester, state FROM component_states WHERE server = $1", (name,)
        ).fetchall()
        states = []
        for component in COMPONENTS:
            requesters = {r["requester"]: r["state"] for r in rows if r["component"] == component}
            effective = next(
                (s for s in ("Inactive", "Draining") if s in requesters.values()), "Active"
            )
            states.append(ComponentState(name, component, effective, requesters))
        return states

    def component_state(self, server: str, component: str) -> str:
        component = _choice(component, COMPONENTS, "component")
        return next(s.state for s in self.component_states(server) if s.component == component)

    # POP settings ------------------------------------------------------------------------

    def pop_settings(self, server: str) -> tuple[PopSettings, int]:
        """The server's settings and a revision that grows with every change."""
        name = self.get_server(server).name
        row = self._read_one(
            "SELECT settings, revision FROM pop_settings WHERE server = $1", (name,)
        )
        if row is None:
            return PopSettings(), 0
        return PopSettings.model_validate_json(row["settings"]), int(row["revision"])

    def set_pop_settings(self, server: str, settings: PopSettings) -> int:
        name = self.get_server(server).name
        stored = settings.model_dump_json(exclude_defaults=True)
        with self._transaction() as db:
            row = db.execute(
                "SELECT revision FROM pop_settings WHERE server = $1", (name,)
            ).fetchone()
            revision = (row["revision"] if row else 0) + 1
            db.execute(
                "INSERT INTO pop_settings (server, settings, revision) VALUES ($1, $2, $3) "
                "ON CONFLICT(server) DO UPDATE SET settings = excluded.settings, "
                "revision = excluded.revision",
                (name, stored, revision),
            )
        return int(revision)


@dataclass(frozen=True)
class CopyStatusReport:
    database: str
    server: str
    status: str
    copy_queue_length: int
    replay_queue_length: int
    applied_lsn: int
    last_inspected_log_time: float | None
    error: str | None
    reported: float
    # The copy's sizes in octets (None: not measured in this report; the last
    # measured ones are kept): its files, its live messages, its change log.
    database_size: int | None = None
    message_bytes: int | None = None
    log_bytes: int | None = None


@dataclass(frozen=True)
class MonitoringOverride:
    server: str | None  # None: global
    identity: str  # HealthSet\Item
    item_type: str  # Probe | Monitor
    property_name: str
    property_value: str
    created: float
    expires: float
    id: int = 0


@dataclass(frozen=True)
class ComponentState:
    server: str
    component: str
    state: str  # the effective state
    requesters: dict[str, str]  # requester -> the state it asked for


def _choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    for candidate in allowed:
        if candidate.lower() == value.lower():
            return candidate
    raise UserError(f"unknown {what} {value!r}; one of: {', '.join(allowed)}")


def _server(row: Row) -> Server:
    return Server(
        name=row["name"],
        roles=tuple(json.loads(row["roles"])),
        address=row["address"],
        ports={str(k): int(v) for k, v in json.loads(row["ports"]).items()},
        activation_disabled=bool(row["activation_disabled"]),
        auto_activation_policy=row["auto_activation_policy"],
    )


def _mailbox(row: Row) -> Mailbox:
    return Mailbox(
        address=row["address"],
        database=row["database"],
        password_hash=row["password_hash"],
        created=row["created"],
        password_changed=row["password_changed"],
        use_database_quota_defaults=bool(row["use_database_quota_defaults"]),
        prohibit_send_receive_quota=row["prohibit_send_receive_quota"],
    )


def open_engine(location: DirectoryLocation) -> Engine:
    if isinstance(location, SqliteLocation):
        return SqliteEngine(location.path)
    # psycopg is loaded only where a PostgreSQL directory is used.
    from popguard.directory.sql.postgres_engine import PostgresEngine

    assert isinstance(location, PostgresLocation)
    return PostgresEngine(location)
