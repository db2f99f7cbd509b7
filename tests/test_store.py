"""The mailbox database's guarantees (the directory's are in test_directory.py)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from popguard import sqlite_util
from popguard.pop3.message_format import unstuff
from popguard.store.mailbox_database import MIGRATIONS, MailboxDatabase, NotMountedError


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


def test_many_messages_stored_at_once_are_stored_as_one_by_one(tmp_path: Path) -> None:
    contents = [f"Subject: {n}\r\n\r\nbody {n}\n.dot\n".encode() for n in range(1, 6)]
    one_by_one = MailboxDatabase(tmp_path / "one.sqlite", "DB01")
    at_once = MailboxDatabase(tmp_path / "many.sqlite", "DB01")
    uids = [one_by_one.deliver("a@example.test", content) for content in contents]
    assert at_once.deliver_many("a@example.test", iter(contents)) == uids == [1, 2, 3, 4, 5]
    for store in (one_by_one, at_once):
        assert [m.size for m in store.maildrop("a@example.test")] == [
            m.size for m in one_by_one.maildrop("a@example.test")
        ]
        assert [store.wire("a@example.test", uid) for uid in uids] == [
            one_by_one.wire("a@example.test", uid) for uid in uids
        ]
    logs = [
        sqlite3.connect(tmp_path / name)
        .execute("SELECT lsn, kind, uid, size, digest FROM change_log ORDER BY lsn")
        .fetchall()
        for name in ("one.sqlite", "many.sqlite")
    ]
    assert logs[0] == logs[1] and len(logs[0]) == 5
    assert at_once.deliver("a@example.test", b"Subject: 6\r\n\r\n") == 6


def test_many_messages_go_to_no_passive_copy_and_all_or_none_are_stored(tmp_path: Path) -> None:
    store = MailboxDatabase(tmp_path / "DB01.sqlite", "DB01")

    def contents() -> Iterator[bytes]:
        yield b"Subject: 1\r\n\r\n"
        raise RuntimeError("the source failed half way")

    with pytest.raises(RuntimeError, match="half way"):
        store.deliver_many("a@example.test", contents())
    assert store.maildrop("a@example.test") == [] and store.last_lsn() == 0
    store.fence()
    with pytest.raises(NotMountedError):
        store.deliver_many("a@example.test", [b"Subject: 2\r\n\r\n"])
    assert store.message_count() == 0


def _statements(store: MailboxDatabase, read: Callable[[], object]) -> list[str]:
    """The SQL statements `read` sends to the store's connection."""
    seen: list[str] = []
    store._db.set_trace_callback(seen.append)
    try:
        read()
    finally:
        store._db.set_trace_callback(None)
    return seen


def test_a_login_and_the_sizes_read_no_message_pages(tmp_path: Path) -> None:
    # A login reads the whole maildrop: from an index that holds uid, size and received,
    # not from the table rows, whose pages hold the messages themselves.
    store = MailboxDatabase(tmp_path / "DB01.sqlite", "DB01")
    store.deliver_many("a@example.test", [b"Subject: x\r\n\r\n" + b"x" * 3000] * 3)
    reads: list[Callable[[], object]] = [
        lambda: store.maildrop("a@example.test"),
        lambda: store.usage("a@example.test"),
        store.all_usage,
    ]
    for read in reads:
        (statement,) = _statements(store, read)
        plan = store._db.execute(f"EXPLAIN QUERY PLAN {statement}").fetchall()
        assert any("USING COVERING INDEX messages_maildrop" in row[-1] for row in plan), plan


def test_an_older_copy_gets_the_maildrop_index_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "DB01.sqlite"
    older = sqlite3.connect(path, isolation_level=None)
    sqlite_util.migrate(older, MIGRATIONS[:5], "a version-5 copy")
    older.execute(
        "INSERT INTO messages (address, uid, size, received, wire) VALUES ('a@example.test', 1, "
        "14, 1.0, X'5375626A6563743A20780D0A0D0A')"
    )
    older.close()
    store = MailboxDatabase(path, "DB01")
    indexes = {
        name
        for (name,) in store._db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'"
        )
    }
    assert "messages_maildrop" in indexes and "messages_sizes" not in indexes
    assert [(m.uid, m.size) for m in store.maildrop("a@example.test")] == [(1, 14)]
    assert store.usage("a@example.test").octets == 14
