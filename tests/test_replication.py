"""Database copies as real processes: replication, switchover, whole-server moves,
failover after kill -9, and what a copy does with a bad peer."""

from __future__ import annotations

import json
import poplib
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from popguard import paths
from popguard.directory.directory import Directory
from popguard.errors import UserError
from popguard.replication.copy_status_rows import status_rows
from popguard.services.lmtp_client import deliver
from popguard.store.mailbox_database import MailboxDatabase
from popguard.testing.organization import popguard, popguard_output

from .conftest import Organization, message
from .test_frontend import login

LOAD_SECONDS = 60.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def copy_status(org: Organization, identity: str) -> dict[str, object]:
    with org.directory() as directory:
        (row,) = status_rows(directory, None, identity)
    return row


def caught_up(org: Organization, database: str) -> Callable[[], bool]:
    """Every passive copy of `database` reports Healthy at the LSN the active copy's
    file holds now (reports can lag by a second, the file cannot)."""

    def check() -> bool:
        with org.directory() as directory:
            rows = [r for r in status_rows(directory, None, None) if r["Name"].startswith(database)]
            active = directory.active_server(database)
        store = MailboxDatabase(
            paths.server_folder(org.data, active).database_copy_file(database), database
        )
        try:
            head = store.last_lsn()
        finally:
            store.close()
        return all(
            r["Status"] == "Healthy" and r["LogSequenceNumber"] == head
            for r in rows
            if r["ActiveDatabaseCopy"] != r["Name"].split("\\")[1]
        )

    return check


def subjects_through_frontend(org: Organization, user: str) -> tuple[list[str], list[bytes]]:
    """Every message's Subject and the UIDL list, read through the front end."""
    client = login(org, user)
    try:
        uidls = client.uidl()[1]
        subjects = []
        for number in range(1, len(uidls) + 1):
            head = b"\r\n".join(client.top(number, 0)[1]).decode()
            found = re.search(r"^Subject: (.*)$", head, re.MULTILINE)
            subjects.append(found.group(1).strip() if found else "")
        return subjects, uidls
    finally:
        client.quit()


def stored(org: Organization, server: str, database: str, user: str) -> list[tuple[int, bytes]]:
    store = MailboxDatabase(
        paths.server_folder(org.data, server).database_copy_file(database), database
    )
    try:
        return [(m.uid, store.wire(user, m.uid) or b"") for m in store.maildrop(user)]
    finally:
        store.close()


class DeliveryLoad(threading.Thread):
    """Delivers "load-N" messages one after another through LMTP to whichever server
    the directory names, retrying each until it is acknowledged (bounded in count and time)."""

    def __init__(self, data: Path, recipient: str, count: int, pace: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.data, self.recipient, self.count, self.pace = data, recipient, count, pace
        self.acknowledged: dict[int, int] = {}  # N -> attempts it took
        self.refusals: Counter[str] = Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + LOAD_SECONDS
        directory = Directory(self.data)
        number, attempts = 0, 0
        while number < self.count and time.monotonic() < deadline and not self.stop.is_set():
            attempts += 1
            try:
                result = deliver(directory, self.recipient, message(f"load-{number}"))
            except UserError:
                self.refusals["unreachable"] += 1
                time.sleep(0.05)
                continue
            if result.code == 250:
                self.acknowledged[number] = attempts
                number, attempts = number + 1, 0
                time.sleep(self.pace)
            else:
                self.refusals[str(result.code)] += 1
                time.sleep(0.05)
        directory.close()

    def wait_for(self, acknowledged: int) -> None:
        wait_for(lambda: len(self.acknowledged) >= acknowledged, f"{acknowledged} deliveries")

    def finish(self) -> None:
        self.join(LOAD_SECONDS + 10)
        assert len(self.acknowledged) == self.count, (self.acknowledged, self.refusals)


def test_the_passive_copy_gets_every_change(replicated_organization: Organization) -> None:
    org = replicated_organization
    user = org.add_mailbox("ann@example.test")
    for n in range(3):
        org.deliver(user, message(f"copy {n}", size=20_000 * n))
    client = login(org, user)
    client.dele(2)
    client.quit()
    wait_for(caught_up(org, "DB01"), "DB01's copies to agree")
    on_mbx1 = stored(org, "mbx1", "DB01", user)
    assert [uid for uid, _ in on_mbx1] == [1, 3]
    assert stored(org, "mbx2", "DB01", user) == on_mbx1
    shown = json.loads(
        popguard(org.data, "get-mailboxdatabasecopystatus", "--format", "json").stdout
    )
    by_name = {row["Name"]: row for row in shown}
    assert by_name["DB01\\mbx1"]["Status"] == "Mounted"
    assert by_name["DB01\\mbx2"]["Status"] == "Healthy"
    assert by_name["DB01\\mbx2"]["CopyQueueLength"] == 0
    assert by_name["DB01\\mbx2"]["ActiveDatabaseCopy"] == "mbx1"
    assert by_name["DB02\\mbx2"]["Status"] == "Mounted"


def test_a_new_copy_is_seeded_and_a_removed_one_forgotten(
    replicated_organization: Organization,
) -> None:
    org = replicated_organization
    user = org.add_mailbox("bea@example.test", database="DB02")
    org.deliver(user, message("before the copy", size=50_000))
    removed = popguard(org.data, "remove-mailboxdatabasecopy", "DB02\\mbx1")
    assert removed.returncode == 0, removed.stderr
    added = popguard(
        org.data, "add-mailboxdatabasecopy", "DB02", "--server", "mbx1", "--format", "json"
    )
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)[0]["ActivationPreference"] == 2
    wait_for(caught_up(org, "DB02"), "DB02\\mbx1 to be seeded")
    assert stored(org, "mbx1", "DB02", user) == stored(org, "mbx2", "DB02", user)


def test_switchover_and_whole_server_moves_keep_every_message_and_uidl(
    replicated_organization: Organization,
) -> None:
    org = replicated_organization
    user = org.add_mailbox("cleo@example.test")
    for n in range(5):
        org.deliver(user, message(f"before {n}"))
    wait_for(caught_up(org, "DB01"), "DB01's copies to agree")
    _, uidls_before = subjects_through_frontend(org, user)

    load = DeliveryLoad(org.data, user, count=60)
    load.start()
    load.wait_for(10)
    moved = popguard(
        org.data, "set-mailboxserver", "mbx1",
        "--database-copy-activation-disabled-and-move-now", "true", "--format", "json",
    )  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    (result,) = json.loads(moved.stdout)
    assert (result["Identity"], result["ActiveServerAtEnd"], result["Status"]) == (
        "DB01", "mbx2", "Succeeded"
    )  # fmt: skip

    # Right after the command, as an operator would type it next: the move wrote the
    # copies' new statuses with the directory change.
    grouped = popguard(
        org.data, "get-mailboxdatabasecopystatus", "--server", "mbx1", "--group-by", "status",
        "--format", "json",
    )  # fmt: skip
    statuses = {row["Name"]: row["Count"] for row in json.loads(grouped.stdout)}
    assert "Mounted" not in statuses, statuses

    def mbx1_statuses() -> set[object]:
        with org.directory() as directory:
            return {row["Status"] for row in status_rows(directory, "mbx1", None)}

    wait_for(lambda: mbx1_statuses() == {"Healthy"}, "mbx1's copies to be passive and Healthy")
    # With activation disabled, a move to mbx1 is refused with the reason.
    refused = popguard(org.data, "move-activemailboxdatabase", "DB01", "--activate-on-server",
                       "mbx1")  # fmt: skip
    assert refused.returncode == 1 and "activation disabled" in refused.stderr

    load.wait_for(35)
    subjects, uidls_moved = subjects_through_frontend(org, user)
    assert uidls_moved[:5] == uidls_before

    back = popguard(
        org.data, "set-mailboxserver", "mbx1",
        "--database-copy-activation-disabled-and-move-now", "false", "--format", "json",
    )  # fmt: skip
    assert back.returncode == 0, back.stderr
    (result,) = json.loads(back.stdout)
    assert (result["ActiveServerAtEnd"], result["Status"]) == ("mbx1", "Succeeded")
    load.finish()

    wait_for(caught_up(org, "DB01"), "DB01's copies to agree after the moves")
    subjects, uidls_after = subjects_through_frontend(org, user)
    assert uidls_after[: len(uidls_moved)] == uidls_moved
    # Deliveries during a move were refused with 451 (nothing stored) and retried:
    # each acknowledged message is there exactly once.
    counted = Counter(subjects)
    assert all(counted[f"load-{n}"] == 1 for n in range(load.count)), counted
    assert set(load.refusals) <= {"451"}, load.refusals


def test_two_moves_of_one_database_cannot_both_win(replicated_organization: Organization) -> None:
    org = replicated_organization
    wait_for(caught_up(org, "DB01"), "DB01's copies to report")
    with org.directory() as directory:
        directory.claim_move("DB01", "another operator")
        busy = popguard(org.data, "move-activemailboxdatabase", "DB01", "--activate-on-server",
                        "mbx2")  # fmt: skip
        assert busy.returncode == 1 and "being moved by another command" in busy.stderr
        directory.release_move("DB01", "another operator")
        assert directory.active_server("DB01") == "mbx1"


def test_failover_after_kill_9_loses_no_acknowledged_message(
    replicated_organization: Organization,
) -> None:
    failover_loses_nothing(replicated_organization)


def failover_loses_nothing(org: Organization) -> None:
    """kill -9 of the active server while its copy is ahead, a failover, deliveries on
    the new active copy, the old server back: every acknowledged message is there."""
    user = org.add_mailbox("dora@example.test")
    mbx1, mbx2 = org.mailbox["mbx1"], org.mailbox["mbx2"]
    wait_for(caught_up(org, "DB01"), "DB01's copies to agree")
    load = DeliveryLoad(org.data, user, count=200)
    load.start()
    load.wait_for(15)
    # Hold mbx2's replication so that mbx1 takes deliveries it never ships.
    mbx2.processes["replication"].send_signal(signal.SIGSTOP)
    shipped = len(load.acknowledged)
    load.wait_for(shipped + 10)
    for service in ("replication", "delivery", "pop3be"):
        mbx1.kill(service)
    mbx2.processes["replication"].send_signal(signal.SIGCONT)

    moved = popguard(org.data, "move-activemailboxdatabase", "DB01", "--activate-on-server",
                     "mbx2", "--skip-lag-checks", "--format", "json")  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    (result,) = json.loads(moved.stdout)
    assert result["Status"] == "Succeeded" and result["ActiveServerAtEnd"] == "mbx2"

    load.wait_for(shipped + 30)
    for service in ("pop3be", "delivery", "replication"):
        mbx1.start(service)
    load.finish()
    wait_for(caught_up(org, "DB01"), "mbx1's copy to resynchronize", timeout=60)
    assert "given back to mbx2" in mbx1.log_text("replication")

    subjects, _ = subjects_through_frontend(org, user)
    counted = Counter(subjects)
    for number, attempts in load.acknowledged.items():
        # A delivery whose first try died with mbx1 may have been stored then and
        # again on retry (as with any MTA); one acknowledged at once is there once.
        if attempts == 1:
            assert counted[f"load-{number}"] == 1, (number, counted)
        else:
            assert counted[f"load-{number}"] >= 1, (number, counted)
    assert stored(org, "mbx1", "DB01", user) == stored(org, "mbx2", "DB01", user)


def test_a_session_across_a_move_gets_a_temporary_error_and_the_retry_works(
    replicated_organization: Organization,
) -> None:
    org = replicated_organization
    user = org.add_mailbox("eve@example.test")
    org.deliver(user, message("keep or delete"))
    wait_for(caught_up(org, "DB01"), "DB01's copies to agree")
    client = login(org, user)
    client.dele(1)
    moved = popguard(org.data, "move-activemailboxdatabase", "DB01", "--activate-on-server",
                     "mbx2")  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    try:
        client.quit()
    except poplib.error_proto as exc:
        assert str(exc).startswith("b'-ERR [SYS/TEMP]"), exc
    else:
        raise AssertionError("QUIT on the fenced copy claimed success")
    retry = login(org, user)  # routed to mbx2 now
    assert retry.stat()[0] == 1
    retry.dele(1)
    assert retry.quit().startswith(b"+OK")
    wait_for(caught_up(org, "DB01"), "the deletion to reach mbx1's copy")
    assert stored(org, "mbx1", "DB01", user) == []


@pytest.mark.timeout(300)
def test_each_replication_service_keeps_its_servers_lease_and_it_lapses_when_it_stops(
    replicated_organization: Organization,
) -> None:
    """Active Manager's first part: a lease per mailbox server in the directory, renewed
    by its replication service, judged by the directory's clock."""
    org = replicated_organization

    def leases() -> dict[str, float | None]:
        rows = json.loads(popguard_output(org.data, "get-mailboxserver", "--format", "json"))
        return {row["Name"]: row["LeaseSecondsLeft"] for row in rows}

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        held = leases()
        if all(value is not None and value > 5 for value in held.values()):
            break
        time.sleep(0.5)
    assert all(value is not None and value > 5 for value in held.values()), held
    lease_file = paths.server_folder(org.data, "mbx1").lease_file()
    assert json.loads(lease_file.read_text())["seconds"] > 5

    replication = org.mailbox["mbx1"].processes["replication"]
    replication.kill()
    replication.wait(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        held = leases()
        if (held["mbx1"] or 0) < 0:
            break
        time.sleep(0.5)
    assert held["mbx1"] is not None and held["mbx1"] < 0, held  # lapsed
    assert held["mbx2"] is not None and held["mbx2"] > 5, held  # still renewed
