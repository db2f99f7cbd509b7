"""The mailbox database's guarantees (the directory's are in test_directory.py)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from popguard.pop3.message_format import unstuff
from popguard.store.mailbox_database import MailboxDatabase


def test_uids_grow_and_are_never_reused(tmp_path: Path) -> None:
    store = MailboxDatabase(tmp_path / "DB01.sqlite", "DB01")
    first = store.deliver("a@example.test", b"Subject: 1\r\n\r\none\r\n")
    second = store.deliver("a@example.test", b"Subject: 2\r\n\r\ntwo\r\n")
    assert (first, second) == (1, 2)
    store.expunge("a@example.test", [first, second])
    store.purge("a@example.test")
    assert store.deliver("a@example.test", b"Subject: 3\r\n\r\nthree\r\n") == 3
    assert store.deliver("b@example.test", b"Subject: b\r\n\r\nb\r\n") == 1
    store.close()
    reopened = MailboxDatabase(tmp_path / "DB01.sqlite", "DB01")
    assert reopened.deliver("a@example.test", b"Subject: 4\r\n\r\n") == 4


def test_messages_are_stored_ready_to_send(tmp_path: Path) -> None:
    store = MailboxDatabase(tmp_path / "DB01.sqlite", "DB01")
    uid = store.deliver("a@example.test", b"Subject: lf\n\n.dot\nlast")
    wire = store.wire("a@example.test", uid)
    assert wire == b"Subject: lf\r\n\r\n..dot\r\nlast\r\n"
    (info,) = store.maildrop("a@example.test")
    assert info.size == len(unstuff(wire))


def test_every_change_is_in_the_change_log_in_order(tmp_path: Path) -> None:
    store = MailboxDatabase(tmp_path / "DB01.sqlite", "DB01")
    uid = store.deliver("a@example.test", b"Subject: x\r\n\r\n")
    store.deliver("a@example.test", b"Subject: y\r\n\r\n")
    store.expunge("a@example.test", [uid])
    store.purge("a@example.test")
    db = sqlite3.connect(tmp_path / "DB01.sqlite")
    rows = db.execute("SELECT lsn, kind, uid, payload FROM change_log ORDER BY lsn").fetchall()
    assert [(kind, uid_) for _, kind, uid_, _ in rows] == [
        ("deliver", 1), ("deliver", 2), ("expunge", None), ("purge", None)
    ]  # fmt: skip
    assert json.loads(rows[2][3]) == [1]
    assert store.last_lsn() == rows[-1][0]
    assert store.message_count() == 0
