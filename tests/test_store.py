"""The directory's schema versioning and the mailbox database's guarantees."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from popguard.directory.directory import SCHEMA_VERSION, Directory
from popguard.errors import UserError
from popguard.pop3.message_format import unstuff
from popguard.store.mailbox_database import MailboxDatabase


def test_new_directory_is_at_the_current_schema_version(tmp_path: Path) -> None:
    with Directory(tmp_path) as directory:
        assert directory.schema_version() == SCHEMA_VERSION


def test_a_newer_directory_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    Directory(tmp_path).close()
    db = sqlite3.connect(tmp_path / "directory.sqlite")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(UserError, match="newer than this popguard"):
        Directory(tmp_path)


def test_only_one_active_copy_per_database(tmp_path: Path) -> None:
    with Directory(tmp_path) as directory:
        directory.new_server("mbx1", ["mailbox"], "127.0.2.1")
        directory.new_server("mbx2", ["mailbox"], "127.0.3.1")
        directory.new_database("DB01", "mbx1")
        db = sqlite3.connect(tmp_path / "directory.sqlite")
        with pytest.raises(sqlite3.IntegrityError):
            db.execute(
                "INSERT INTO database_copies (database, server, activation_preference, "
                "is_active) VALUES ('DB01', 'mbx2', 2, 1)"
            )
        db.close()
        assert directory.active_server("DB01") == "mbx1"


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


def test_a_directory_from_before_replication_gets_its_ports_and_columns(tmp_path: Path) -> None:
    from popguard import sqlite_util
    from popguard.directory.directory import MIGRATIONS

    old = sqlite3.connect(tmp_path / "directory.sqlite", isolation_level=None)
    sqlite_util.migrate(old, MIGRATIONS[:2], "test directory")
    old.execute(
        "INSERT INTO servers VALUES ('mbx1', '[\"mailbox\"]', '127.0.2.1', "
        '\'{"pop3be": 1110, "pop3be-tls": 1995, "lmtp": 2424}\')'
    )
    old.execute("INSERT INTO servers VALUES ('cas1', '[\"frontend\"]', '127.0.1.1', '{}')")
    old.close()
    with Directory(tmp_path) as directory:
        mbx1, cas1 = directory.get_server("mbx1"), directory.get_server("cas1")
    assert mbx1.port("replication") == 64327 and "replication" not in cas1.ports
    assert mbx1.port("lmtp-peer") == 2425 and "lmtp-peer" not in cas1.ports
    assert mbx1.may_activate_copies and mbx1.auto_activation_policy == "Unrestricted"
