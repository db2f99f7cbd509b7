"""The mailbox database: one SQLite file per database copy.

Each message gets a per-mailbox UID from a counter that is never reset, so a
UIDL stays the same for the life of the message. Every change also appends to
the change log, in the same transaction, which is what replication ships.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from . import sqlite_util
from .message_format import to_wire

SCHEMA = """
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
"""


@dataclass(frozen=True)
class MessageInfo:
    uid: int
    size: int
    received: float


class MailboxDatabase:
    """One copy of one mailbox database, opened by one process."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        path.parent.mkdir(parents=True, exist_ok=True)
        # FULL sync (in connect): a message is on disk, not only in the OS cache,
        # before delivery says 250.
        self._db = sqlite_util.connect(path, timeout=30.0, check_same_thread=False)
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite_util.transaction(self._db)

    def deliver(self, address: str, content: bytes, received: float | None = None) -> int:
        """Store a message durably; returns its UID."""
        wire, size = to_wire(content)
        received = time.time() if received is None else received
        with self._transaction() as db:
            row = db.execute(
                "SELECT next_uid FROM mailboxes WHERE address = ?", (address,)
            ).fetchone()
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
            db.execute(
                "INSERT INTO change_log (at, kind, address, uid, size, payload) "
                "VALUES (?, 'deliver', ?, ?, ?, ?)",
                (received, address, uid, size, wire),
            )
        return uid

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

    def expunge(self, address: str, uids: list[int]) -> int:
        """Delete messages in one transaction: all of them or, after a crash, none."""
        if not uids:
            return 0
        with self._transaction() as db:
            removed = db.executemany(
                "DELETE FROM messages WHERE address = ? AND uid = ?",
                [(address, uid) for uid in uids],
            ).rowcount
            db.execute(
                "INSERT INTO change_log (at, kind, address, payload) VALUES (?, 'expunge', ?, ?)",
                (time.time(), address, json.dumps(sorted(uids)).encode()),
            )
        return int(removed)

    def purge(self, address: str) -> int:
        """Remove every message of a mailbox (the mailbox itself was removed)."""
        with self._transaction() as db:
            removed = db.execute("DELETE FROM messages WHERE address = ?", (address,)).rowcount
            db.execute(
                "INSERT INTO change_log (at, kind, address) VALUES (?, 'purge', ?)",
                (time.time(), address),
            )
        return int(removed)

    def last_lsn(self) -> int:
        row = self._db.execute("SELECT MAX(lsn) FROM change_log").fetchone()
        return int(row[0] or 0)

    def message_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
