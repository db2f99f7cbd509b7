"""What operators of real mail need from the store: each copy's sizes in its status,
quotas (ProhibitSendReceiveQuota per database and per mailbox), and a full disk that
answers 452 4.3.1 and recovers, against real running services."""

from __future__ import annotations

import asyncio
import contextlib
import json
import smtplib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popguard import paths
from popguard.directory.directory import CopyStatusReport, Directory
from popguard.directory.exchange_values import (
    MAX_BYTE_QUANTIFIED_SIZE,
    format_byte_quantified_size,
    parse_byte_quantified_size,
)
from popguard.errors import UserError
from popguard.health.health_mailboxes import ensure_health_mailboxes
from popguard.net.tls import TlsMaterial
from popguard.pop3.message_format import to_wire
from popguard.replication.peer import ReplicationPeer
from popguard.services.lmtp_client import deliver
from popguard.store.mailbox_database import MailboxDatabase, QuotaExceededError, RestoredMessage
from popguard.testing.organization import popguard, wait_until

from .conftest import Organization, message, running_organization
from .test_frontend import login

MB = 1024 * 1024


async def usage_of(org: Organization, server: str) -> dict[str, tuple[int, int]]:
    """Each mailbox's (count, octets) in `server`'s copy of DB01, as its replication
    service answers the operator (what get-mailbox asks)."""
    material = TlsMaterial.of(org.data)
    context = material.mutual_client_context(material.admin_identity())
    with Directory(org.data) as directory:
        peer = ReplicationPeer(directory.get_server(server), context)
    async with peer:
        return await peer.usage("DB01")


def wait_passive_healthy(org: Organization) -> None:
    wait_until(
        "DB01's passive copy to be healthy",
        lambda: any(
            r["Name"] == "DB01\\mbx2" and r["Status"] == "Healthy"
            for r in cli_json(org, "get-mailboxdatabasecopystatus")
        ),
        30,
    )


# The size syntax ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "octets"),
    [
        ("50MB", 50 * MB),
        ("50 mb", 50 * MB),
        ("1.5GB", 1536 * MB),
        ("1.1MB", 1153433),
        ("100KB", 102400),
        ("12345", 12345),
        ("12345B", 12345),
        ("2.3 GB (2,469,606,195 bytes)", 2469606195),
        ("Unlimited", None),
        ("unlimited", None),
    ],
)
def test_exchange_sizes_parse(text: str, octets: int | None) -> None:
    assert parse_byte_quantified_size(text, "--q") == octets


@pytest.mark.parametrize("text", ["", "MB", "-5MB", "5 XB", "1.2.3GB", "5 MB (12 bytes", "2000TB"])
def test_bad_sizes_are_refused_naming_the_option(text: str) -> None:
    with pytest.raises(UserError, match="--q"):
        parse_byte_quantified_size(text, "--q")


@given(st.one_of(st.none(), st.integers(0, MAX_BYTE_QUANTIFIED_SIZE)))
def test_a_size_as_shown_parses_back_to_itself(octets: int | None) -> None:
    assert parse_byte_quantified_size(format_byte_quantified_size(octets), "x") == octets


@given(st.text(max_size=40))
def test_any_text_is_a_size_or_a_user_error(text: str) -> None:
    try:
        octets = parse_byte_quantified_size(text, "x")
    except UserError:
        return
    assert octets is None or 0 <= octets <= MAX_BYTE_QUANTIFIED_SIZE


# The store ----------------------------------------------------------------------------------


def test_the_quota_is_checked_in_the_writing_transaction(tmp_path: Path) -> None:
    store = MailboxDatabase(tmp_path / "DB01.sqlite", "DB01")
    first = message("first", size=3000)
    store.deliver("a@b.test", first, quota=10_000)
    used = store.usage("a@b.test").octets
    assert 2900 < used <= 3000
    with pytest.raises(QuotaExceededError) as refused:
        store.deliver("a@b.test", message("second", size=9000), quota=10_000)
    assert refused.value.used == used and refused.value.quota == 10_000
    assert store.usage("a@b.test").items == 1  # nothing of the refused one was written
    store.deliver("a@b.test", message("second", size=9000))  # no quota: it goes in
    sizes = store.sizes()
    assert sizes.message_bytes == store.usage("a@b.test").octets
    assert sizes.file_bytes > sizes.message_bytes and sizes.log_bytes > 0


def test_a_restore_stores_only_what_the_mailbox_lacks_all_or_nothing(tmp_path: Path) -> None:
    store = MailboxDatabase(tmp_path / "DB01.sqlite", "DB01")
    # Same size, other octets: told apart by their digest, not their size.
    contents = [message(f"same size {n}", size=3000) for n in range(4)]
    uids = [store.deliver("a@b.test", content) for content in contents]
    backup = [
        RestoredMessage(wire, info.size, info.received)
        for info in store.maildrop("a@b.test")
        if (wire := store.wire("a@b.test", info.uid)) is not None
    ]
    store.expunge("a@b.test", uids[1:3])
    kept = store.usage("a@b.test")
    missing = sum(m.size for m in backup[1:3])
    with pytest.raises(QuotaExceededError) as refused:
        store.restore("a@b.test", backup, quota=kept.octets + missing - 1)
    assert (refused.value.used, refused.value.size) == (kept.octets, missing)
    assert store.usage("a@b.test") == kept  # nothing of it was written
    done = store.restore("a@b.test", backup, quota=kept.octets + missing)  # fits exactly
    assert (done.restored, done.already_there, done.octets) == (2, 2, missing)
    assert store.restore("a@b.test", backup, quota=0).restored == 0  # nothing to add
    # A backup holding one message twice gives the second back when one is left.
    assert store.restore("a@b.test", [backup[0], backup[0]]).restored == 1
    assert store.usage("a@b.test").items == 5
    assert store.verify() == []


# Sizes and quotas under real services ----------------------------------------------------------


def cli_json(org: Organization, *args: str) -> list[dict[str, object]]:
    result = popguard(org.data, *args, "--format", "json")
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, object]] = json.loads(result.stdout)
    return rows


def lmtp_session(org: Organization, server: str) -> smtplib.LMTP:
    mbx = org.mailbox[server]
    client = smtplib.LMTP(timeout=30)
    client.connect(mbx.address, mbx.lmtp_port)
    client.ehlo("test.example")
    client.mail("sender@example.test")
    return client


def try_delivery(
    org: Organization, recipient: str, content: bytes, server: str = "mbx1"
) -> tuple[str, int, bytes]:
    """("RCPT" or "DATA", code, text) of the reply that decided the delivery."""
    with contextlib.closing(lmtp_session(org, server)) as client:
        code, text = client.rcpt(recipient)
        if code != 250:
            return "RCPT", code, text
        code, text = client.data(content)
        return "DATA", code, text


def test_each_copy_shows_its_sizes(replicated_organization: Organization) -> None:
    org = replicated_organization
    user = org.add_mailbox("ann@example.test")
    for n in range(5):
        org.deliver(user, message(f"sized {n}", size=40_000))
    store = MailboxDatabase(
        paths.server_folder(org.data, "mbx1").database_copy_file("DB01"), "DB01"
    )
    try:
        live = store.usage(user).octets
    finally:
        store.close()

    def measured() -> bool:
        rows = {r["Name"]: r for r in cli_json(org, "get-mailboxdatabasecopystatus")}
        return all(rows[f"DB01\\{s}"]["MessageBytes"] == live for s in ("mbx1", "mbx2"))

    wait_until("both copies of DB01 to report their sizes", measured, 30)
    for row in cli_json(org, "get-mailboxdatabase", "DB01"):
        assert row["MessageBytes"] == live
        assert isinstance(row["DatabaseSize"], int) and row["DatabaseSize"] > live
        assert isinstance(row["LogBytes"], int) and 0 < row["LogBytes"] < live
        assert row["ProhibitSendReceiveQuota"] == "Unlimited"
    # What get-mailbox asks a copy's replication service from a host with no copy.
    assert asyncio.run(usage_of(org, "mbx2")) == {user: (5, live)}


def test_a_mailbox_over_its_quota_refuses_mail_with_the_right_code(
    organization: Organization,
) -> None:
    org = organization
    user = org.add_mailbox("zoe@example.test")
    other = org.add_mailbox("max@example.test")
    shown = cli_json(org, "set-mailboxdatabase", "DB01", "--prohibit-send-receive-quota", "100KB")
    assert {r["ProhibitSendReceiveQuota"] for r in shown} == {"100 KB (102,400 bytes)"}
    org.deliver(user, message("fits", size=60_000))
    # The next would go over: refused at DATA, and nothing is stored.
    stage, code, text = try_delivery(org, user, message("too much", size=60_000))
    assert (stage, code) == ("DATA", 552) and text.startswith(b"5.2.2"), text
    assert b"mailbox full" in text
    # A small one still fits.
    stage, code, _ = try_delivery(org, user, message("small", size=30_000))
    assert (stage, code) == ("DATA", 250)
    # Full to the quota: refused at RCPT already.
    popguard(org.data, "set-mailbox", user, "--prohibit-send-receive-quota", "80000")
    stage, code, text = try_delivery(org, user, message("tiny"))
    assert (stage, code) == ("RCPT", 552) and text.startswith(b"5.2.2"), text
    # Through the other mailbox server: handed over to mbx1, whose refusal is relayed.
    stage, code, text = try_delivery(org, user, message("tiny"), "mbx2")
    assert (stage, code) == ("DATA", 552) and text.startswith(b"5.2.2"), text
    # Only this mailbox has its own quota: the other still has the database's.
    (row,) = cli_json(org, "get-mailbox", user)
    assert row["UseDatabaseQuotaDefaults"] is False
    assert row["ProhibitSendReceiveQuota"] == "78.12 KB (80,000 bytes)"
    assert row["ItemCount"] == 2
    client = login(org, user)
    octets = client.stat()[1]
    client.quit()
    assert row["TotalItemSize"] == format_byte_quantified_size(octets)
    (row,) = cli_json(org, "get-mailbox", other)
    assert row["UseDatabaseQuotaDefaults"] is True and row["ItemCount"] == 0
    assert row["ProhibitSendReceiveQuota"] == "100 KB (102,400 bytes)"
    # The setting: a temporary refusal instead, so the MTA keeps the message.
    (org.data / "popguard.toml").write_text("[delivery]\nquota_full_tempfail = true\n")
    stage, code, text = try_delivery(org, user, message("tiny"))
    assert (stage, code) == ("RCPT", 452) and text.startswith(b"4.2.2"), text
    # Unlimited, and back to the database's default.
    popguard(org.data, "set-mailbox", user, "--prohibit-send-receive-quota", "unlimited")
    assert try_delivery(org, user, message("now it fits", size=60_000))[1] == 250
    popguard(org.data, "set-mailbox", user, "--use-database-quota-defaults", "true")
    (row,) = cli_json(org, "get-mailbox", user)
    assert row["UseDatabaseQuotaDefaults"] is True and row["ItemCount"] == 3


def test_bad_quota_values_get_one_line(organization: Organization) -> None:
    org = organization
    user = org.add_mailbox("bad@example.test")
    for args in (
        ("set-mailbox", user, "--prohibit-send-receive-quota", "lots"),
        ("set-mailboxdatabase", "DB01", "--prohibit-send-receive-quota", "-1"),
        ("set-mailbox", user),
        ("set-mailbox", user, "--use-database-quota-defaults", "maybe"),
    ):
        result = popguard(org.data, *args)
        assert result.returncode == 1, args
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# A full disk --------------------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `folder` (the test runs as root), unmounted after."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_answers_452_and_delivery_recovers_when_space_returns(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    databases = paths.server_folder(data, "mbx1").database_copy_file("DB01").parent
    with small_filesystem(databases, "1m"), running_organization(data) as org:
        user = org.add_mailbox("full@example.test")
        acknowledged: list[str] = []
        refusal = None
        for n in range(100):  # 1 MB holds far fewer than 100 messages of 30 kB
            subject = f"filling {n}"
            _, code, text = try_delivery(org, user, message(subject, size=30_000))
            if code != 250:
                refusal = (code, text)
                break
            acknowledged.append(subject)
        assert refusal is not None, "the disk never filled"
        code, text = refusal
        assert code == 452 and text.startswith(b"4.3.1") and b"mail system full" in text, text
        assert acknowledged, "not one message fitted"
        # The service is still there, and answers the same while the disk is full.
        assert try_delivery(org, user, message("still full", size=30_000))[1] == 452
        # Space returns: delivery works again, with no restart.
        subprocess.run(["mount", "-o", "remount,size=16m", str(databases)], check=True)
        assert try_delivery(org, user, message("after", size=30_000))[1] == 250
        # Every acknowledged message is there, and the refused ones are not.
        client = login(org, user)
        try:
            count = len(client.list()[1])
            subjects = [
                next(
                    line.decode()[len("Subject: ") :]
                    for line in client.top(n, 0)[1]
                    if line.startswith(b"Subject: ")
                )
                for n in range(1, count + 1)
            ]
        finally:
            client.quit()
        assert subjects == [*acknowledged, "after"]


# Backups --------------------------------------------------------------------------------------

SENDER = "sender@example.test"


class RecordingLoad(threading.Thread):
    """Delivers numbered messages one after another through LMTP until stopped, keeping
    the content of each one acknowledged (bounded in count and time)."""

    def __init__(self, data: Path, recipient: str, count: int) -> None:
        super().__init__(daemon=True)
        self.data, self.recipient, self.count = data, recipient, count
        self.acknowledged: dict[str, bytes] = {}  # subject -> what was delivered
        self.refusals: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 60
        with Directory(self.data) as directory:
            number = 0
            while number < self.count and time.monotonic() < deadline and not self.stop.is_set():
                subject = f"backed-up {number}"
                content = message(subject, size=2000 + 97 * number)
                result = deliver(directory, self.recipient, content, SENDER)
                if result.code == 250:
                    self.acknowledged[subject] = content
                    number += 1
                else:
                    self.refusals.append(result.reply)
                    time.sleep(0.05)


def stored_form(content: bytes) -> bytes:
    """What the store holds for `content` delivered by SENDER (its wire form)."""
    return to_wire(f"Return-Path: <{SENDER}>\r\n".encode() + content)[0]


def one_line_error(result: subprocess.CompletedProcess[str], words: str) -> None:
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr


def test_a_backup_taken_during_deliveries_restores_with_every_message_intact(
    replicated_organization: Organization, tmp_path: Path
) -> None:
    org = replicated_organization
    user = org.add_mailbox("kept@example.test")
    load = RecordingLoad(org.data, user, 5000)
    load.start()
    wait_until("30 deliveries", lambda: len(load.acknowledged) >= 30, 60)
    before = set(load.acknowledged)
    # A 250 is on the active copy; the passive one the backup comes from follows within
    # milliseconds. Once it reports the active copy's LSN of now, it holds `before`.
    active = MailboxDatabase(
        paths.server_folder(org.data, "mbx1").database_copy_file("DB01"), "DB01"
    )
    try:
        head = active.last_lsn()
    finally:
        active.close()

    def passive_has_them() -> bool:
        rows = {r["Name"]: r for r in cli_json(org, "get-mailboxdatabasecopystatus")}
        lsn = rows["DB01\\mbx2"]["LogSequenceNumber"]
        return isinstance(lsn, int) and lsn >= head

    wait_until("DB01\\mbx2 to apply what was acknowledged", passive_has_them, 30)
    backup = tmp_path / "DB01.backup"
    (taken,) = cli_json(org, "backup-mailboxdatabase", "DB01", "--out", str(backup))
    during = len(load.acknowledged)
    wait_until("10 more deliveries", lambda: len(load.acknowledged) >= during + 10, 30)
    load.stop.set()
    load.join(30)
    assert not load.refusals, load.refusals  # the backup held up no delivery
    assert len(before) < during, "no delivery was acknowledged while the backup was taken"
    assert taken["Server"] == "mbx2"  # the healthy passive copy, sparing the active one
    assert backup.stat().st_mode & 0o077 == 0
    recovery = tmp_path / "recovery.sqlite"
    (restored,) = cli_json(
        org, "restore-mailboxdatabase", str(backup), "--recovery-database", str(recovery)
    )
    assert (
        restored["Checks"] == "passed"
        and restored["LogSequenceNumber"] == taken["LogSequenceNumber"]
    )
    store = MailboxDatabase(recovery, "DB01")
    try:
        assert store.verify() == []
        held = {m.uid: store.wire(user, m.uid) for m in store.maildrop(user)}
    finally:
        store.close()
    by_form = {stored_form(content): subject for subject, content in load.acknowledged.items()}
    subjects = [by_form.get(wire or b"") for wire in held.values()]
    assert None not in subjects, "a message in the backup is not one that was delivered"
    assert len(set(subjects)) == len(subjects)
    assert before <= set(subjects), "a message acknowledged before the backup is missing"

    # One mailbox back into service, into another mailbox here; twice stores once.
    again = org.add_mailbox("again@example.test")
    (first,) = cli_json(
        org, "restore-mailbox", again, "--from", str(recovery), "--source-address", user
    )
    assert first["Restored"] == len(held) and first["AlreadyThere"] == 0
    (second,) = cli_json(
        org, "restore-mailbox", again, "--from", str(recovery), "--source-address", user
    )
    assert second["Restored"] == 0 and second["AlreadyThere"] == len(held)
    client = login(org, again)
    try:
        count = len(client.list()[1])
        fetched = [b"\r\n".join(client.retr(n)[1]) + b"\r\n" for n in range(1, count + 1)]
    finally:
        client.quit()
    assert sorted(fetched) == sorted(wire for wire in held.values() if wire is not None)


def test_a_bad_backup_gets_one_line_and_exit_1(
    replicated_organization: Organization, tmp_path: Path
) -> None:
    org = replicated_organization
    user = org.add_mailbox("few@example.test")
    for n in range(3):
        org.deliver(user, message(f"few {n}", size=5000))
    wait_passive_healthy(org)
    backup = tmp_path / "good.backup"
    cli_json(org, "backup-mailboxdatabase", "DB01", "--out", str(backup))
    one_line_error(
        popguard(org.data, "backup-mailboxdatabase", "DB01", "--out", str(backup)), "exists already"
    )
    good = backup.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) - 3000] ^= 0x40
    cases = {
        "flipped.backup": (bytes(flipped), "fails the SHA-256"),
        "short.backup": (good[: len(good) // 2], "cut short"),
        "other.backup": (b"SQLite format 3\0" + good[200:], "not a popguard backup"),
        "header.backup": (b'POPGUARD-BACKUP 1 {"database": 1}\n', "header is damaged"),
    }
    for name, (content, words) in cases.items():
        (tmp_path / name).write_bytes(content)
        recovery = tmp_path / f"{name}.sqlite"
        result = popguard(
            org.data,
            "restore-mailboxdatabase",
            str(tmp_path / name),
            "--recovery-database",
            str(recovery),
        )
        one_line_error(result, words)
        assert not recovery.exists() and not list(tmp_path.glob("*.partial"))
    one_line_error(
        popguard(
            org.data,
            "restore-mailboxdatabase",
            str(tmp_path / "absent"),
            "--recovery-database",
            str(tmp_path / "r.sqlite"),
        ),
        "No such file",
    )
    one_line_error(
        popguard(org.data, "restore-mailbox", user, "--from", str(tmp_path / "no.sqlite")),
        "no recovery database",
    )


def mailbox_over_pop3(org: Organization, user: str) -> tuple[list[str], list[int]]:
    """The subject and size of each message, in order, as POP3 shows them."""
    client = login(org, user)
    try:
        sizes = [int(line.split()[1]) for line in client.list()[1]]
        subjects = [
            next(
                line.decode()[len("Subject: ") :]
                for line in client.top(n, 0)[1]
                if line.startswith(b"Subject: ")
            )
            for n in range(1, len(sizes) + 1)
        ]
    finally:
        client.quit()
    return subjects, sizes


def delete_over_pop3(org: Organization, user: str, numbers: list[int]) -> None:
    client = login(org, user)
    for n in numbers:
        client.dele(n)
    client.quit()


def test_a_restore_gives_back_only_what_the_mailbox_lost_and_keeps_to_its_quota(
    replicated_organization: Organization, tmp_path: Path
) -> None:
    org = replicated_organization
    user = org.add_mailbox("lost@example.test")
    backed_up = [f"kept {n}" for n in range(6)]
    for subject in backed_up:  # all of one size: told apart by their octets
        org.deliver(user, message(subject, size=5000))
    wait_passive_healthy(org)
    backup, recovery = tmp_path / "DB01.backup", tmp_path / "RDB01.sqlite"
    cli_json(org, "backup-mailboxdatabase", "DB01", "--out", str(backup))
    cli_json(org, "restore-mailboxdatabase", str(backup), "--recovery-database", str(recovery))
    # The user keeps three, deletes three, and gets a new one after the backup.
    delete_over_pop3(org, user, [1, 3, 5])
    org.deliver(user, message("after the backup", size=5000))
    (first,) = cli_json(org, "restore-mailbox", user, "--from", str(recovery))
    assert (first["ItemCount"], first["Restored"], first["AlreadyThere"]) == (6, 3, 3)
    subjects, sizes = mailbox_over_pop3(org, user)
    assert sorted(subjects) == sorted([*backed_up, "after the backup"])
    (second,) = cli_json(org, "restore-mailbox", user, "--from", str(recovery))
    assert (second["Restored"], second["AlreadyThere"]) == (0, 6)
    assert len(mailbox_over_pop3(org, user)[0]) == 7
    # Written like a delivery: the passive copy holds the restored messages too.
    wait_until(
        "DB01\\mbx2 to hold the restored messages",
        lambda: asyncio.run(usage_of(org, "mbx2")).get(user) == (7, sum(sizes)),
        30,
    )

    # Three go again; a quota one octet short of giving them back refuses the restore.
    delete_over_pop3(org, user, [1, 2, 3])
    before = mailbox_over_pop3(org, user)
    needed, used = sum(sizes[:3]), sum(before[1])
    quota = used + needed - 1
    popguard(org.data, "set-mailbox", user, "--prohibit-send-receive-quota", str(quota))
    refused = popguard(org.data, "restore-mailbox", user, "--from", str(recovery))
    one_line_error(refused, "ProhibitSendReceiveQuota")
    for words in (format_byte_quantified_size(quota), format_byte_quantified_size(needed),
                  "--ignore-quota"):  # fmt: skip
        assert words in refused.stderr, refused.stderr
    assert mailbox_over_pop3(org, user) == before  # nothing of it was stored
    (forced,) = cli_json(org, "restore-mailbox", user, "--from", str(recovery), "--ignore-quota")
    assert (forced["Restored"], forced["AlreadyThere"]) == (3, 3)
    assert sorted(mailbox_over_pop3(org, user)[0]) == sorted([*backed_up, "after the backup"])

    # Bad input: one line, exit 1.
    one_line_error(
        popguard(org.data, "restore-mailbox", "nobody@example.test", "--from", str(recovery)),
        "nobody@example.test",
    )
    other = org.add_mailbox("other@example.test")
    one_line_error(
        popguard(org.data, "restore-mailbox", other, "--from", str(recovery)),
        "holds no message of other@example.test",
    )
    one_line_error(
        popguard(org.data, "restore-mailbox", user, "--from", str(backup)),
        "not a mailbox database",
    )


def test_quotas_and_sizes_in_the_directory_on_both_engines(directory_data: Path) -> None:
    with Directory(directory_data) as directory:
        directory.new_server("mbx1", ["mailbox"], "127.0.0.1")
        directory.new_database("DB01", "mbx1")
        mailbox = directory.new_mailbox("q@example.test", "DB01", "x")
        assert directory.mailbox_quota(mailbox) is None  # Unlimited by default
        directory.set_database_quota("db01", 5 * MB)
        assert directory.mailbox_quota(directory.get_mailbox("q@example.test")) == 5 * MB
        own = directory.set_mailbox_quota("Q@example.test", False, MB)
        assert not own.use_database_quota_defaults and directory.mailbox_quota(own) == MB
        unlimited = directory.set_mailbox_quota("q@example.test", False, None)
        assert directory.mailbox_quota(unlimited) is None
        back = directory.set_mailbox_quota("q@example.test", True, None)
        assert directory.mailbox_quota(back) == 5 * MB
        with pytest.raises(UserError):
            directory.set_mailbox_quota("nobody@example.test", True, None)
        with pytest.raises(UserError):
            directory.set_database_quota("DB99", MB)

        def report(sizes: tuple[int, int, int] | None) -> CopyStatusReport:
            measured = sizes or (None, None, None)
            return CopyStatusReport("DB01", "mbx1", "Mounted", 0, 0, 7, None, None,
                                    time.time(), *measured)  # fmt: skip

        directory.report_copy_status(report((3000, 2000, 100)))
        directory.report_copy_status(report(None))  # a report without sizes keeps them
        kept = directory.copy_status_reports()[("DB01", "mbx1")]
        assert (kept.database_size, kept.message_bytes, kept.log_bytes) == (3000, 2000, 100)


def test_health_mailboxes_are_not_held_to_the_database_quota(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Directory(data) as directory:
        directory.new_server("mbx1", ["mailbox"], "127.0.0.1")
        directory.new_database("DB01", "mbx1")
        directory.set_database_quota("DB01", 1024)
        credentials = ensure_health_mailboxes(directory, data)
        probe = directory.get_mailbox(credentials["db01"].address)
        assert not probe.use_database_quota_defaults
        assert directory.mailbox_quota(probe) is None
