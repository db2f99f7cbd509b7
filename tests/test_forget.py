"""Deleted means gone, and a store that stays small, with real processes: mail delivered
over LMTP, read and deleted over POP3 through the front end, then looked for in the
bytes of every file of the data folder; a copy too far behind is suspended and
reseeded from a snapshot."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from popguard import paths
from popguard.store.mailbox_database import MailboxDatabase
from popguard.testing.organization import popguard

from .conftest import Organization, running_organization
from .test_frontend import login
from .test_replication import caught_up, failover_loses_nothing, stored, wait_for

MESSAGES = 300
MESSAGE_SIZE = 50_000


@contextlib.contextmanager
def forgetful_organization(tmp_path: Path, store: str) -> Iterator[Organization]:
    """A replicated organization whose popguard.toml has this [store] section."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    config = data / "popguard.toml"
    config.write_text(f"[store]\n{store}\n")
    config.chmod(0o600)
    with running_organization(data, replication=True) as org:
        yield org


def with_word(word: str, size: int = 20_000) -> bytes:
    head = f"From: s@example.test\r\nTo: u@example.test\r\nSubject: {word}\r\n\r\n"
    line = b"filler " * 10 + b"\r\n"
    return head.encode() + f"The secret is {word}.\r\n".encode() + line * (size // len(line))


def files_holding(data: Path, words: list[str]) -> dict[str, list[str]]:
    """word -> the files under `data` whose bytes contain it (grep -rl, in Python)."""
    found: dict[str, list[str]] = {word: [] for word in words}
    for path in data.rglob("*"):
        if not path.is_file():
            continue
        try:
            content = path.read_bytes()
        except FileNotFoundError:  # a WAL truncated or a temporary file gone meanwhile
            continue
        for word in words:
            if word.encode() in content:
                found[word].append(str(path.relative_to(data)))
    return found


def db01_sizes(org: Organization) -> dict[str, int]:
    """The octets of DB01's files (database, -wal, -shm, any other) on each server."""
    sizes = {}
    for server in ("mbx1", "mbx2"):
        folder = paths.server_folder(org.data, server).database_copy_file("DB01").parent
        sizes[server] = sum(f.stat().st_size for f in folder.glob("DB01*") if f.is_file())
    return sizes


@pytest.mark.timeout(300)
def test_deleted_mail_is_in_no_file_of_any_copy(tmp_path: Path) -> None:
    with forgetful_organization(tmp_path, "forget_interval = 1") as org:
        user = org.add_mailbox("ann@example.test")
        leaving = org.add_mailbox("bob@example.test")
        words = [f"forgetme{secrets.token_hex(8)}" for _ in range(3)]
        kept, removed_word = f"keepme{secrets.token_hex(8)}", f"removeme{secrets.token_hex(8)}"
        for word in words:
            org.deliver(user, with_word(word))
        org.deliver(user, with_word(kept))
        org.deliver(leaving, with_word(removed_word))
        wait_for(caught_up(org, "DB01"), "DB01's copies to agree")
        # The search finds mail where it is: in both copies, before anything is deleted.
        before = files_holding(org.data, [*words, kept])
        for word in (*words, kept):
            assert any("servers/mbx2/" in f for f in before[word]), (word, before[word])
            assert any("servers/mbx1/" in f for f in before[word]), (word, before[word])

        client = login(org, user)
        count, _ = client.stat()
        assert count == 4
        for number in range(1, 4):
            assert words[number - 1].encode() in b"\r\n".join(client.retr(number)[1])
            client.dele(number)
        client.quit()
        removed = popguard(org.data, "remove-mailbox", leaving, "--no-confirm")
        assert removed.returncode == 0, removed.stderr

        gone = [*words, removed_word]
        wait_for(
            lambda: not any(files_holding(org.data, gone).values()),
            "the deleted words to leave every file",
            timeout=90,
        )
        still = files_holding(org.data, [kept])[kept]
        assert any("servers/mbx1/" in f for f in still) and any("servers/mbx2/" in f for f in still)


@pytest.mark.timeout(300)
def test_the_database_files_come_back_down_after_reading_and_deleting(tmp_path: Path) -> None:
    """The issue's scenario: 300 messages of 50 kB (15.4 MB) made DB01's files on the
    two servers 70.4 MB, and 98.9 MB after all were read and deleted."""
    with forgetful_organization(tmp_path, "forget_interval = 1") as org:
        user = org.add_mailbox("carl@example.test")
        body = with_word("bulk", MESSAGE_SIZE)
        for _ in range(MESSAGES):
            org.deliver(user, body)
        wait_for(caught_up(org, "DB01"), "DB01's copies to agree", timeout=120)
        live = MESSAGES * len(body)
        delivered = db01_sizes(org)
        # One copy of each message per copy (none in the log): at most 1.4 times the mail.
        for server, size in delivered.items():
            assert size < 1.4 * live, (server, size, live)

        client = login(org, user)
        count, _ = client.stat()
        assert count == MESSAGES
        for number in range(1, count + 1):
            client.retr(number)
            client.dele(number)
        client.quit()
        wait_for(caught_up(org, "DB01"), "the deletions to reach both copies")
        # Both copies together under 2 MB (was 98.9 MB), however long forgetting takes.
        wait_for(
            lambda: sum(db01_sizes(org).values()) < 2_000_000,
            f"DB01's files to shrink (now {db01_sizes(org)})",
            timeout=90,
        )


@pytest.mark.timeout(300)
def test_a_copy_too_far_behind_is_suspended_then_reseeded_from_a_snapshot(
    tmp_path: Path,
) -> None:
    with forgetful_organization(
        tmp_path, "forget_interval = 1\nmax_copy_lag_bytes = 200000"
    ) as org:
        user = org.add_mailbox("dan@example.test")
        org.deliver(user, with_word("before"))
        wait_for(caught_up(org, "DB01"), "DB01's copies to agree")
        mbx2 = org.mailbox["mbx2"]
        mbx2.kill("replication")
        for number in range(12):  # 12 x 20 kB: over the 200,000 octets allowed behind
            org.deliver(user, with_word(f"while-away-{number}"))

        def suspended() -> bool:
            shown = popguard(org.data, "get-mailboxdatabasecopystatus", "--format", "json")
            rows = {row["Name"]: row for row in json.loads(shown.stdout)}
            row = rows["DB01\\mbx2"]
            return bool(
                row["Status"] == "FailedAndSuspended"
                and "max_copy_lag_bytes" in row["ErrorMessage"]
            )

        wait_for(suspended, "DB01\\mbx2 to be suspended for a reseed", timeout=60)
        active_file = paths.server_folder(org.data, "mbx1").database_copy_file("DB01")

        def trimmed_past_mbx2() -> bool:
            store = MailboxDatabase(active_file, "DB01")
            try:
                return store.base().lsn > 1
            finally:
                store.close()

        wait_for(trimmed_past_mbx2, "the active copy's log to be trimmed past mbx2")

        mbx2.start("replication")
        wait_for(caught_up(org, "DB01"), "mbx2's copy to be reseeded and catch up", timeout=90)
        assert "seeded from mbx1's snapshot" in mbx2.log_text("replication")
        assert stored(org, "mbx2", "DB01", user) == stored(org, "mbx1", "DB01", user)
        assert len(stored(org, "mbx2", "DB01", user)) == 13
        # No snapshot or seeding file stays behind on either server.
        leftovers = [
            p.name
            for server in ("mbx1", "mbx2")
            for p in paths.server_folder(org.data, server)
            .database_copy_file("DB01")
            .parent.iterdir()
            if ".snapshot-" in p.name or ".seeding" in p.name
        ]
        assert leftovers == []


@pytest.mark.timeout(300)
def test_failover_loses_nothing_while_logs_are_trimmed_every_second(tmp_path: Path) -> None:
    """Trimming must keep, on both sides, what finding the parting point and giving
    back the old active copy's own messages needs."""
    with forgetful_organization(tmp_path, "forget_interval = 1") as org:
        failover_loses_nothing(org)
        for server in ("mbx1", "mbx2"):
            file = paths.server_folder(org.data, server).database_copy_file("DB01")
            store = MailboxDatabase(file, "DB01")
            try:
                assert store.base().lsn > 0, server  # trimming did run meanwhile
            finally:
                store.close()


def suspend_mbx2(org: Organization, user: str, messages: int) -> None:
    """Stop mbx2's replication and deliver enough that the active copy suspends it."""
    org.mailbox["mbx2"].kill("replication")
    for number in range(messages):
        org.deliver(user, with_word(f"while-away-{number}", MESSAGE_SIZE))

    def suspended() -> bool:
        with org.directory() as directory:
            report = directory.copy_status_reports().get(("DB01", "mbx2"))
        return report is not None and report.status == "FailedAndSuspended"

    wait_for(suspended, "DB01\\mbx2 to be suspended for a reseed", timeout=60)


def leftovers(org: Organization) -> list[str]:
    return [
        f"{server}/{p.name}"
        for server in ("mbx1", "mbx2")
        for p in paths.server_folder(org.data, server).database_copy_file("DB01").parent.iterdir()
        if ".snapshot-" in p.name or ".seeding" in p.name
    ]


def wait_for_seeding(org: Organization, server: str) -> None:
    """Until mbx2 says it is seeding (the kill that follows lands while it downloads,
    loads or has just loaded the snapshot: each must come out whole)."""
    log = org.mailbox[server].logs["replication"]
    wait_for(
        lambda: "seeding from a snapshot" in log.read_text(errors="replace")
        or (paths.server_folder(org.data, server).database_copy_file("DB01").parent
            / "DB01.seeding").exists(),
        f"{server} to start seeding",
        timeout=60,
    )  # fmt: skip


@pytest.mark.timeout(300)
@pytest.mark.parametrize("killed", ["mbx2", "mbx1"])
def test_kill_9_during_seeding_leaves_no_half_copy_and_seeding_starts_again(
    tmp_path: Path, killed: str
) -> None:
    with forgetful_organization(
        tmp_path, "forget_interval = 1\nmax_copy_lag_bytes = 200000"
    ) as org:
        user = org.add_mailbox("erin@example.test")
        org.deliver(user, with_word("first"))
        wait_for(caught_up(org, "DB01"), "DB01's copies to agree")
        before = stored(org, "mbx2", "DB01", user)
        suspend_mbx2(org, user, messages=200)  # 10 MB to snapshot and ship
        mbx2 = org.mailbox["mbx2"]
        mbx2.logs["replication"].write_text("")
        mbx2.start("replication")
        wait_for_seeding(org, "mbx2")
        org.mailbox[killed].kill("replication")
        if killed == "mbx2":
            # Never half seeded: as it was, or the whole snapshot.
            now = stored(org, "mbx2", "DB01", user)
            assert now == before or len(now) == 201, (len(before), len(now))
        org.mailbox[killed].start("replication")
        wait_for(caught_up(org, "DB01"), "mbx2's copy to be seeded after all", timeout=120)
        assert stored(org, "mbx2", "DB01", user) == stored(org, "mbx1", "DB01", user)
        assert len(stored(org, "mbx2", "DB01", user)) == 201
        wait_for(lambda: leftovers(org) == [], f"no snapshot file left ({leftovers(org)})")
