"""The mailbox database: one SQLite file per database copy.

Each message gets a per-mailbox UID from a counter that is never reset, so a
UIDL stays the same for the life of the message. Every change also appends to
the change log, in the same transaction, which is what replication ships; a
passive copy applies the same entries with the same LSNs and checksums, so every
copy holds the same messages under the same UIDs.

The log holds no message: a delivery's entry carries the message's digest, and the
message itself is read from the message table when the entry is shipped (see
change_log). The log is trimmed from its start (`trim`) once every copy that still
counts has applied it; `copy_state` keeps the LSN and checksum of the last entry
trimmed, the base the log goes on from.

Deleted means gone: connections zero what they delete (`secure_delete`), keep
temporary tables in memory, and `forget` gives freed pages back and empties the
WAL, so that a message deleted here is in no file of this copy once `forget` has run
after the deletion.

A copy knows its own role. Only an `active` (mounted) copy takes deliveries and
deletions, and the role is checked inside the writing transaction: once a
switchover has fenced the copy (made it `passive`), no write that was already on
its way can land in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popguard import sqlite_util
from popguard.pop3.message_format import to_wire
from popguard.store.change_log import (
    GENESIS,
    LogEntry,
    digest_checksum,
    entry_checksum,
    payload_digest,
)

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


def _bodies_out_of_the_log(db: sqlite3.Connection) -> None:
    """Version 3 -> 4: deliveries' entries keep the message's digest, not the message
    (the message table has it), the chain covers payloads by digest, and the log has a
    base to be trimmed behind. Every copy computes the same new chain from the same
    entries, so copies that agreed before agree after."""
    db.execute("ALTER TABLE change_log ADD COLUMN digest BLOB")
    db.execute("ALTER TABLE copy_state ADD COLUMN base_lsn INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE copy_state ADD COLUMN base_checksum BLOB")  # NULL: GENESIS
    previous = GENESIS
    rows = db.execute(
        "SELECT lsn, at, kind, address, uid, size, payload FROM change_log ORDER BY lsn"
    ).fetchall()
    for lsn, at, kind, address, uid, size, payload in rows:
        digest = None if payload is None else payload_digest(bytes(payload))
        previous = digest_checksum(previous, lsn, at, kind, address, uid, size, digest)
        db.execute(
            "UPDATE change_log SET checksum = ?, digest = ?, "
            "payload = CASE WHEN kind = 'deliver' THEN NULL ELSE payload END WHERE lsn = ?",
            (previous, digest, lsn),
        )


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
    _bodies_out_of_the_log,
    # A mailbox's size (quotas, get-mailbox) and the database's live message octets
    # are sums over this index alone, never over the messages' pages (messages_maildrop
    # took its place in version 6).
    "CREATE INDEX IF NOT EXISTS messages_sizes ON messages (address, size);",
    # A login's maildrop (uid, size, received of every message) from this index alone:
    # without it each row is looked up in the table, whose pages hold the messages
    # (a 50,000-message mailbox is 50,000 page reads at every login). It covers the
    # sums messages_sizes served, so that index goes: one index less per delivery.
    """
    CREATE INDEX IF NOT EXISTS messages_maildrop ON messages (address, uid, size, received);
    DROP INDEX IF EXISTS messages_sizes;
    """,
)

# The tables a snapshot carries, in the order they are copied.
_SNAPSHOT_TABLES = ("mailboxes", "messages", "change_log", "redelivered")
# How many entries one trimming transaction removes, and how many free pages one
# incremental-vacuum transaction gives back: each holds the write lock, so each is kept
# to a few milliseconds, and deliveries and QUITs go between them.
TRIM_STEP = 2000
VACUUM_STEP = 256
# The WAL is cut back to this after a checkpoint (it stays at its high-water mark
# otherwise); `forget` empties it.
JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024
# How long `forget`'s checkpoint waits for readers and writers before giving up until
# its next run: it holds the write lock while it waits, and deliveries must not.
CHECKPOINT_PATIENCE_MS = 1000


class NotMountedError(Exception):
    """The database is not mounted here: its active copy is elsewhere, or moving."""


class LogIntegrityError(Exception):
    """Log entries that do not follow this copy's log: a gap, a fork or a corruption."""


class LogTrimmedError(Exception):
    """The entries asked for were trimmed from this copy's log: the asker needs a
    snapshot, not the log."""

    def __init__(self, base_lsn: int) -> None:
        super().__init__(f"the log starts after LSN {base_lsn}: entries before it are trimmed")
        self.base_lsn = base_lsn


class SnapshotError(Exception):
    """A snapshot file that is not a whole, matching copy of a mailbox database."""


class QuotaExceededError(Exception):
    """A delivery that would put a mailbox over its ProhibitSendReceiveQuota."""

    def __init__(self, address: str, used: int, size: int, quota: int) -> None:
        super().__init__(
            f"mailbox {address} holds {used} of its {quota} octets: no room for {size} more"
        )
        self.used, self.size, self.quota = used, size, quota


class StoreFullError(Exception):
    """The file system holding the copy has no room for the write (SQLITE_FULL)."""


# Slots: a login holds one of these per message (50,000 in a large mailbox).
@dataclass(frozen=True, slots=True)
class MessageInfo:
    uid: int
    size: int
    received: float


@dataclass(frozen=True)
class LogHead:
    lsn: int
    checksum: bytes


@dataclass(frozen=True)
class LogLag:
    """What a copy at some LSN still needs of this log: the time of the oldest entry it
    has not applied (None: it needs nothing) and the octets that shipping it all takes."""

    oldest: float | None
    octets: int


@dataclass(frozen=True)
class StoreSizes:
    """What a copy takes on disk (its file and WAL), the octets of the messages it
    holds, and the octets of its change log's pages."""

    file_bytes: int
    message_bytes: int
    log_bytes: int


@dataclass(frozen=True)
class MailboxUsage:
    items: int
    octets: int


@dataclass(frozen=True, slots=True)
class RestoredMessage:
    """A message given back from a backup: its wire form as the backup holds it."""

    wire: bytes
    size: int
    received: float


@dataclass(frozen=True)
class Restored:
    """What one restore did: messages stored, messages skipped because the mailbox
    holds them already, and the octets stored."""

    restored: int
    already_there: int
    octets: int


@dataclass(frozen=True)
class Forgotten:
    """What one `forget` did: pages given back, and whether the WAL is empty now."""

    pages_freed: int
    wal_emptied: bool


class MailboxDatabase:
    """One copy of one mailbox database, opened by one process."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        path.parent.mkdir(parents=True, exist_ok=True)
        # FULL sync (in connect): a message is on disk, not only in the OS cache,
        # before delivery says 250.
        self._db = sqlite_util.connect(path, timeout=30.0, check_same_thread=False)
        _forgetful(self._db)
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

    def deliver(
        self,
        address: str,
        content: bytes,
        received: float | None = None,
        quota: int | None = None,
    ) -> int:
        """Store a message durably; returns its UID.

        With a `quota` (octets), QuotaExceededError if the mailbox would hold more than
        that with this message: checked in the writing transaction, so two deliveries
        at once cannot both squeeze under it. StoreFullError if the disk is full.
        """
        wire, size = to_wire(content)
        received = time.time() if received is None else received
        with _full_disk_named(), self._transaction() as db:
            self._require_active(db)
            if quota is not None:
                used = self._usage(db, address).octets
                if used + size > quota:
                    raise QuotaExceededError(address, used, size, quota)
            return self._store(db, address, wire, size, received)

    def deliver_many(self, address: str, contents: Iterable[bytes]) -> list[int]:
        """Store many messages in one transaction (one fsync, not one per message); their
        UIDs. For importing a mailbox (and filling one for a benchmark): no quota."""
        with _full_disk_named(), self._transaction() as db:
            self._require_active(db)
            uids = []
            for content in contents:
                wire, size = to_wire(content)
                uids.append(self._store(db, address, wire, size, time.time()))
            return uids

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
        self._append(db, received, "deliver", address, uid, size, None, payload_digest(wire))
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

    def restore(
        self, address: str, messages: Sequence[RestoredMessage], quota: int | None = None
    ) -> Restored:
        """Store the messages of a backup that `address` does not hold, all in one
        transaction: every one of them, or none.

        A message is held when the mailbox has one with the same digest (the SHA-256 of
        its wire form, which its delivery's log entry carries and `verify` checks): the
        same octets, so skipping it loses nothing, and restoring twice stores it once.
        Each message the mailbox holds stands for one message of the backup, so a
        backup with two identical messages gives back the second when only one is left.
        With a `quota` (octets), QuotaExceededError, and nothing stored, if the mailbox
        would hold more than that with the messages it lacks.
        """
        with _full_disk_named(), self._transaction() as db:
            self._require_active(db)
            held = self._held_digests(db, address, {m.size for m in messages})
            missing = []
            for candidate in messages:
                digest = payload_digest(candidate.wire)
                if held[digest] > 0:
                    held[digest] -= 1
                else:
                    missing.append(candidate)
            octets = sum(m.size for m in missing)
            if quota is not None and missing:
                used = self._usage(db, address).octets
                if used + octets > quota:
                    raise QuotaExceededError(address, used, octets, quota)
            for m in missing:
                self._store(db, address, m.wire, m.size, m.received)
            return Restored(len(missing), len(messages) - len(missing), octets)

    @staticmethod
    def _held_digests(db: sqlite3.Connection, address: str, sizes: set[int]) -> Counter[bytes]:
        """The digests of the mailbox's messages of one of these sizes, counted. The
        sizes come from the maildrop index; only messages of a size that can match are
        read (a message of another size cannot have the same octets)."""
        candidates = [
            uid
            for uid, size in db.execute(
                "SELECT uid, size FROM messages WHERE address = ?", (address,)
            ).fetchall()
            if size in sizes
        ]
        held: Counter[bytes] = Counter()
        for uid in candidates:
            (wire,) = db.execute(
                "SELECT wire FROM messages WHERE address = ? AND uid = ?", (address, uid)
            ).fetchone()
            held[payload_digest(bytes(wire))] += 1
        return held

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
            self._append(
                db, time.time(), "expunge", address, None, None, payload, payload_digest(payload)
            )
        return int(removed)

    def purge(self, address: str) -> int:
        """Remove every message of a mailbox (the mailbox itself was removed)."""
        with self._transaction() as db:
            self._require_active(db)
            removed = db.execute("DELETE FROM messages WHERE address = ?", (address,)).rowcount
            self._append(db, time.time(), "purge", address, None, None, None, None)
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
        digest: bytes | None,
    ) -> None:
        """Log a change; a delivery's `payload` is None (the message table has it)."""
        head = self._head(db)
        lsn = head.lsn + 1
        checksum = digest_checksum(head.checksum, lsn, at, kind, address, uid, size, digest)
        db.execute(
            "INSERT INTO change_log (lsn, at, kind, address, uid, size, payload, digest, "
            "checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (lsn, at, kind, address, uid, size, payload, digest, checksum),
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

    def usage(self, address: str) -> MailboxUsage:
        """How many messages a mailbox holds and their octets (as STAT counts them)."""
        return self._usage(self._db, address)

    @staticmethod
    def _usage(db: sqlite3.Connection, address: str) -> MailboxUsage:
        count, octets = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE address = ?", (address,)
        ).fetchone()
        return MailboxUsage(int(count), int(octets))

    def all_usage(self) -> dict[str, MailboxUsage]:
        rows = self._db.execute(
            "SELECT address, COUNT(*), COALESCE(SUM(size), 0) FROM messages GROUP BY address"
        ).fetchall()
        return {address: MailboxUsage(int(n), int(octets)) for address, n, octets in rows}

    def sizes(self) -> StoreSizes:
        """This copy's sizes: its files (database and WAL), live messages, its log."""
        (messages,) = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM messages").fetchone()
        (log_pages,) = self._db.execute(
            "SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name = 'change_log'"
        ).fetchone()
        files = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                files += path.stat().st_size
        return StoreSizes(files, int(messages), int(log_pages))

    # The change log -------------------------------------------------------------------

    def last_lsn(self) -> int:
        return self.head().lsn

    def head(self) -> LogHead:
        return self._head(self._db)

    def base(self) -> LogHead:
        """Where the log starts: the last entry trimmed (LSN 0 and GENESIS: none)."""
        return self._base(self._db)

    @staticmethod
    def _base(db: sqlite3.Connection) -> LogHead:
        lsn, checksum = db.execute("SELECT base_lsn, base_checksum FROM copy_state").fetchone()
        return LogHead(int(lsn), GENESIS if checksum is None else bytes(checksum))

    @classmethod
    def _head(cls, db: sqlite3.Connection) -> LogHead:
        row = db.execute(
            "SELECT lsn, checksum FROM change_log ORDER BY lsn DESC LIMIT 1"
        ).fetchone()
        return cls._base(db) if row is None else LogHead(int(row[0]), bytes(row[1]))

    def checksum_at(self, lsn: int) -> bytes | None:
        """The chain's checksum at `lsn`; None if the log does not have it (any more)."""
        base = self.base()
        if lsn == base.lsn:
            return base.checksum
        row = self._db.execute("SELECT checksum FROM change_log WHERE lsn = ?", (lsn,)).fetchone()
        return None if row is None else bytes(row[0])

    def entries_after(self, lsn: int, max_bytes: int, max_entries: int = 10_000) -> list[LogEntry]:
        """Entries after `lsn` in order: at least one, then up to `max_bytes` of payload.

        A delivery's message comes from the message table; one deleted since is shipped
        forgotten (its digest, no message). LogTrimmedError if `lsn` is before the base.
        """
        entries: list[LogEntry] = []
        total = 0
        # One statement, so one read snapshot: a message missing here was deleted by an
        # entry that is in the log too.
        rows = self._db.execute(
            "SELECT c.lsn, c.at, c.kind, c.address, c.uid, c.size, "
            "CASE WHEN c.kind = 'deliver' THEN m.wire ELSE c.payload END, c.checksum, c.digest, "
            "s.base_lsn FROM copy_state s LEFT JOIN change_log c ON c.lsn > ? "
            "LEFT JOIN messages m ON c.kind = 'deliver' AND m.address = c.address "
            "AND m.uid = c.uid ORDER BY c.lsn LIMIT ?",
            (lsn, max_entries),
        ).fetchall()
        if rows and lsn < rows[0][-1]:
            raise LogTrimmedError(int(rows[0][-1]))
        for row in rows:
            if row[0] is None:  # an empty log after `lsn` (the LEFT JOIN's one row)
                break
            entry = _entry(row[:-1])
            total += len(entry.payload or b"")
            if entries and total > max_bytes:
                break
            entries.append(entry)
        return entries

    def lag(self, lsn: int) -> LogLag:
        """What a copy that has applied up to `lsn` still needs of this log."""
        oldest, octets = self._db.execute(
            "SELECT MIN(at), SUM(COALESCE(size, LENGTH(payload), 0)) FROM change_log WHERE lsn > ?",
            (lsn,),
        ).fetchone()
        return LogLag(oldest, int(octets or 0))

    def trim(self, through: int) -> int:
        """Remove the log's entries up to `through` (never past the head), in short
        transactions; the number removed."""
        removed = 0
        while True:
            with self._transaction() as db:
                base, head = self._base(db), self._head(db)
                end = min(through, head.lsn, base.lsn + TRIM_STEP)
                if end <= base.lsn:
                    return removed
                (checksum,) = db.execute(
                    "SELECT checksum FROM change_log WHERE lsn = ?", (end,)
                ).fetchone()
                removed += db.execute("DELETE FROM change_log WHERE lsn <= ?", (end,)).rowcount
                db.execute("UPDATE copy_state SET base_lsn = ?, base_checksum = ?", (end, checksum))

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
                logged = None if entry.kind == "deliver" else entry.payload
                db.execute(
                    "INSERT INTO change_log (lsn, at, kind, address, uid, size, payload, "
                    "digest, checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        entry.lsn, entry.at, entry.kind, entry.address, entry.uid, entry.size,
                        logged, entry.payload_digest, entry.checksum,
                    ),
                )  # fmt: skip
                head = LogHead(entry.lsn, entry.checksum)
            return head

    @staticmethod
    def _replay(db: sqlite3.Connection, entry: LogEntry) -> None:
        if entry.kind == "deliver":
            if entry.uid is None or entry.size is None or entry.payload_digest is None:
                raise LogIntegrityError(f"deliver entry {entry.lsn} lacks its uid, size or message")
            db.execute(
                "INSERT INTO mailboxes (address, next_uid) VALUES (?, ?) ON CONFLICT(address) "
                "DO UPDATE SET next_uid = MAX(next_uid, excluded.next_uid)",
                (entry.address, entry.uid + 1),
            )
            if entry.payload is None:
                return  # forgotten: deleted on the active copy, by an entry still to come
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
            "SELECT c.lsn, c.at, c.kind, c.address, c.uid, c.size, m.wire, c.checksum, c.digest "
            "FROM change_log c JOIN messages m ON m.address = c.address AND m.uid = c.uid "
            "WHERE c.kind = 'deliver' AND c.lsn > ? ORDER BY c.lsn",
            (lsn,),
        ).fetchall()
        return [_entry(row) for row in rows]

    # Forgetting -----------------------------------------------------------------------

    def forget(self) -> Forgotten:
        """Make what was deleted unreadable from this copy's files, and give space back.

        Deleted rows are zeroed as they go (`secure_delete`), but older versions of
        their pages stay in the WAL and, until a checkpoint overwrites them, in the
        database file. So: give free pages back to the file system (incremental vacuum,
        a few pages a transaction), then checkpoint and truncate the WAL. A checkpoint
        that cannot finish (a reader or writer in the way for longer than
        CHECKPOINT_PATIENCE_MS) says so and is done again on the next run.
        """
        freed, done = 0, False
        while not done:
            step, done = self.give_back_pages()
            freed += step
        return Forgotten(freed, self.empty_wal())

    def give_back_pages(self, steps: int = 1) -> tuple[int, bool]:
        """Up to `steps` transactions of incremental vacuum (VACUUM_STEP free pages each):
        the pages given back, and whether none is left. In steps, so that a caller with
        one store thread (the replication service) lets other work of the copy go in
        between: 60,000 free pages after a large deletion took 40 s in one go."""
        if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0:  # NONE
            # A file made before popguard gave space back is converted once: a VACUUM,
            # which holds the write lock while it copies the file (deliveries wait for
            # it, reads go on), then it shrinks like a new file.
            self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            self._db.execute("VACUUM")
        if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # INCREMENTAL
            return 0, True
        freed = 0
        for _ in range(steps):
            if not self._db.execute("PRAGMA freelist_count").fetchone()[0]:
                return freed, True
            with self._transaction() as db:
                before = db.execute("PRAGMA freelist_count").fetchone()[0]
                db.execute(f"PRAGMA incremental_vacuum({VACUUM_STEP})").fetchall()
                after = db.execute("PRAGMA freelist_count").fetchone()[0]
            freed += before - after
            if after >= before:
                return freed, True
        return freed, not self._db.execute("PRAGMA freelist_count").fetchone()[0]

    def empty_wal(self) -> bool:
        """Checkpoint and truncate the WAL (the old versions of freed pages go with it);
        False when a reader or writer stayed in the way for CHECKPOINT_PATIENCE_MS."""
        self._db.execute(f"PRAGMA busy_timeout = {CHECKPOINT_PATIENCE_MS}")
        try:
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            self._db.execute("PRAGMA busy_timeout = 30000")
        return bool(busy == 0)

    # Checking a whole copy (backups) ----------------------------------------------------

    def verify(self) -> list[str]:
        """What is wrong with this copy (empty: nothing): SQLite's own integrity check,
        the log's checksum chain from its base to its head, and every message a delivery
        entry still in the log names against that entry's digest."""
        problems: list[str] = []
        for (verdict,) in self._db.execute("PRAGMA integrity_check").fetchall():
            if verdict != "ok":
                problems.append(f"SQLite: {verdict}")
        if problems:
            return problems
        previous = self.base().checksum
        rows = self._db.execute(
            "SELECT c.lsn, c.at, c.kind, c.address, c.uid, c.size, c.digest, c.checksum, "
            "m.wire FROM change_log c LEFT JOIN messages m ON c.kind = 'deliver' "
            "AND m.address = c.address AND m.uid = c.uid ORDER BY c.lsn"
        ).fetchall()
        for lsn, at, kind, address, uid, size, digest, checksum, wire in rows:
            digest = None if digest is None else bytes(digest)
            if digest_checksum(previous, lsn, at, kind, address, uid, size, digest) != checksum:
                problems.append(f"log entry {lsn} fails its checksum")
            if wire is not None and payload_digest(bytes(wire)) != digest:
                problems.append(f"message {address} uid {uid} does not match its log entry")
            previous = bytes(checksum)
        return problems

    # Seeding ------------------------------------------------------------------------

    def reset(self) -> None:
        """Empty this passive copy, to be seeded again from LSN 1 of the active copy's log.

        The rows go, the file stays: other processes' connections to it stay valid.
        """
        with self._transaction() as db:
            if db.execute("SELECT role FROM copy_state").fetchone()[0] == ACTIVE:
                raise NotMountedError(f"refusing to empty the mounted copy of {self.name}")
            for table in _SNAPSHOT_TABLES:
                db.execute(f"DELETE FROM {table}")
            db.execute("DELETE FROM sqlite_sequence WHERE name = 'change_log'")
            db.execute("UPDATE copy_state SET base_lsn = 0, base_checksum = NULL")

    def snapshot(self, out: Path) -> tuple[LogHead, str]:
        """Write a consistent copy of this database to `out` (VACUUM INTO: one read
        transaction, so deliveries go on) and return its log head and SHA-256.

        The snapshot is compact: it holds live rows only, none of what was deleted.
        """
        out.unlink(missing_ok=True)
        connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            connection.execute("PRAGMA temp_store = MEMORY")  # no mail in temporary files
            connection.execute("VACUUM INTO ?", (str(out),))
        finally:
            connection.close()
        copy = sqlite3.connect(out, isolation_level=None)
        try:
            # One file, no WAL beside it: what is shipped is the whole snapshot.
            copy.execute("PRAGMA journal_mode=DELETE")
            head = self._head(copy)
        finally:
            copy.close()
        return head, file_sha256(out)

    def load_snapshot(self, snapshot: Path) -> LogHead:
        """Make this passive copy what `snapshot` holds, in one transaction: a copy is
        either as it was or wholly the snapshot, never half of it (a kill -9 during the
        load rolls it back). The file stays, so other processes' connections stay valid.
        """
        try:
            check = sqlite3.connect(f"file:{snapshot}?mode=ro", uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise SnapshotError(f"snapshot {snapshot} cannot be opened: {exc}") from None
        try:
            version = check.execute("PRAGMA user_version").fetchone()[0]
            if version != len(MIGRATIONS):
                raise SnapshotError(
                    f"snapshot has schema version {version}, this copy {len(MIGRATIONS)}"
                )
            (verdict,) = check.execute("PRAGMA quick_check").fetchone()
            if verdict != "ok":
                raise SnapshotError(f"snapshot fails SQLite's check: {verdict}")
            base = self._base(check)
        except sqlite3.Error as exc:
            raise SnapshotError(f"snapshot {snapshot} is not a mailbox database: {exc}") from None
        finally:
            check.close()
        self._db.execute("ATTACH DATABASE ? AS snapshot", (str(snapshot),))
        try:
            with self._transaction() as db:
                if db.execute("SELECT role FROM copy_state").fetchone()[0] == ACTIVE:
                    raise NotMountedError(f"refusing to overwrite the mounted copy of {self.name}")
                for table in _SNAPSHOT_TABLES:
                    db.execute(f"DELETE FROM main.{table}")
                    db.execute(f"INSERT INTO main.{table} SELECT * FROM snapshot.{table}")
                db.execute(
                    "UPDATE main.copy_state SET base_lsn = ?, base_checksum = ?",
                    (base.lsn, None if base.lsn == 0 else base.checksum),
                )
                return self._head(db)
        finally:
            self._db.execute("DETACH DATABASE snapshot")


@contextlib.contextmanager
def _full_disk_named() -> Iterator[None]:
    """SQLite's "database or disk is full" as StoreFullError (delivery answers 452
    4.3.1 to it, not a generic failure); the transaction is rolled back by then."""
    try:
        yield
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            raise StoreFullError(str(exc)) from exc
        raise


def _forgetful(db: sqlite3.Connection) -> None:
    """What every connection to a mailbox database sets so deletions leave nothing."""
    db.execute("PRAGMA secure_delete = ON")  # zero deleted content and freed pages
    db.execute("PRAGMA temp_store = MEMORY")  # no temporary files with mail in them
    db.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    if db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
        # Only a file with no tables yet can choose cheaply (VACUUM of an empty file);
        # an older file is converted by its first `forget`.
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        db.execute("VACUUM")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove the snapshot and seeding files a killed process left in a databases
    folder: they may hold messages deleted since."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for leftover in folder.iterdir():
        if ".snapshot-" in leftover.name or ".seeding" in leftover.name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
                removed.append(leftover)
    return removed


def _entry(row: Any) -> LogEntry:
    lsn, at, kind, address, uid, size, payload, checksum, digest = row
    return LogEntry(
        lsn=lsn,
        at=at,
        kind=kind,
        address=address,
        uid=uid,
        size=size,
        payload=None if payload is None else bytes(payload),
        checksum=bytes(checksum),
        # Carried only when the payload is gone; otherwise the payload says it.
        forgotten_digest=None if payload is not None or digest is None else bytes(digest),
    )
