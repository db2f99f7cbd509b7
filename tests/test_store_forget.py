"""A copy that stays small and forgets: no message in the log, trimming behind a base,
forgotten deliveries, `forget` leaving no deleted octet in any file, snapshots."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popguard.store import change_log
from popguard.store.change_log import GENESIS, LogEntry, LogFormatError, entry_checksum
from popguard.store.mailbox_database import (
    LogIntegrityError,
    LogTrimmedError,
    MailboxDatabase,
    NotMountedError,
    SnapshotError,
    file_sha256,
    remove_leftovers,
)


def copies(tmp_path: Path) -> tuple[MailboxDatabase, MailboxDatabase]:
    active = MailboxDatabase(tmp_path / "a" / "DB01.sqlite", "DB01")
    passive = MailboxDatabase(tmp_path / "p" / "DB01.sqlite", "DB01")
    passive.fence()
    return active, passive


def secret_message(word: str, size: int = 50_000) -> bytes:
    return f"Subject: {word}\r\n\r\n{word}\r\n".encode() + b"x" * size + b"\r\n"


def files_with(folder: Path, word: str) -> list[str]:
    return sorted(f.name for f in folder.iterdir() if word.encode() in f.read_bytes())


def test_the_log_holds_no_message(tmp_path: Path) -> None:
    active, _ = copies(tmp_path)
    active.deliver("a@b.test", secret_message("zanzibar"))
    db = sqlite3.connect(active.path)
    (payload, digest) = db.execute("SELECT payload, digest FROM change_log").fetchone()
    assert payload is None and len(digest) == 32
    (entry,) = active.entries_after(0, 1 << 20)
    assert entry.payload is not None and b"zanzibar" in entry.payload
    assert entry.chained_checksum(GENESIS) == entry.checksum


def test_a_delivery_deleted_before_it_shipped_ships_forgotten_and_replays(tmp_path: Path) -> None:
    active, passive = copies(tmp_path)
    gone = active.deliver("a@b.test", secret_message("ephemeral"))
    kept = active.deliver("a@b.test", secret_message("kept"))
    active.expunge("a@b.test", [gone])
    entries = active.entries_after(0, 1 << 30)
    assert entries[0].forgotten and entries[0].payload is None
    # Through the wire format too: the digest travels, the message does not.
    body = b"".join(change_log.encode(entries))
    assert b"ephemeral" not in body
    assert passive.apply(change_log.decode(body)) == active.head()
    assert [m.uid for m in passive.maildrop("a@b.test")] == [kept]
    passive.mount(active.fence())
    assert passive.deliver("a@b.test", b"Subject: next\r\n\r\n") == kept + 1


def test_trimming_moves_the_base_and_the_head_survives_an_empty_log(tmp_path: Path) -> None:
    active, passive = copies(tmp_path)
    for n in range(5):
        active.deliver("a@b.test", f"Subject: {n}\r\n\r\n".encode())
    passive.apply(active.entries_after(0, 1 << 20))
    assert active.trim(3) == 3
    assert active.base().lsn == 3 and active.checksum_at(3) == passive.checksum_at(3)
    assert active.checksum_at(2) is None
    with pytest.raises(LogTrimmedError) as trimmed:
        active.entries_after(2, 1 << 20)
    assert trimmed.value.base_lsn == 3
    assert [e.lsn for e in active.entries_after(3, 1 << 20)] == [4, 5]
    head = active.head()
    assert active.trim(100) == 2  # never past the head
    assert active.head() == head and active.entries_after(5, 1 << 20) == []
    # The chain goes on from the base: the passive copy still follows.
    active.deliver("a@b.test", b"Subject: 6\r\n\r\n")
    passive.apply(active.entries_after(5, 1 << 20))
    assert passive.head() == active.head()
    reopened = MailboxDatabase(active.path, "DB01")
    assert reopened.head() == active.head() and reopened.base().lsn == 5


def test_a_forged_forgotten_entry_is_refused(tmp_path: Path) -> None:
    active, passive = copies(tmp_path)
    active.deliver("a@b.test", b"Subject: real\r\n\r\n")
    (entry,) = active.entries_after(0, 1 << 20)
    forged = LogEntry(**{**entry.__dict__, "payload": None, "forgotten_digest": bytes(32)})
    with pytest.raises(LogIntegrityError):
        passive.apply([forged])


def test_forget_leaves_no_deleted_octet_in_any_file_and_gives_space_back(tmp_path: Path) -> None:
    active, passive = copies(tmp_path)
    uids = [active.deliver("a@b.test", secret_message(f"word{n}q")) for n in range(60)]
    passive.apply(active.entries_after(0, 1 << 30))
    full = active.path.stat().st_size
    active.expunge("a@b.test", uids[:59])
    passive.apply(active.entries_after(passive.head().lsn, 1 << 30))
    for copy in (active, passive):
        forgotten = copy.forget()
        assert forgotten.wal_emptied and forgotten.pages_freed > 0
        for n in range(59):
            assert files_with(copy.path.parent, f"word{n}q") == [], n
        assert files_with(copy.path.parent, "word59q") == [copy.path.name]
    assert active.path.stat().st_size < full / 10


def test_purge_is_forgotten_as_well(tmp_path: Path) -> None:
    active, _ = copies(tmp_path)
    active.deliver("gone@b.test", secret_message("purgedword"))
    active.purge("gone@b.test")
    active.forget()
    assert files_with(active.path.parent, "purgedword") == []


def test_a_snapshot_seeds_a_copy_whole(tmp_path: Path) -> None:
    active, passive = copies(tmp_path)
    for n in range(4):
        active.deliver("a@b.test", secret_message(f"snap{n}", size=1000))
    active.expunge("a@b.test", [2])
    active.trim(3)
    out = tmp_path / "a" / "DB01.snapshot-test.sqlite"
    head, sha256 = active.snapshot(out)
    assert head == active.head() and sha256 == file_sha256(out)
    assert b"snap1" not in out.read_bytes()  # deleted: not in the snapshot either
    assert passive.load_snapshot(out) == head
    assert passive.base() == active.base()
    assert passive.maildrop("a@b.test") == active.maildrop("a@b.test")
    active.deliver("a@b.test", b"Subject: after\r\n\r\n")
    passive.apply(active.entries_after(passive.head().lsn, 1 << 20))
    assert passive.head() == active.head()
    with pytest.raises(NotMountedError):
        active.load_snapshot(out)


def test_a_damaged_snapshot_is_refused_and_the_copy_left_as_it_was(tmp_path: Path) -> None:
    active, passive = copies(tmp_path)
    active.deliver("a@b.test", b"Subject: 1\r\n\r\n")
    passive.apply(active.entries_after(0, 1 << 20))
    out = tmp_path / "a" / "DB01.snapshot-x.sqlite"
    active.snapshot(out)
    content = out.read_bytes()
    out.write_bytes(content[: len(content) // 2])
    with pytest.raises(SnapshotError):
        passive.load_snapshot(out)
    assert passive.head() == active.head() and len(passive.maildrop("a@b.test")) == 1


def test_leftover_snapshot_and_seeding_files_are_removed(tmp_path: Path) -> None:
    active, _ = copies(tmp_path)
    folder = active.path.parent
    for name in ("DB01.snapshot-ab12.sqlite", "DB01.seeding", "DB01.snapshot-ab12.sqlite-journal"):
        (folder / name).write_bytes(b"mail")
    removed = remove_leftovers(folder)
    assert len(removed) == 3
    assert sorted(f.name for f in folder.iterdir() if "DB01.sqlite" not in f.name) == []


def test_a_copy_with_messages_in_its_log_is_upgraded_and_keeps_its_chain(tmp_path: Path) -> None:
    """A version-3 file (messages in the log) comes out with the digest chain; two copies
    that agreed before agree after."""
    from popguard import sqlite_util
    from popguard.store.mailbox_database import MIGRATIONS

    paths = [tmp_path / "old1.sqlite", tmp_path / "old2.sqlite"]
    for path in paths:
        db = sqlite3.connect(path, isolation_level=None)
        sqlite_util.migrate(db, MIGRATIONS[:3], "old copy")
        wire = b"Subject: old\r\n\r\noldword\r\n"
        db.execute("INSERT INTO mailboxes VALUES ('a@b.test', 3)")
        db.execute("INSERT INTO messages VALUES ('a@b.test', 2, 22, 1.0, ?)", (wire,))
        checksum = GENESIS
        for lsn, uid in ((1, 1), (2, 2)):
            checksum = entry_checksum(checksum, lsn, 1.0, "deliver", "a@b.test", uid, 22, wire)
            db.execute(
                "INSERT INTO change_log VALUES (?, 1.0, 'deliver', 'a@b.test', ?, 22, ?, ?)",
                (lsn, uid, wire, checksum),
            )
        db.close()
    first, second = (MailboxDatabase(path, "DB01") for path in paths)
    assert first.head() == second.head()
    one, two = first.entries_after(0, 1 << 20)
    assert one.forgotten and two.payload is not None
    assert two.chained_checksum(one.chained_checksum(GENESIS)) == first.head().checksum
    db = sqlite3.connect(paths[0])
    assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0  # made before it existed
    db.close()
    first.forget()  # converts it once, so that it gives space back from then on
    assert first._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    assert b"oldword" in paths[0].read_bytes()  # message 2 is still there, once
    assert paths[0].read_bytes().count(b"oldword") == 1


FORGOTTEN = st.builds(
    lambda lsn, address, uid, digest: LogEntry(
        lsn, 1.0, "deliver", address, uid, 10, None, bytes(32), digest
    ),
    st.integers(1, 1000),
    st.from_regex(r"[a-z]{1,8}@[a-z]{1,8}\.test", fullmatch=True),
    st.integers(1, 1000),
    st.binary(min_size=32, max_size=32),
)


@given(st.lists(FORGOTTEN, max_size=5))
def test_forgotten_entries_round_trip_without_a_payload(entries: list[LogEntry]) -> None:
    body = b"".join(change_log.encode(entries))
    assert change_log.decode(body) == entries
    assert all(e.forgotten for e in change_log.decode(body))


@given(st.binary(min_size=1, max_size=200), st.binary(min_size=1, max_size=200))
def test_a_payload_that_does_not_match_its_digest_is_refused(real: bytes, other: bytes) -> None:
    entry = LogEntry(1, 1.0, "deliver", "a@b.test", 1, len(real), real, bytes(32))
    body = b"".join(change_log.encode([entry]))
    header, _, _ = body.partition(b"\n")
    swapped = header.replace(
        b'"payload_length":%d' % len(real), b'"payload_length":%d' % len(other)
    )
    with contextlib.suppress(LogFormatError):
        decoded = change_log.decode(swapped + b"\n" + other)
        assert decoded[0].payload == real  # only if it was the same payload after all


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "forget_interval = 600",
            "store.forget_interval: Input should be less than or equal to 300",
        ),
        ("forget_interval = 0", "store.forget_interval: Input should be greater than 0"),
        ("max_copy_lag_bytes = -1", "store.max_copy_lag_bytes: Input should be greater than 0"),
        ("forget = 1", "store.forget: Extra inputs are not permitted"),
    ],
)
def test_bad_store_settings_are_refused_with_one_line(text: str, message: str) -> None:
    from popguard.directory.config import parse_config
    from popguard.errors import UserError

    assert parse_config("", "popguard.toml").store.forget_interval == 60.0
    with pytest.raises(UserError) as refused:
        parse_config(f"[store]\n{text}\n", "popguard.toml")
    assert str(refused.value) == f"popguard.toml: {message}"
