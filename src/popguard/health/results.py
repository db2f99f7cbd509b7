"""What probes saw and where monitors stand, kept per server in one SQLite file.

Probe results are kept for a bounded time (7 days by default). Monitor states
(first alert time, ladder state) survive a restart of the health service, so an
alert resumes where it was instead of starting over.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from popguard import sqlite_util

RETENTION = 7 * 24 * 3600.0

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE probe_results (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        probe TEXT NOT NULL,               -- HealthSet\\ProbeName
        resource TEXT NOT NULL,            -- TargetResource
        started REAL NOT NULL,
        ended REAL NOT NULL,
        result_type TEXT NOT NULL,         -- Succeeded | Failed | TimedOut
        sample_value REAL,                 -- latency in ms, or the value read
        error TEXT NOT NULL,
        exception TEXT NOT NULL,
        execution_context TEXT NOT NULL,   -- the transcript, passwords redacted
        failure_context TEXT NOT NULL,
        failure_component TEXT NOT NULL,
        failure_reason TEXT NOT NULL
    );
    CREATE INDEX probe_results_by_probe ON probe_results(probe, resource, started);
    CREATE TABLE monitor_states (
        monitor TEXT NOT NULL,             -- HealthSet\\MonitorName
        resource TEXT NOT NULL,
        is_alert INTEGER NOT NULL,
        state TEXT NOT NULL,               -- Healthy | Degraded | Unhealthy | Unrecoverable
        first_alert REAL,
        last_transition REAL,
        last_execution REAL,
        last_result TEXT NOT NULL,
        error TEXT NOT NULL,
        PRIMARY KEY (monitor, resource)
    );
    """,
    """
    -- Every decision of a responder: what it did, or why it did not.
    CREATE TABLE recovery_actions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        responder TEXT NOT NULL,           -- HealthSet\\ResponderName
        monitor TEXT NOT NULL,
        resource TEXT NOT NULL,
        kind TEXT NOT NULL,
        alert_started REAL NOT NULL,       -- the monitor's FirstAlertObservedTime
        started REAL NOT NULL,
        ended REAL,
        result TEXT NOT NULL,              -- InProgress | Succeeded | Failed | Throttled | Skipped
        detail TEXT NOT NULL
    );
    CREATE INDEX recovery_actions_by_responder ON recovery_actions(responder, started);
    """,
    """
    -- Escalations: what a person is told when repairs did not help.
    CREATE TABLE alerts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        raised REAL NOT NULL,
        health_set TEXT NOT NULL,
        monitor TEXT NOT NULL,
        probe TEXT NOT NULL,
        resource TEXT NOT NULL,
        failure_component TEXT NOT NULL,
        error TEXT NOT NULL,
        detail TEXT NOT NULL               -- with every recovery action already taken
    );
    """,
    """
    -- Where each alert was sent (e-mail, webhook), when, and when its monitor recovered.
    ALTER TABLE alerts ADD COLUMN alert_started REAL;
    ALTER TABLE alerts ADD COLUMN notified REAL;
    ALTER TABLE alerts ADD COLUMN notification TEXT NOT NULL DEFAULT '';
    ALTER TABLE alerts ADD COLUMN resolved REAL;
    ALTER TABLE alerts ADD COLUMN attempted REAL;
    -- Databases a responder moved off this server, owed back once it is healthy;
    -- hold_until: a move back that failed its check waits before it is tried again.
    CREATE TABLE owed_databases (
        database TEXT PRIMARY KEY COLLATE NOCASE,
        moved_to TEXT NOT NULL,
        moved_at REAL NOT NULL,
        hold_until REAL NOT NULL DEFAULT 0
    );
    """,
    """
    -- An operator took an alert in hand (the web page): its repeats stop; the next
    -- alert of the same problem, after the monitor recovered, is a new one.
    ALTER TABLE alerts ADD COLUMN acknowledged REAL;
    ALTER TABLE alerts ADD COLUMN acknowledged_by TEXT NOT NULL DEFAULT '';
    ALTER TABLE alerts ADD COLUMN acknowledgement TEXT NOT NULL DEFAULT '';
    """,
    """
    -- Each change of a health set's AlertValue here, as it happened: a state that lasted
    -- less than anyone's look at the health report (an Unhealthy of two seconds before
    -- the restart mended it) is still in the history the web page's feed follows.
    CREATE TABLE health_set_changes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        health_set TEXT NOT NULL,
        was TEXT NOT NULL,
        now TEXT NOT NULL,
        at REAL NOT NULL
    );
    """,
)


@dataclass(frozen=True)
class ProbeResult:
    probe: str
    resource: str
    started: float
    ended: float
    result_type: str
    sample_value: float | None
    error: str = ""
    exception: str = ""
    execution_context: str = ""
    failure_context: str = ""
    failure_component: str = ""
    failure_reason: str = ""

    @property
    def succeeded(self) -> bool:
        return self.result_type == "Succeeded"


@dataclass(frozen=True)
class MonitorState:
    monitor: str
    resource: str
    is_alert: bool
    state: str
    first_alert: float | None
    last_transition: float | None
    last_execution: float | None
    last_result: str
    error: str


class ResultsStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite_util.connect(path, timeout=10.0, durable=False)
        self._db.row_factory = sqlite3.Row
        sqlite_util.migrate(self._db, MIGRATIONS, f"health results {path}")

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite_util.transaction(self._db)

    def add(self, result: ProbeResult) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO probe_results (probe, resource, started, ended, result_type, "
                "sample_value, error, exception, execution_context, failure_context, "
                "failure_component, failure_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    result.probe, result.resource, result.started, result.ended,
                    result.result_type, result.sample_value, result.error, result.exception,
                    result.execution_context, result.failure_context, result.failure_component,
                    result.failure_reason,
                ),
            )  # fmt: skip

    def recent(
        self, probe: str, resource: str, count: int, since: float = 0.0
    ) -> list[ProbeResult]:
        """The newest `count` results (newest first), none older than `since`."""
        rows = self._db.execute(
            "SELECT * FROM probe_results WHERE probe = ? AND resource = ? AND started >= ? "
            "ORDER BY started DESC, id DESC LIMIT ?",
            (probe, resource, since, count),
        ).fetchall()
        return [_result(row) for row in rows]

    def latest(self) -> list[ProbeResult]:
        """The newest result of each probe instance."""
        rows = self._db.execute(
            "SELECT * FROM probe_results WHERE id IN "
            "(SELECT MAX(id) FROM probe_results GROUP BY probe, resource)"
        ).fetchall()
        return [_result(row) for row in rows]

    def prune(self, before: float) -> int:
        """Results, and resolved alerts, older than `before`."""
        with self._transaction() as db:
            db.execute("DELETE FROM alerts WHERE resolved < ?", (before,))
            db.execute("DELETE FROM health_set_changes WHERE at < ?", (before,))
            return int(db.execute("DELETE FROM probe_results WHERE ended < ?", (before,)).rowcount)

    def monitor_states(self) -> dict[tuple[str, str], MonitorState]:
        rows = self._db.execute("SELECT * FROM monitor_states").fetchall()
        return {
            (r["monitor"], r["resource"]): MonitorState(
                r["monitor"], r["resource"], bool(r["is_alert"]), r["state"], r["first_alert"],
                r["last_transition"], r["last_execution"], r["last_result"], r["error"],
            )
            for r in rows
        }  # fmt: skip

    def save_monitor_state(self, state: MonitorState) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO monitor_states (monitor, resource, is_alert, state, "
                "first_alert, last_transition, last_execution, last_result, error) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    state.monitor, state.resource, int(state.is_alert), state.state,
                    state.first_alert, state.last_transition, state.last_execution,
                    state.last_result, state.error,
                ),
            )  # fmt: skip

    def add_health_set_change(self, change: HealthSetChange) -> int:
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO health_set_changes (health_set, was, now, at) VALUES (?, ?, ?, ?)",
                (change.health_set, change.was, change.now, change.at),
            )
            return int(cursor.lastrowid or 0)

    def health_set_changes(self, after: int = 0, limit: int = 1000) -> list[HealthSetChange]:
        """The oldest `limit` changes whose id is above `after`, oldest first."""
        rows = self._db.execute(
            "SELECT * FROM health_set_changes WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        ).fetchall()
        return [HealthSetChange(r["health_set"], r["was"], r["now"], r["at"], r["id"])
                for r in rows]  # fmt: skip

    def last_health_set_values(self) -> dict[str, str]:
        """Each health set's AlertValue as its newest recorded change left it."""
        rows = self._db.execute(
            "SELECT health_set, now FROM health_set_changes WHERE id IN "
            "(SELECT MAX(id) FROM health_set_changes GROUP BY health_set)"
        ).fetchall()
        return {str(r["health_set"]): str(r["now"]) for r in rows}

    def add_action(self, action: RecoveryAction) -> int:
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO recovery_actions (responder, monitor, resource, kind, alert_started, "
                "started, ended, result, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    action.responder, action.monitor, action.resource, action.kind,
                    action.alert_started, action.started, action.ended, action.result,
                    action.detail,
                ),
            )  # fmt: skip
            return int(cursor.lastrowid or 0)

    def finish_action(self, action_id: int, ended: float, result: str, detail: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE recovery_actions SET ended = ?, result = ?, detail = ? WHERE id = ?",
                (ended, result, detail, action_id),
            )

    def actions(self, since: float = 0.0, responder: str | None = None) -> list[RecoveryAction]:
        rows = self._db.execute(
            "SELECT * FROM recovery_actions WHERE started >= ? AND (?2 IS NULL OR responder = ?2) "
            "ORDER BY started, id",
            (since, responder),
        ).fetchall()
        return [
            RecoveryAction(
                r["responder"], r["monitor"], r["resource"], r["kind"], r["alert_started"],
                r["started"], r["ended"], r["result"], r["detail"], r["id"],
            )
            for r in rows
        ]  # fmt: skip

    def add_alert(self, alert: Alert) -> int:
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO alerts (raised, health_set, monitor, probe, resource, "
                "failure_component, error, detail, alert_started) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    alert.raised, alert.health_set, alert.monitor, alert.probe, alert.resource,
                    alert.failure_component, alert.error, alert.detail, alert.alert_started,
                ),
            )  # fmt: skip
            return int(cursor.lastrowid or 0)

    def alerts(self, open_only: bool = False) -> list[Alert]:
        rows = self._db.execute(
            "SELECT * FROM alerts WHERE NOT ? OR resolved IS NULL ORDER BY raised, id",
            (open_only,),
        ).fetchall()
        return [
            Alert(
                r["raised"], r["health_set"], r["monitor"], r["probe"], r["resource"],
                r["failure_component"], r["error"], r["detail"], r["alert_started"],
                r["notified"], r["notification"], r["resolved"], r["attempted"], r["id"],
                r["acknowledged"], r["acknowledged_by"], r["acknowledgement"],
            )
            for r in rows
        ]  # fmt: skip

    def mark_notified(
        self, alert_id: int, sent: float | None, notification: str, attempted: float | None = None
    ) -> None:
        """What a send did; `sent` when a firing message reached a channel."""
        with self._transaction() as db:
            db.execute(
                "UPDATE alerts SET notified = COALESCE(?, notified), notification = ?, "
                "attempted = COALESCE(?, attempted) WHERE id = ?",
                (sent, notification, attempted, alert_id),
            )

    def acknowledge(self, alert_id: int, at: float, by: str, reason: str) -> bool:
        """Whether an open alert of that id was there to acknowledge."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE alerts SET acknowledged = ?, acknowledged_by = ?, acknowledgement = ? "
                "WHERE id = ? AND resolved IS NULL",
                (at, by, reason, alert_id),
            )
            return cursor.rowcount == 1

    def owe(self, database: str, moved_to: str, at: float) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO owed_databases (database, moved_to, moved_at, hold_until) "
                "VALUES (?, ?, ?, 0)",
                (database, moved_to, at),
            )

    def owed(self) -> dict[str, float]:
        """Databases owed back to this server -> until when a new try waits."""
        rows = self._db.execute("SELECT database, hold_until FROM owed_databases").fetchall()
        return {str(r["database"]): float(r["hold_until"]) for r in rows}

    def hold(self, database: str, until: float) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE owed_databases SET hold_until = ? WHERE database = ?", (until, database)
            )

    def paid(self, database: str | None = None) -> None:
        """A database is back (or, without one, an operator took the matter over)."""
        with self._transaction() as db:
            db.execute("DELETE FROM owed_databases WHERE ?1 IS NULL OR database = ?1", (database,))

    def mark_resolved(self, alert_id: int, at: float) -> None:
        with self._transaction() as db:
            db.execute("UPDATE alerts SET resolved = ? WHERE id = ?", (at, alert_id))

    def forget_monitor_state(self, monitor: str, resource: str) -> None:
        with self._transaction() as db:
            db.execute(
                "DELETE FROM monitor_states WHERE monitor = ? AND resource = ?", (monitor, resource)
            )


@dataclass(frozen=True)
class Alert:
    raised: float
    health_set: str
    monitor: str
    probe: str
    resource: str
    failure_component: str
    error: str
    detail: str
    alert_started: float | None = None  # the monitor's first alert: which alert this is
    notified: float | None = None  # last sent by e-mail or webhook
    notification: str = ""  # what the sending did ("e-mail to ...: sent; webhook: 200")
    resolved: float | None = None  # when its monitor was Healthy again
    attempted: float | None = None  # last try to send it, delivered or not
    id: int = 0
    acknowledged: float | None = None  # an operator took it in hand: no more repeats
    acknowledged_by: str = ""
    acknowledgement: str = ""  # the operator's reason

    @property
    def key(self) -> tuple[str, str, str]:
        """One problem: Alertmanager's repeat_interval counts per key."""
        return (self.health_set, self.monitor, self.resource)


@dataclass(frozen=True)
class HealthSetChange:
    health_set: str
    was: str  # AlertValue before
    now: str  # AlertValue after
    at: float
    id: int = 0


@dataclass(frozen=True)
class RecoveryAction:
    responder: str
    monitor: str
    resource: str
    kind: str
    alert_started: float
    started: float
    ended: float | None
    result: str
    detail: str
    id: int = 0


def _result(row: sqlite3.Row) -> ProbeResult:
    return ProbeResult(
        probe=row["probe"],
        resource=row["resource"],
        started=row["started"],
        ended=row["ended"],
        result_type=row["result_type"],
        sample_value=row["sample_value"],
        error=row["error"],
        exception=row["exception"],
        execution_context=row["execution_context"],
        failure_context=row["failure_context"],
        failure_component=row["failure_component"],
        failure_reason=row["failure_reason"],
    )
