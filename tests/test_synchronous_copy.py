"""Synchronous copies, as real processes: a delivery's 250 and a QUIT's +OK come only
once a passive copy holds the change; a copy that stops confirming is dropped in the
directory before anything is acknowledged without it, and joins again once it
catches up."""

from __future__ import annotations

import signal
import smtplib

from popguard.directory.directory import Directory
from popguard.testing.organization import wait_until

from .conftest import Organization, message
from .test_frontend import login
from .test_replication import caught_up, stored, wait_for


def synchronous(org: Organization, database: str, server: str) -> bool:
    with Directory(org.data) as directory:
        return any(c.synchronous for c in directory.database_copies(database) if c.server == server)


def lmtp(org: Organization, server: str, recipient: str, subject: str) -> tuple[int, str]:
    mbx = org.mailbox[server]
    with smtplib.LMTP(mbx.address, mbx.lmtp_port, timeout=60) as client:
        client.ehlo("test.example")
        client.mail("sender@example.test")
        code, reply = client.rcpt(recipient)
        assert code == 250, reply
        code, reply = client.data(message(subject))
    return code, reply.decode(errors="replace")


def test_acknowledgements_wait_for_a_synchronous_copy(
    replicated_organization: Organization,
) -> None:
    org = replicated_organization
    user = org.add_mailbox("sync@example.test")
    mbx1, mbx2 = org.mailbox["mbx1"], org.mailbox["mbx2"]
    wait_for(caught_up(org, "DB01"), "DB01's copies to agree")
    wait_until("DB01\\mbx2 to be synchronous", lambda: synchronous(org, "DB01", "mbx2"), 30)

    # A 250 means the passive copy's file has the message already.
    for number in range(5):
        code, reply = lmtp(org, "mbx1", user, f"sync-{number}")
        assert code == 250, reply
        on_mbx2 = [wire for _, wire in stored(org, "mbx2", "DB01", user)]
        assert any(f"Subject: sync-{number}".encode() in wire for wire in on_mbx2), number

    # A QUIT's +OK means the passive copy has the deletions already.
    client = login(org, user)
    client.dele(1)
    client.dele(2)
    assert client.quit().startswith(b"+OK")
    assert len(stored(org, "mbx2", "DB01", user)) == 3

    # mbx2 stops confirming: the delivery is acknowledged only after the directory
    # says mbx2 is not synchronous any more (Active Manager would not activate it).
    mbx2.processes["replication"].send_signal(signal.SIGSTOP)
    try:
        code, reply = lmtp(org, "mbx1", user, "while mbx2 is stopped")
        assert code == 250, reply
        assert not synchronous(org, "DB01", "mbx2")
        assert "did not confirm" in mbx1.log_text("replication")
    finally:
        mbx2.processes["replication"].send_signal(signal.SIGCONT)
    wait_until("mbx2 to be synchronous again", lambda: synchronous(org, "DB01", "mbx2"), 30)

    # With mbx1's replication service dead while mbx2 is synchronous, nothing can
    # confirm: 451, never 250.
    mbx1.kill("replication")
    code, reply = lmtp(org, "mbx1", user, "with no replication service")
    assert code == 451, reply
    assert "may lack the change" in reply
    mbx1.start("replication")
    code, reply = lmtp(org, "mbx1", user, "after the restart")
    assert code == 250, reply


def test_a_database_with_no_synchronous_copy_is_served_without_waiting(
    organization: Organization,
) -> None:
    """No replication at all (the passive rows never followed): no copy is synchronous,
    so deliveries and QUIT's deletions are acknowledged from the active copy alone."""
    org = organization
    user = org.add_mailbox("alone@example.test")
    code, reply = lmtp(org, "mbx1", user, "alone")
    assert code == 250, reply
    client = login(org, user)
    client.dele(1)
    assert client.quit().startswith(b"+OK")
    assert not synchronous(org, "DB01", "mbx2")
