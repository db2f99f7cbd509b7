"""The directory: servers, mailbox databases and their copies, mailboxes, settings.

Exchange keeps these in Active Directory; popguard keeps them in one SQLite file
in the data folder that every process opens. The schema is versioned with
`PRAGMA user_version`; `MIGRATIONS[i]` takes a directory from version i to i+1.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sqlite3
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from popguard import paths, sqlite_util
from popguard.directory.settings import PopSettings
from popguard.errors import NotFoundError, UserError

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE servers (
        name TEXT PRIMARY KEY COLLATE NOCASE,
        roles TEXT NOT NULL,              -- JSON list: "mailbox", "frontend"
        address TEXT NOT NULL,
        ports TEXT NOT NULL               -- JSON map: endpoint -> TCP port
    );
    CREATE TABLE databases (
        name TEXT PRIMARY KEY COLLATE NOCASE,
        created REAL NOT NULL
    );
    CREATE TABLE database_copies (
        database TEXT NOT NULL REFERENCES databases(name) ON DELETE CASCADE,
        server TEXT NOT NULL REFERENCES servers(name),
        activation_preference INTEGER NOT NULL,
        is_active INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (database, server)
    );
    -- Exactly one mounted copy per database: the index makes a second one impossible.
    CREATE UNIQUE INDEX one_active_copy ON database_copies(database) WHERE is_active = 1;
    CREATE TABLE mailboxes (
        address TEXT PRIMARY KEY COLLATE NOCASE,
        database TEXT NOT NULL REFERENCES databases(name),
        password_hash TEXT NOT NULL,
        created REAL NOT NULL,
        password_changed REAL NOT NULL
    );
    CREATE TABLE pop_settings (
        server TEXT PRIMARY KEY REFERENCES servers(name) ON DELETE CASCADE,
        settings TEXT NOT NULL,           -- JSON of PopSettings, only non-defaults
        revision INTEGER NOT NULL
    );
    """,
    """
    -- Server component states (Exchange's Set-ServerComponentState): one row per
    -- requester; a component is Inactive when any requester says so.
    CREATE TABLE component_states (
        server TEXT NOT NULL REFERENCES servers(name) ON DELETE CASCADE,
        component TEXT NOT NULL,
        requester TEXT NOT NULL,
        state TEXT NOT NULL,
        updated REAL NOT NULL,
        PRIMARY KEY (server, component, requester)
    );
    """,
    """
    -- Replication (continuous copies, switchover, failover).
    UPDATE servers SET ports = json_set(ports, '$.replication', 64327)
        WHERE roles LIKE '%"mailbox"%';
    -- Set-MailboxServer's DatabaseCopyActivationDisabledAndMoveNow and
    -- DatabaseCopyAutoActivationPolicy.
    ALTER TABLE servers ADD COLUMN activation_disabled INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE servers ADD COLUMN auto_activation_policy TEXT NOT NULL DEFAULT 'Unrestricted';
    -- A move in progress: who claimed it and when. Two moves of one database at
    -- once cannot both claim it; a claim older than MOVE_CLAIM_TIMEOUT is stale.
    ALTER TABLE databases ADD COLUMN move_claim TEXT;
    ALTER TABLE databases ADD COLUMN move_claimed REAL;
    -- What each copy's replication service last reported about it.
    CREATE TABLE copy_status (
        database TEXT NOT NULL,
        server TEXT NOT NULL,
        status TEXT NOT NULL,
        copy_queue_length INTEGER NOT NULL,
        replay_queue_length INTEGER NOT NULL,
        applied_lsn INTEGER NOT NULL,
        last_inspected_log_time REAL,
        error TEXT,
        reported REAL NOT NULL,
        PRIMARY KEY (database, server),
        FOREIGN KEY (database, server) REFERENCES database_copies(database, server)
            ON DELETE CASCADE
    );
    """,
    """
    -- The health service's HTTP API, on every server.
    UPDATE servers SET ports = json_set(ports, '$.health', 8480);
    """,
    """
    -- Monitoring overrides (Add-ServerMonitoringOverride, Add-GlobalMonitoringOverride):
    -- server is NULL for a global one. They expire on their own.
    CREATE TABLE monitoring_overrides (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        server TEXT REFERENCES servers(name) ON DELETE CASCADE,
        identity TEXT NOT NULL COLLATE NOCASE,   -- HealthSet\\Item
        item_type TEXT NOT NULL,                 -- Probe | Monitor
        property_name TEXT NOT NULL,
        property_value TEXT NOT NULL,
        created REAL NOT NULL,
        expires REAL NOT NULL
    );
    -- Set-ServerMonitor -Repairing: an operator says a monitor is being worked on.
    CREATE TABLE monitor_repairing (
        server TEXT NOT NULL REFERENCES servers(name) ON DELETE CASCADE,
        identity TEXT NOT NULL COLLATE NOCASE,
        since REAL NOT NULL,
        PRIMARY KEY (server, identity)
    );
    """,
    """
    -- Repairs the health engines made, shared by every server so that a group throttle
    -- (at most N a day across the servers of a role; enough others in service) holds.
    CREATE TABLE repairs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        server TEXT NOT NULL REFERENCES servers(name) ON DELETE CASCADE,
        role TEXT NOT NULL,
        kind TEXT NOT NULL,
        service TEXT NOT NULL,
        started REAL NOT NULL
    );
    CREATE INDEX repairs_by_role ON repairs(role, started);
    """,
    """
    -- One random name per organization, made with its directory: what popguard's own
    -- clients check, where no certificate can (LMTP), so that they never hand mail to
    -- another organization that listens on the same address.
    CREATE TABLE organization (
        id TEXT NOT NULL
    );
    INSERT INTO organization (id) VALUES (lower(hex(randomblob(8))));
    """,
    """
    -- Mail in follows the active copy: a mailbox server hands mail for a database active
    -- elsewhere to that server's delivery on this port (LMTP over mutual TLS).
    UPDATE servers SET ports = json_set(ports, '$."lmtp-peer"', 2425)
        WHERE roles LIKE '%"mailbox"%';
    """,
)

# Longer than the longest move can take (catch-up at most 120 s, plus dismount and mount).
MOVE_CLAIM_TIMEOUT = 300.0
ACTIVATION_POLICIES = ("Unrestricted", "Blocked")

COMPONENTS = ("PopProxy",)
COMPONENT_STATES = ("Active", "Inactive", "Draining")
# Exchange's requesters; a state is kept per requester so that, say, the health
# engine bringing a component back does not undo an operator's maintenance.
REQUESTERS = ("HealthApi", "Maintenance", "Sidelined", "Functional", "Deployment")

SCHEMA_VERSION = len(MIGRATIONS)

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
    "frontend": {"pop3": 10110, "pop3-tls": 10995, "health": 8480},
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


@dataclass(frozen=True)
class Mailbox:
    address: str
    database: str
    password_hash: str
    created: float
    password_changed: float


def normalize_address(address: str) -> str:
    address = address.strip().lower()
    if not _ADDRESS.match(address):
        raise UserError(f"not a valid mailbox address: {address!r}")
    return address


class Directory:
    """One connection to the directory; cheap to open, safe across processes."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.path = paths.directory_file(data)
        data.mkdir(parents=True, exist_ok=True)
        self._db = sqlite_util.connect(self.path, timeout=10.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def organization_id(self) -> str:
        """The organization's random name, the same for every server of it."""
        row = self._db.execute("SELECT id FROM organization").fetchone()
        return str(row[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite_util.transaction(self._db)

    def _migrate(self) -> None:
        sqlite_util.migrate(self._db, MIGRATIONS, f"directory {self.path}")

    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def change_counter(self) -> int:
        """Changes whenever any process commits to the directory (cheap to poll)."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

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
            if db.execute("SELECT 1 FROM servers WHERE name = ?", (name,)).fetchone():
                raise UserError(f"server {name} already exists")
            db.execute(
                "INSERT INTO servers (name, roles, address, ports) VALUES (?, ?, ?, ?)",
                (name, json.dumps(sorted(set(roles))), address, json.dumps(merged)),
            )
        return self.get_server(name)

    def get_server(self, name: str) -> Server:
        row = self._db.execute("SELECT * FROM servers WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no server named {name!r}")
        return _server(row)

    def list_servers(self) -> list[Server]:
        rows = self._db.execute("SELECT * FROM servers ORDER BY name").fetchall()
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
            if db.execute("SELECT 1 FROM databases WHERE name = ?", (name,)).fetchone():
                raise UserError(f"database {name} already exists")
            db.execute("INSERT INTO databases (name, created) VALUES (?, ?)", (name, time.time()))
            db.execute(
                "INSERT INTO database_copies (database, server, activation_preference, "
                "is_active) VALUES (?, ?, 1, 1)",
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
                "SELECT 1 FROM database_copies WHERE database = ? AND server = ?",
                (database, host.name),
            ).fetchone():
                raise UserError(f"database {database} already has a copy on {host.name}")
            db.execute(
                "INSERT INTO database_copies (database, server, activation_preference, "
                "is_active) VALUES (?, ?, ?, 0)",
                (database, host.name, activation_preference),
            )

    def remove_database_copy(self, database: str, server: str) -> None:
        """Forget a passive copy; the active one cannot be removed (move it first)."""
        database = self._require_database(database)
        with self._transaction() as db:
            row = db.execute(
                "SELECT is_active FROM database_copies WHERE database = ? AND server = ?",
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
                "DELETE FROM database_copies WHERE database = ? AND server = ?", (database, server)
            )

    # Moves: claimed, then finished or released, so two at once cannot both win.

    def claim_move(self, database: str, claimant: str) -> None:
        database = self._require_database(database)
        now = time.time()
        with self._transaction() as db:
            claimed = db.execute(
                "UPDATE databases SET move_claim = ?, move_claimed = ? WHERE name = ? "
                "AND (move_claim IS NULL OR move_claimed < ?)",
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
    ) -> None:
        """Activate the copy on `server`, record the copies' new statuses and end the
        move, in one transaction; only if the move is still ours and `source` still
        the active copy."""
        with self._transaction() as db:
            row = db.execute("SELECT move_claim FROM databases WHERE name = ?", (database,))
            if row.fetchone()[0] != claimant:
                raise UserError(f"the move of {database} was taken over by another command")
            active = db.execute(
                "SELECT server FROM database_copies WHERE database = ? AND is_active = 1",
                (database,),
            ).fetchone()
            if active is None or active[0].lower() != source.lower():
                raise UserError(f"{database} is no longer active on {source}; move not applied")
            self._activate(db, database, server)
            for report in reports:
                self._write_copy_status(db, report)
            db.execute("UPDATE databases SET move_claim = NULL WHERE name = ?", (database,))

    def release_move(self, database: str, claimant: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE databases SET move_claim = NULL WHERE name = ? AND move_claim = ?",
                (database, claimant),
            )

    def move_in_progress(self, database: str) -> bool:
        row = self._db.execute(
            "SELECT move_claim, move_claimed FROM databases WHERE name = ?", (database,)
        ).fetchone()
        return bool(row and row[0] and row[1] >= time.time() - MOVE_CLAIM_TIMEOUT)

    def activate_copy(self, database: str, server: str) -> None:
        """Make the copy on `server` the active one, in one transaction."""
        database = self._require_database(database)
        with self._transaction() as db:
            self._activate(db, database, server)

    @staticmethod
    def _activate(db: sqlite3.Connection, database: str, server: str) -> None:
        target = db.execute(
            "SELECT 1 FROM database_copies WHERE database = ? AND server = ?",
            (database, server),
        ).fetchone()
        if target is None:
            raise UserError(f"database {database} has no copy on {server}")
        db.execute("UPDATE database_copies SET is_active = 0 WHERE database = ?", (database,))
        db.execute(
            "UPDATE database_copies SET is_active = 1 WHERE database = ? AND server = ?",
            (database, server),
        )

    def list_databases(self) -> list[str]:
        rows = self._db.execute("SELECT name FROM databases ORDER BY name").fetchall()
        return [row["name"] for row in rows]

    def database_copies(self, database: str | None = None) -> list[DatabaseCopy]:
        if database is not None:
            self._require_database(database)
        rows = self._db.execute(
            "SELECT * FROM database_copies WHERE ?1 IS NULL OR database = ?1 "
            "ORDER BY database, activation_preference",
            (database,),
        ).fetchall()
        return [
            DatabaseCopy(
                r["database"], r["server"], r["activation_preference"], bool(r["is_active"])
            )
            for r in rows
        ]

    def active_server(self, database: str) -> str:
        row = self._db.execute(
            "SELECT server FROM database_copies WHERE database = ? AND is_active = 1", (database,)
        ).fetchone()
        if row is None:
            self._require_database(database)
            raise UserError(f"database {database} has no active copy")
        return str(row["server"])

    def _require_database(self, name: str) -> str:
        row = self._db.execute("SELECT name FROM databases WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = ", ".join(self.list_databases()) or "none"
            raise NotFoundError(f"no database named {name!r} (databases: {known})")
        return str(row["name"])

    # Copy status, as each server's replication service reports it -------------------------

    def report_copy_status(self, report: CopyStatusReport) -> None:
        with self._transaction() as db:
            self._write_copy_status(db, report)

    @staticmethod
    def _write_copy_status(db: sqlite3.Connection, report: CopyStatusReport) -> None:
        exists = db.execute(
            "SELECT 1 FROM database_copies WHERE database = ? AND server = ?",
            (report.database, report.server),
        ).fetchone()
        if exists is None:  # the copy was removed meanwhile
            return
        db.execute(
            "INSERT OR REPLACE INTO copy_status (database, server, status, "
            "copy_queue_length, replay_queue_length, applied_lsn, last_inspected_log_time, "
            "error, reported) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                report.database, report.server, report.status, report.copy_queue_length,
                report.replay_queue_length, report.applied_lsn,
                report.last_inspected_log_time, report.error, report.reported,
            ),
        )  # fmt: skip

    def copy_status_reports(self) -> dict[tuple[str, str], CopyStatusReport]:
        rows = self._db.execute("SELECT * FROM copy_status").fetchall()
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
                reported=r["reported"],
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
                    "UPDATE servers SET activation_disabled = ? WHERE name = ?",
                    (int(activation_disabled), host.name),
                )
            if auto_activation_policy is not None:
                policy = _choice(auto_activation_policy, ACTIVATION_POLICIES, "policy")
                db.execute(
                    "UPDATE servers SET auto_activation_policy = ? WHERE name = ?",
                    (policy, host.name),
                )
        return self.get_server(host.name)

    # Monitoring overrides and repairing flags ---------------------------------------------

    def add_monitoring_override(self, override: MonitoringOverride) -> int:
        if override.server is not None:
            self.get_server(override.server)
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO monitoring_overrides (server, identity, item_type, property_name, "
                "property_value, created, expires) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    override.server, override.identity, override.item_type,
                    override.property_name, override.property_value, override.created,
                    override.expires,
                ),
            )  # fmt: skip
            return int(cursor.lastrowid or 0)

    def monitoring_overrides(self, server: str | None, now: float) -> list[MonitoringOverride]:
        """Unexpired overrides for `server` (its own and the global ones), or all with None."""
        rows = self._db.execute(
            "SELECT * FROM monitoring_overrides WHERE expires > ? AND "
            "(?2 IS NULL OR server IS NULL OR server = ?2 COLLATE NOCASE) ORDER BY id",
            (now, server),
        ).fetchall()
        return [
            MonitoringOverride(
                r["server"], r["identity"], r["item_type"], r["property_name"],
                r["property_value"], r["created"], r["expires"], r["id"],
            )
            for r in rows
        ]  # fmt: skip

    def remove_monitoring_override(
        self, server: str | None, identity: str, item_type: str, property_name: str
    ) -> int:
        with self._transaction() as db:
            return int(
                db.execute(
                    "DELETE FROM monitoring_overrides WHERE identity = ? AND item_type = ? "
                    "AND property_name = ? COLLATE NOCASE AND "
                    "((?4 IS NULL AND server IS NULL) OR server = ?4 COLLATE NOCASE)",
                    (identity, item_type, property_name, server),
                ).rowcount
            )

    def set_monitor_repairing(self, server: str, identity: str, repairing: bool) -> None:
        name = self.get_server(server).name
        with self._transaction() as db:
            if repairing:
                db.execute(
                    "INSERT OR REPLACE INTO monitor_repairing (server, identity, since) "
                    "VALUES (?, ?, ?)",
                    (name, identity, time.time()),
                )
            else:
                db.execute(
                    "DELETE FROM monitor_repairing WHERE server = ? AND identity = ?",
                    (name, identity),
                )

    def monitors_repairing(self, server: str) -> set[str]:
        rows = self._db.execute(
            "SELECT identity FROM monitor_repairing WHERE server = ? COLLATE NOCASE", (server,)
        ).fetchall()
        return {str(r["identity"]).lower() for r in rows}

    # Repairs (group throttles) ------------------------------------------------------------

    def record_repair(self, server: str, role: str, kind: str, service: str, at: float) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO repairs (server, role, kind, service, started) VALUES (?, ?, ?, ?, ?)",
                (self.get_server(server).name, role, kind, service, at),
            )

    def prune_repairs(self, server: str, before: float) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM repairs WHERE server = ? AND started < ?", (server, before))

    def repairs_since(self, role: str, since: float) -> list[tuple[str, str, str, float]]:
        """(server, kind, service, started) of the repairs on servers of `role`, oldest first."""
        rows = self._db.execute(
            "SELECT server, kind, service, started FROM repairs WHERE role = ? AND started >= ? "
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
            if db.execute("SELECT 1 FROM mailboxes WHERE address = ?", (address,)).fetchone():
                raise UserError(f"mailbox {address} already exists")
            db.execute(
                "INSERT INTO mailboxes (address, database, password_hash, created, "
                "password_changed) VALUES (?, ?, ?, ?, ?)",
                (address, database, password_hash, now, now),
            )
        return self.get_mailbox(address)

    def find_mailbox(self, address: str) -> Mailbox | None:
        row = self._db.execute(
            "SELECT * FROM mailboxes WHERE address = ?", (address.strip().lower(),)
        ).fetchone()
        return None if row is None else _mailbox(row)

    def get_mailbox(self, address: str) -> Mailbox:
        mailbox = self.find_mailbox(address)
        if mailbox is None:
            raise NotFoundError(f"no mailbox {address!r}")
        return mailbox

    def list_mailboxes(self, database: str | None = None) -> list[Mailbox]:
        rows = self._db.execute(
            "SELECT * FROM mailboxes WHERE ?1 IS NULL OR database = ?1 ORDER BY address",
            (database,),
        ).fetchall()
        return [_mailbox(row) for row in rows]

    def set_password_hash(self, address: str, password_hash: str) -> None:
        with self._transaction() as db:
            updated = db.execute(
                "UPDATE mailboxes SET password_hash = ?, password_changed = ? WHERE address = ?",
                (password_hash, time.time(), address.strip().lower()),
            ).rowcount
        if not updated:
            raise NotFoundError(f"no mailbox {address!r}")

    def remove_mailbox(self, address: str) -> Mailbox:
        mailbox = self.get_mailbox(address)
        with self._transaction() as db:
            db.execute("DELETE FROM mailboxes WHERE address = ?", (mailbox.address,))
        return mailbox

    # Server component states ------------------------------------------------------------

    def set_component_state(self, server: str, component: str, state: str, requester: str) -> None:
        name = self.get_server(server).name
        component = _choice(component, COMPONENTS, "component")
        state = _choice(state, COMPONENT_STATES, "state")
        requester = _choice(requester, REQUESTERS, "requester")
        with self._transaction() as db:
            db.execute(
                "INSERT INTO component_states (server, component, requester, state, updated) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(server, component, requester) "
                "DO UPDATE SET state = excluded.state, updated = excluded.updated",
                (name, component, requester, state, time.time()),
            )

    def component_states(self, server: str) -> list[ComponentState]:
        name = self.get_server(server).name
        rows = self._db.execute(
            "SELECT component, requester, state FROM component_states WHERE server = ?", (name,)
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
        row = self._db.execute(
            "SELECT settings, revision FROM pop_settings WHERE server = ?", (name,)
        ).fetchone()
        if row is None:
            return PopSettings(), 0
        return PopSettings.model_validate_json(row["settings"]), int(row["revision"])

    def set_pop_settings(self, server: str, settings: PopSettings) -> int:
        name = self.get_server(server).name
        stored = settings.model_dump_json(exclude_defaults=True)
        with self._transaction() as db:
            row = db.execute(
                "SELECT revision FROM pop_settings WHERE server = ?", (name,)
            ).fetchone()
            revision = (row["revision"] if row else 0) + 1
            db.execute(
                "INSERT INTO pop_settings (server, settings, revision) VALUES (?, ?, ?) "
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


def _server(row: sqlite3.Row) -> Server:
    return Server(
        name=row["name"],
        roles=tuple(json.loads(row["roles"])),
        address=row["address"],
        ports={str(k): int(v) for k, v in json.loads(row["ports"]).items()},
        activation_disabled=bool(row["activation_disabled"]),
        auto_activation_policy=row["auto_activation_policy"],
    )


def _mailbox(row: sqlite3.Row) -> Mailbox:
    return Mailbox(
        address=row["address"],
        database=row["database"],
        password_hash=row["password_hash"],
        created=row["created"],
        password_changed=row["password_changed"],
    )
