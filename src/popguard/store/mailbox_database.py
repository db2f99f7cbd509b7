"""The mailbox database: one SQLite file per database copy.

Each message gets a per-mailbox UID from a counter that is never reset, so a
UIDL stays the same for the life of the message. Every change also appends to
the change log, in the same transaction, which is what replication ships; a
passive copy applies the same entries with the same LSNs and checksums, so every
copy holds the same messages under the same UIDs.

A copy knows its own role. Only an `active` (mounted) copy takes deliveries and
deletions, and the role is checked inside the writing transaction: once a
switchover has fenced the copy (made it `passive`), no write that was already on
its way can land in it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popguard import sqlite_util
from popguard.pop3.message_format import to_wire
from popguard.store.change_log import GENESIS, LogEntry, entry_checksum

ACTIVE, PASSIVE = "active", "passive"


def _add_checksums(db: sqlite3.Connection) -> None:
    """Version 1 -> 2: a checksum chain over the change log, made for old entries too."""
    db.execute("ALTER TABLE change_log ADD COLUMN checksum BLOB")
    previous = GENESIS
    rows = db.execute(
        "SELECT lsn, at, kind, address, uid, size, payload FROM change_log ORDER BY lsn"
    ).fetchall()
    for lsn, at, kind, address, uid, size, payload in rows:
        payload = None if payload is None else bytes(payload)
        previous = entry_checksum(previous, lsn, at, kind, address, uid, size, payload)
        db.execute("UPDATE change_log SET checksum = ? WHERE lsn = ?", (previous, lsn))


MIGRATIONS: tuple[str | Callable[[sqlite3.Connection], None], ...] = (
    """
    CREATE TABLE IF NOT EXISTS mailboxes (
        address TEXT PRIMARY KEY,
        -- Rows are never deleted, so a UID is never handed out twice, even to a
        -- mailbox removed and made again under the same address.
        next_uid INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS messages (
        address TEXT NOT NULL,
        uid INTEGER NOT NULL,
        size INTEGER NOT NULL,
        received REAL NOT NULL,
        wire BLOB NOT NULL,       -- CRLF, dot-stuffed: ready for RETR
        PRIMARY KEY (address, uid)
    );
    CREATE TABLE IF NOT EXISTS change_log (
        lsn INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        kind TEXT NOT NULL,       -- deliver | expunge | purge
        address TEXT NOT NULL,
        uid INTEGER,
        size INTEGER,
        payload BLOB              -- deliver: the wire form; expunge: JSON list of UIDs
    );
    """,
    _add_checksums,
    """
    -- One row: this copy's role. A file made before roles existed was an active copy.
    CREATE TABLE copy_state (
        only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
        role TEXT NOT NULL CHECK (role IN ('active', 'passive'))
    );
    INSERT INTO copy_state (only_row, role) VALUES (1, 'active');
    -- Messages given back to this copy after a failover, by their origin's key, so
    -- that giving one back twice stores it once.
    CREATE TABLE redelivered (
        key TEXT PRIMARY KEY,
        uid INTEGER NOT NULL
    );
    """,
)


class NotMountedError(Exception):
    """The database is not mounted here: its active copy is elsewhere, or moving."""


class LogIntegrityError(Exception):
    """Log entries that do not follow this copy's log: a gap, a fork or a corruption."""


@dataclass(frozen=True)
class MessageInfo:
    uid: int
    size: int
    received: float


@dataclass(frozen=True)
class LogHead:
    lsn: int
    checksum: bytes


class MailboxDatabase:
    """One copy of one mailbox database, opened by one process."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        path.parent.mkdir(parents=True, exist_ok=True)
        # FULL sync (in connect): a message is on disk, not only in the OS cache,
        # before delivery says 250.
        self._db = sqlite_util.connect(path, timeout=30.0, check_same_thread=False)
        sqlite_util.migrate(self._db, MIGRATIONS, f"mailbox database copy {path}")

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite_util.transaction(self._db)

    # The role ---------------------------------------------------------------------

    def role(self) -> str:
        return str(self._db.execute("SELECT role FROM copy_state").fetchone()[0])

    def _require_active(self, db: sqlite3.Connection) -> None:
        if db.execute("SELECT role FROM copy_state").fetchone()[0] != ACTIVE:
            raise NotMountedError(f"the copy of {self.name} at {self.path} is not mounted")

    def fence(self) -> LogHead:
        """Make this copy passive; the log head at that moment (nothing follows it)."""
        with self._transaction() as db:
            db.execute("UPDATE copy_state SET role = 'passive'")
            return self._head(db)

    def mount(self, expected: LogHead | None) -> LogHead:
        """Make this copy active, if its log ends where the old active copy's did.

        With `expected` None (a failover: the old copy could not be asked) the copy
        is mounted with whatever it has.
        """
        with self._transaction() as db:
            head = self._head(db)
            if expected is not None and head != expected:
                raise LogIntegrityError(
                    f"copy of {self.name} is at LSN {head.lsn}, not at the active copy's "
                    f"last LSN {expected.lsn} with the same checksum"
                )
            db.execute("UPDATE copy_state SET role = 'active'")
            return head

    # Writes of an active copy -------------------------------------------------------

    def deliver(self, address: str, content: bytes, received: float | None = None) -> int:
        """Store a message durably; returns its UID."""
        wire, size = to_wire(content)
        received = time.time() if received is None else received
        with self._transaction() as db:
            self._require_active(db)
            return self._store(db, address, wire, size, received)

    def _store(
        self, db: sqlite3.Connection, address: str, wire: bytes, size: int, received: float
    ) -> int:
        row = db.execute("SELECT next_uid FROM mailboxes WHERE address = ?", (address,)).fetchone()
        uid = 1 if row is None else int(row[0])
        db.execute(
            "INSERT INTO mailboxes (address, next_uid) VALUES (?, ?) "
            "ON CONFLICT(address) DO UPDATE SET next_uid = excluded.next_uid",
            (address, uid + 1),
        )
        db.execute(
            "INSERT INTO messages (address, uid, size, received, wire) VALUES (?, ?, ?, ?, ?)",
            (address, uid, size, received, wire),
        )
        self._append(db, received, "deliver", address, uid, size, wire)
        return uid

    def redeliver(self, key: str, address: str, wire: bytes, size: int, received: float) -> int:
        """Store a message given back after a failover, once per `key`; its UID here."""
        with self._transaction() as db:
            self._require_active(db)
            row = db.execute("SELECT uid FROM redelivered WHERE key = ?", (key,)).fetchone()
            if row is not None:
                return int(row[0])
            uid = self._store(db, address, wire, size, received)
            db.execute("INSERT INTO redelivered (key, uid) VALUES (?, ?)", (key, uid))
            return uid

    def expunge(self, address: str, uids: list[int]) -> int:
        """Delete messages in one transaction: all of them or, after a crash, none."""
        if not uids:
            return 0
        with self._transaction() as db:
            self._require_active(db)
            removed = db.executemany(
                "DELETE FROM messages WHERE address = ? AND uid = ?",
                [(address, uid) for uid in uids],
            ).rowcount
            payload = json.dumps(sorted(uids)).encode()
            self._append(db, time.time(), "expunge", address, None, None, payload)
        return int(removed)

    def purge(self, address: str) -> int:
        """Remove every message of a mailbox (the mailbox itself was removed)."""
        with self._transaction() as db:
            self._require_active(db)
            removed = db.execute("DELETE FROM messages WHERE address = ?", (address,)).rowcount
            self._append(db, time.time(), "purge", address, None, None, None)
        return int(removed)

    def _append(
        self,
        db: sqlite3.Connection,
        at: float,
        kind: str,
        address: str,
        uid: int | None,
        size: int | None,
        payload: bytes | None,
    ) -> None:
        head = self._head(db)
        lsn = head.lsn + 1
        checksum = entry_checksum(head.checksum, lsn, at, kind, address, uid, size, payload)
        db.execute(
            "INSERT INTO change_log (lsn, at, kind, address, uid, size, payload, checksum) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (lsn, at, kind, address, uid, size, payload, checksum),
        )

    # Reads --------------------------------------------------------------------------

    def maildrop(self, address: str) -> list[MessageInfo]:
        rows = self._db.execute(
            "SELECT uid, size, received FROM messages WHERE address = ? ORDER BY uid", (address,)
        ).fetchall()
        return [MessageInfo(uid, size, received) for uid, size, received in rows]

    def wire(self, address: str, uid: int) -> bytes | None:
        row = self._db.execute(
            "SELECT wire FROM messages WHERE address = ? AND uid = ?", (address, uid)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def message_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    # The change log -------------------------------------------------------------------

    def last_lsn(self) -> int:
        return self.head().lsn

    def head(self) -> LogHead:
        return self._head(self._db)

    @staticmethod
    def _head(db: sqlite3.Connection) -> LogHead:
        row = db.execute(
            "SELECT lsn, checksum FROM change_log ORDER BY lsn DESC LIMIT 1"
        ).fetchone()
        return LogHead(0, GENESIS) if row is None else LogHead(int(row[0]), bytes(row[1]))

    def checksum_at(self, lsn: int) -> bytes | None:
        if lsn == 0:
            return GENESIS
        row = self._db.execute("SELECT checksum FROM change_log WHERE lsn = ?", (lsn,)).fetchone()
        return None if row is None else bytes(row[0])

    def entries_after(self, lsn: int, max_bytes: int, max_entries: int = 10_000) -> list[LogEntry]:
        """Entries after `lsn` in order: at least one, then up to `max_bytes` of payload."""
        entries: list[LogEntry] = []
        total = 0
        cursor = self._db.execute(
            "SELECT lsn, at, kind, address, uid, size, payload, checksum FROM change_log "
            "WHERE lsn > ? ORDER BY lsn LIMIT ?",
            (lsn, max_entries),
        )
        for row in cursor:
            entry = _entry(row)
            total += len(entry.payload or b"")
            if entries and total > max_bytes:
                break
            entries.append(entry)
        return entries

    def apply(self, entries: Sequence[LogEntry]) -> LogHead:
        """Replay entries shipped from the active copy, all in one transaction.

        Each must follow the last (LSN + 1) and carry the checksum the chain gives,
        or nothing is applied and LogIntegrityError says which one did not.
        """
        with self._transaction() as db:
            if db.execute("SELECT role FROM copy_state").fetchone()[0] == ACTIVE:
                raise NotMountedError(f"the copy of {self.name} is mounted: it takes no replay")
            head = self._head(db)
            for entry in entries:
                if entry.lsn != head.lsn + 1:
                    raise LogIntegrityError(
                        f"log gap: entry {entry.lsn} does not follow this copy's LSN {head.lsn}"
                    )
                if entry.chained_checksum(head.checksum) != entry.checksum:
                    raise LogIntegrityError(
                        f"entry {entry.lsn} fails its checksum: corrupt, or from another log"
                    )
                self._replay(db, entry)
                db.execute(
                    "INSERT INTO change_log (lsn, at, kind, address, uid, size, payload, "
                    "checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        entry.lsn, entry.at, entry.kind, entry.address, entry.uid, entry.size,
                        entry.payload, entry.checksum,
                    ),
                )  # fmt: skip
                head = LogHead(entry.lsn, entry.checksum)
            return head

    @staticmethod
    def _replay(db: sqlite3.Connection, entry: LogEntry) -> None:
        if entry.kind == "deliver":
            if entry.uid is None or entry.size is None or entry.payload is None:
                raise LogIntegrityError(f"deliver entry {entry.lsn} lacks its uid, size or message")
            db.execute(
                "INSERT INTO mailboxes (address, next_uid) VALUES (?, ?) ON CONFLICT(address) "
                "DO UPDATE SET next_uid = MAX(next_uid, excluded.next_uid)",
                (entry.address, entry.uid + 1),
            )
            db.execute(
                "INSERT INTO messages (address, uid, size, received, wire) VALUES (?, ?, ?, ?, ?)",
                (entry.address, entry.uid, entry.size, entry.at, entry.payload),
            )
        elif entry.kind == "expunge":
            try:
                uids = json.loads(entry.payload or b"")
            except ValueError:
                uids = None
            if not isinstance(uids, list) or not all(isinstance(u, int) for u in uids):
                raise LogIntegrityError(f"expunge entry {entry.lsn} has no list of UIDs")
            db.executemany(
                "DELETE FROM messages WHERE address = ? AND uid = ?",
                [(entry.address, uid) for uid in uids],
            )
        else:
            db.execute("DELETE FROM messages WHERE address = ?", (entry.address,))

    def delivered_after(self, lsn: int) -> list[LogEntry]:
        """Deliveries logged after `lsn` whose message is still here (not deleted since)."""
        rows = self._db.execute(
            "SELECT c.lsn, c.at, c.kind, c.address, c.uid, c.size, c.payload, c.checksum "
            "FROM change_log c JOIN messages m ON m.address = c.address AND m.uid = c.uid "
            "WHERE c.kind = 'deliver' AND c.lsn > ? ORDER BY c.lsn",
            (lsn,),
        ).fetchall()
        return [_entry(row) for row in rows]

    # Seeding ------------------------------------------------------------------------

    def reset(self) -> None:
        """Empty this passive copy, to be seeded again from LSN 1 of the active copy's log.

        The rows go, the file stays: other processes' connections to it stay valid.
        """
        with self._transaction() as db:
            if db.execute("SELECT role FROM copy_state").fetchone()[0] == ACTIVE:
                raise NotMountedError(f"refusing to empty the mounted copy of {self.name}")
            for table in ("mailboxes", "messages", "change_log", "redelivered"):
                db.execute(f"DELETE FROM {table}")
            db.execute("DELETE FROM sqlite_sequence WHERE name = 'change_log'")


def _entry(row: Any) -> LogEntry:
    lsn, at, kind, address, uid, size, payload, checksum = row
    return LogEntry(
        lsn=lsn,
        at=at,
        kind=kind,
        address=address,
        uid=uid,
        size=size,
        payload=None if payload is None else bytes(payload),
        checksum=bytes(checksum),
    )
