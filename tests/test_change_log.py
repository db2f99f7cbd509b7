"""The change log's framing and checksum chain (hypothesis), and replay into a copy."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popguard.store import change_log
from popguard.store.change_log import GENESIS, LogEntry, LogFormatError, entry_checksum
from popguard.store.mailbox_database import LogIntegrityError, MailboxDatabase, NotMountedError


def chain(
    raw: list[tuple[float, str, str, int | None, int | None, bytes | None]],
) -> list[LogEntry]:
    entries, previous = [], GENESIS
    for lsn, (at, kind, address, uid, size, payload) in enumerate(raw, start=1):
        previous = entry_checksum(previous, lsn, at, kind, address, uid, size, payload)
        entries.append(LogEntry(lsn, at, kind, address, uid, size, payload, previous))
    return entries


RAW_ENTRIES = st.lists(
    st.tuples(
        st.floats(0, 2e9, allow_nan=False),
        st.sampled_from(change_log.KINDS),
        st.from_regex(r"[a-z]{1,8}@[a-z]{1,8}\.test", fullmatch=True),
        st.one_of(st.none(), st.integers(0, 2**40)),
        st.one_of(st.none(), st.integers(0, 2**40)),
        st.one_of(st.none(), st.binary(max_size=300)),
    ),
    max_size=8,
)


@given(RAW_ENTRIES)
def test_entries_round_trip(
    raw: list[tuple[float, str, str, int | None, int | None, bytes | None]],
) -> None:
    entries = chain(raw)
    assert change_log.decode(b"".join(change_log.encode(entries))) == entries


@settings(max_examples=300, deadline=None)
@given(RAW_ENTRIES.filter(bool), st.data())
def test_a_cut_body_is_refused_or_is_a_whole_prefix(
    raw: list[tuple[float, str, str, int | None, int | None, bytes | None]], data: st.DataObject
) -> None:
    entries = chain(raw)
    body = b"".join(change_log.encode(entries))
    cut = data.draw(st.integers(0, len(body) - 1))
    try:
        decoded = change_log.decode(body[:cut])
    except LogFormatError:
        return
    # A cut exactly between two entries is a shorter, valid answer: never a partial entry.
    assert decoded == entries[: len(decoded)]


@given(st.binary(max_size=600))
def test_garbage_is_refused_with_log_format_error_only(body: bytes) -> None:
    with contextlib.suppress(LogFormatError):
        change_log.decode(body)


@given(
    st.dictionaries(
        st.sampled_from([*sorted(change_log._FIELDS), "extra"]),
        st.one_of(
            st.none(),
            st.integers(-5, 5),
            st.text(max_size=70),
            st.booleans(),
            st.floats(allow_nan=False),
        ),
    )
)
def test_any_header_is_accepted_only_when_well_formed(header: dict[str, object]) -> None:
    with contextlib.suppress(LogFormatError):
        change_log.decode(json.dumps(header).encode() + b"\n")


def test_the_checksum_covers_every_field() -> None:
    base = (GENESIS, 1, 1.0, "deliver", "a@b.test", 1, 5, b"hello")
    reference = entry_checksum(*base)
    for index, changed in (
        (1, 2),
        (2, 1.5),
        (3, "expunge"),
        (4, "c@b.test"),
        (5, 2),
        (6, 6),
        (7, b"hellp"),
        (7, None),
        (0, bytes(31) + b"\1"),
    ):
        variant = list(base)
        variant[index] = changed
        assert entry_checksum(*variant) != reference, index  # type: ignore[arg-type]


# Replay into a passive copy ---------------------------------------------------------------


def copies(tmp_path: Path) -> tuple[MailboxDatabase, MailboxDatabase]:
    active = MailboxDatabase(tmp_path / "a.sqlite", "DB01")
    passive = MailboxDatabase(tmp_path / "p.sqlite", "DB01")
    passive.fence()
    return active, passive


def test_replay_gives_the_same_messages_uids_and_log(tmp_path: Path) -> None:
    active, passive = copies(tmp_path)
    first = active.deliver("a@b.test", b"Subject: 1\r\n\r\none\r\n")
    active.deliver("a@b.test", b"Subject: 2\r\n\r\ntwo\r\n")
    active.expunge("a@b.test", [first])
    active.deliver("c@b.test", b"Subject: 3\r\n\r\n")
    active.purge("c@b.test")
    head = passive.apply(active.entries_after(0, max_bytes=1 << 20))
    assert head == active.head()
    assert passive.maildrop("a@b.test") == active.maildrop("a@b.test")
    assert passive.wire("a@b.test", 2) == active.wire("a@b.test", 2)
    assert passive.maildrop("c@b.test") == []
    # UIDs continue where the active copy's would, after a switchover.
    passive.mount(head)
    assert passive.deliver("a@b.test", b"Subject: 4\r\n\r\n") == 3
    assert passive.deliver("c@b.test", b"Subject: 5\r\n\r\n") == 2


def test_batches_respect_the_byte_budget_but_always_make_progress(tmp_path: Path) -> None:
    active, _ = copies(tmp_path)
    for _n in range(5):
        active.deliver("a@b.test", b"Subject: x\r\n\r\n" + b"y" * 1000)
    assert len(active.entries_after(0, max_bytes=1)) == 1
    assert len(active.entries_after(0, max_bytes=2500)) == 2
    assert active.entries_after(5, max_bytes=1 << 20) == []


@pytest.mark.parametrize("damage", ["gap", "corrupt", "foreign", "reordered"])
def test_a_bad_batch_is_refused_whole(tmp_path: Path, damage: str) -> None:
    active, passive = copies(tmp_path)
    for n in range(3):
        active.deliver("a@b.test", f"Subject: {n}\r\n\r\n".encode())
    entries = active.entries_after(0, max_bytes=1 << 20)
    if damage == "gap":
        entries = [entries[0], entries[2]]
    elif damage == "corrupt":
        entries[1] = LogEntry(**{**entries[1].__dict__, "payload": b"Subject: evil\r\n\r\n"})
    elif damage == "foreign":
        other = MailboxDatabase(tmp_path / "other.sqlite", "DB02")
        other.deliver("a@b.test", b"Subject: 0\r\n\r\n")
        entries = other.entries_after(0, max_bytes=1 << 20) + entries[1:]
    else:
        entries = [entries[1], entries[0], entries[2]]
    with pytest.raises(LogIntegrityError):
        passive.apply(entries)
    assert passive.head().lsn == 0
    assert passive.maildrop("a@b.test") == []


def test_a_fenced_copy_takes_no_write_and_a_mounted_one_no_replay(tmp_path: Path) -> None:
    active, passive = copies(tmp_path)
    active.deliver("a@b.test", b"Subject: 1\r\n\r\n")
    head = active.fence()
    with pytest.raises(NotMountedError):
        active.deliver("a@b.test", b"Subject: 2\r\n\r\n")
    with pytest.raises(NotMountedError):
        active.expunge("a@b.test", [1])
    # Mounting checks that the copy ends exactly where the old active copy did.
    with pytest.raises(LogIntegrityError):
        passive.mount(head)
    passive.apply(active.entries_after(0, max_bytes=1 << 20))
    passive.mount(head)
    with pytest.raises(NotMountedError):
        passive.apply([])  # even an empty replay is refused once mounted
    with pytest.raises(NotMountedError):
        passive.reset()


def test_redelivery_stores_a_message_once_per_key(tmp_path: Path) -> None:
    active, _ = copies(tmp_path)
    wire = b"Subject: lost\r\n\r\nbody\r\n"
    uid = active.redeliver("mbx1:7:ab", "a@b.test", wire, len(wire), 1.0)
    assert active.redeliver("mbx1:7:ab", "a@b.test", wire, len(wire), 1.0) == uid
    assert [m.uid for m in active.maildrop("a@b.test")] == [uid]


def test_deliveries_after_a_point_are_those_still_present(tmp_path: Path) -> None:
    active, _ = copies(tmp_path)
    active.deliver("a@b.test", b"Subject: 1\r\n\r\n")
    second = active.deliver("a@b.test", b"Subject: 2\r\n\r\n")
    third = active.deliver("a@b.test", b"Subject: 3\r\n\r\n")
    active.expunge("a@b.test", [second])
    assert [e.uid for e in active.delivered_after(1)] == [third]


def test_a_copy_made_before_checksums_gets_its_chain(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE mailboxes (address TEXT PRIMARY KEY, next_uid INTEGER NOT NULL);
        CREATE TABLE messages (address TEXT NOT NULL, uid INTEGER NOT NULL, size INTEGER NOT NULL,
            received REAL NOT NULL, wire BLOB NOT NULL, PRIMARY KEY (address, uid));
        CREATE TABLE change_log (lsn INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,
            kind TEXT NOT NULL, address TEXT NOT NULL, uid INTEGER, size INTEGER, payload BLOB);
        INSERT INTO mailboxes VALUES ('a@b.test', 2);
        INSERT INTO messages VALUES ('a@b.test', 1, 4, 1.0, X'68690D0A');
        INSERT INTO change_log (at, kind, address, uid, size, payload)
            VALUES (1.0, 'deliver', 'a@b.test', 1, 4, X'68690D0A');
        """
    )
    old.close()
    upgraded = MailboxDatabase(path, "DB01")
    assert upgraded.role() == "active"
    (entry,) = upgraded.entries_after(0, max_bytes=1 << 20)
    assert entry.chained_checksum(GENESIS) == entry.checksum
    _, passive = copies(tmp_path)
    passive.apply([entry])
    assert upgraded.deliver("a@b.test", b"Subject: new\r\n\r\n") == 2
