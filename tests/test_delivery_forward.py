"""Mail in follows the active copy: LMTP on either mailbox server takes mail for a
mailbox of any database, decides what it can at RCPT, and hands the rest to the server
of the active copy (LMTP over mutual TLS, its lmtp-peer port), answering each recipient
with that server's answer; a forward that breaks gives 451, never 250."""

from __future__ import annotations

import contextlib
import signal
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from popguard import paths
from popguard.net.tls import TlsMaterial
from popguard.testing.net import free_loopback_address, wait_port
from popguard.testing.organization import popguard
from tests import realclients

from .conftest import MailboxServer, Organization, message
from .test_delivery import LmtpConversation, send_data
from .test_frontend import login

SENDER = b"MAIL FROM:<sender@example.test>"


def lmtp_to(org: Organization, server: str) -> LmtpConversation:
    lmtp = LmtpConversation(org.mailbox[server])
    assert lmtp.command(b"LHLO mta.example.test")[-1].startswith(b"250 ")
    assert lmtp.command(SENDER)[0].startswith(b"250")
    return lmtp


def rcpt(lmtp: LmtpConversation, address: str) -> bytes:
    (reply,) = lmtp.command(f"RCPT TO:<{address}>".encode())
    return reply


def read_through_frontend(org: Organization, user: str) -> list[bytes]:
    client = login(org, user)
    try:
        count = client.stat()[0]
        return [b"\r\n".join(client.retr(n)[1]) + b"\r\n" for n in range(1, count + 1)]
    finally:
        client.quit()


def subjects_through_frontend(org: Organization, user: str) -> list[bytes]:
    return [m.split(b"Subject: ")[1].split(b"\r\n")[0] for m in read_through_frontend(org, user)]


def wait_for_log(
    server: MailboxServer, service: str, text: str, seen: int, timeout: float = 30.0
) -> None:
    """Until `text` is in the log more than `seen` times."""
    deadline = time.monotonic() + timeout
    while server.log_text(service).count(text) <= seen:
        assert time.monotonic() < deadline, f"{server.name}/{service} never logged {text!r}"
        time.sleep(0.05)


def test_mail_for_a_database_active_elsewhere_is_handed_over(organization: Organization) -> None:
    org = organization
    user = org.add_mailbox("db02-user@example.test", "DB02")  # DB02 is active on mbx2
    content = message("handed from mbx1 to mbx2")
    lmtp = lmtp_to(org, "mbx1")
    assert rcpt(lmtp, user) == b"250 2.1.5 OK, for the active copy of DB02 on mbx2"
    send_data(lmtp, content)
    # mbx2's own answer: it wrote the message, durably, into its active copy.
    assert lmtp.reply() == [b"250 2.0.0 <db02-user@example.test> delivered as uid 1"]
    lmtp.close()
    assert read_through_frontend(org, user) == [b"Return-Path: <sender@example.test>\r\n" + content]
    assert "handed 1" in org.mailbox["mbx1"].log_text("delivery")


@pytest.mark.timeout(300)
def test_after_a_move_mail_handed_to_the_old_server_lands_in_the_new_active_copy(
    replicated_organization: Organization,
) -> None:
    org = replicated_organization
    user = org.add_mailbox("db01-user@example.test", "DB01")
    org.deliver(user, message("before the move"))
    moved = popguard(org.data, "move-activemailboxdatabase", "DB01", "--activate-on-server", "mbx2")
    assert moved.returncode == 0, moved.stderr
    with org.directory() as directory:
        assert directory.active_server("DB01") == "mbx2"
    lmtp = lmtp_to(org, "mbx1")  # the MTA still knows only mbx1
    assert rcpt(lmtp, user) == b"250 2.1.5 OK, for the active copy of DB01 on mbx2"
    send_data(lmtp, message("after the move"))
    (reply,) = lmtp.reply()
    assert reply.startswith(b"250 2.0.0 <db01-user@example.test> delivered as uid 2"), reply
    lmtp.close()
    assert subjects_through_frontend(org, user) == [b"before the move", b"after the move"]


def test_a_recipient_whose_database_is_being_moved_gets_451_at_rcpt(
    organization: Organization,
) -> None:
    org = organization
    user = org.add_mailbox("moving@example.test", "DB02")
    with org.directory() as directory:
        directory.claim_move("DB02", "the test")  # what a move holds while it runs
    for server in ("mbx1", "mbx2"):
        lmtp = lmtp_to(org, server)
        assert rcpt(lmtp, user) == (
            b"451 4.3.0 <moving@example.test>: mailbox database DB02 is being moved, "
            b"try again later"
        )
        assert rcpt(lmtp, "nobody@example.test") == (
            b"550 5.1.1 <nobody@example.test>: no such mailbox"
        )
        assert lmtp.command(b"DATA")[0].startswith(b"503 5.5.1")  # nobody was accepted
        lmtp.close()
    with org.directory() as directory:
        directory.release_move("DB02", "the test")
    # As the MTA's retry: it succeeds once the move is over.
    lmtp = lmtp_to(org, "mbx1")
    assert rcpt(lmtp, user).startswith(b"250 2.1.5")
    send_data(lmtp, message("after the retry"))
    assert lmtp.reply()[0].startswith(b"250 2.0.0 <moving@example.test>")
    lmtp.close()
    assert len(read_through_frontend(org, user)) == 1


def test_mixed_recipients_get_one_right_reply_each(organization: Organization) -> None:
    org = organization
    here = org.add_mailbox("here@example.test", "DB01")
    there = org.add_mailbox("there@example.test", "DB02")
    also_there = org.add_mailbox("also-there@example.test", "DB02")
    going = org.add_mailbox("going@example.test", "DB02")
    lmtp = lmtp_to(org, "mbx1")
    accepted = [there, here, also_there, going, there.upper()]
    for address in accepted[:4]:
        assert rcpt(lmtp, address).startswith(b"250 2.1.5"), address
    assert rcpt(lmtp, "nobody@example.test").startswith(b"550 5.1.1")
    assert rcpt(lmtp, there.upper()).startswith(b"250 2.1.5 <there@example.test> OK, already")
    with org.directory() as directory:  # removed between its RCPT and the end of DATA
        directory.remove_mailbox(going)
    content = message("to everyone")
    send_data(lmtp, content)
    replies = [lmtp.reply() for _ in accepted]
    assert replies == [
        [b"250 2.0.0 <there@example.test> delivered as uid 1"],
        [b"250 2.0.0 <here@example.test> delivered as uid 1"],
        [b"250 2.0.0 <also-there@example.test> delivered as uid 1"],
        [b"550 5.1.1 <going@example.test>: no such mailbox"],
        [b"250 2.0.0 <there@example.test> delivered as uid 1"],
    ]
    assert lmtp.command(b"NOOP") == [b"250 2.0.0 OK"]
    lmtp.close()
    stored = b"Return-Path: <sender@example.test>\r\n" + content
    for user in (here, there, also_there):
        assert read_through_frontend(org, user) == [stored], user


def lock_database_copy(org: Organization, server: str, database: str) -> sqlite3.Connection:
    """Hold the write lock of a copy's file, as a long transaction would: its writer
    waits (up to its busy timeout) until the lock goes."""
    path = paths.server_folder(org.data, server).database_copy_file(database)
    holder = sqlite3.connect(path, isolation_level=None, timeout=1)
    holder.execute("BEGIN IMMEDIATE")
    return holder


@pytest.mark.timeout(300)
def test_kill_9_of_the_target_mid_forward_gives_451_and_never_250(
    organization: Organization,
) -> None:
    org = organization
    mbx2 = org.mailbox["mbx2"]
    here = org.add_mailbox("here@example.test", "DB01")
    there = org.add_mailbox("there@example.test", "DB02")
    org.deliver(there, message("first, straight to mbx2"))  # DB02's file exists
    seen = mbx2.log_text("delivery").count("DATA of")
    holder = lock_database_copy(org, "mbx2", "DB02")
    try:
        lmtp = lmtp_to(org, "mbx1")
        assert rcpt(lmtp, here).startswith(b"250")
        assert rcpt(lmtp, there).startswith(b"250")
        send_data(lmtp, message("while mbx2 dies"))
        # mbx2 has the whole message and waits for the lock to write it: now it dies.
        wait_for_log(mbx2, "delivery", "DATA of", seen)
        mbx2.kill("delivery", signal.SIGKILL)
        replies = [lmtp.reply() for _ in range(2)]
    finally:
        holder.rollback()
        holder.close()
    assert replies[0][0].startswith(b"250 2.0.0 <here@example.test>"), replies
    (reply,) = replies[1]
    assert reply.startswith(b"451 4.4.2 <there@example.test>: not delivered to mbx2"), reply
    assert b"closed the connection" in reply or b"broke" in reply, reply
    # mbx2 down altogether: RCPT cannot know it, the end of DATA says 451 4.4.1.
    assert lmtp.command(SENDER)[0].startswith(b"250")
    assert rcpt(lmtp, there).startswith(b"250 2.1.5")
    send_data(lmtp, message("while mbx2 is down"))
    (reply,) = lmtp.reply()
    assert reply.startswith(b"451 4.4.1 <there@example.test>: not delivered to mbx2"), reply
    lmtp.close()
    # The MTA's retry, once mbx2 is back: the message is there once.
    mbx2.start("delivery")
    lmtp = lmtp_to(org, "mbx1")
    assert rcpt(lmtp, there).startswith(b"250")
    send_data(lmtp, message("retried"))
    assert lmtp.reply()[0].startswith(b"250 2.0.0 <there@example.test>")
    lmtp.close()
    assert subjects_through_frontend(org, there) == [b"first, straight to mbx2", b"retried"]
    assert len(read_through_frontend(org, here)) == 1


def restart_delivery(server: MailboxServer, *options: str) -> None:
    """`serve delivery` of `server` again, with `options`, its log where it was."""
    server.kill("delivery")
    log = server.logs["delivery"]
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "popguard", "--data", str(server.data), "serve", "delivery",
             "--server", server.name, *options],
            stdout=out, stderr=out,
        )  # fmt: skip
    server.processes["delivery"] = process
    wait_port(server.address, server.lmtp_port, process=process)


def test_a_kept_connection_that_went_away_is_replaced(organization: Organization) -> None:
    """mbx1 keeps its connection to mbx2 for the next hand-over. When mbx2's delivery
    restarts, or cuts the kept connection as idle, the next hand-over still succeeds:
    a closed connection is not used, and one that fails at MAIL (which stores nothing)
    is replaced by a new one."""
    org = organization
    mbx2 = org.mailbox["mbx2"]
    user = org.add_mailbox("there@example.test", "DB02")
    lmtp = lmtp_to(org, "mbx1")
    for number in range(3):
        if number == 1:  # restarted, and quick to cut idle connections from now on
            restart_delivery(mbx2, "--idle-timeout", "0.5")
        if number == 2:  # the connection mbx1 kept after hand-over 1 is cut by now
            wait_for_log(mbx2, "delivery", "idle for too long", 0)
        if number:
            assert lmtp.command(SENDER)[0].startswith(b"250")
        assert rcpt(lmtp, user).startswith(b"250 2.1.5")
        send_data(lmtp, message(f"hand-over {number}"))
        (reply,) = lmtp.reply()
        assert reply.startswith(b"250 2.0.0 <there@example.test>"), (number, reply)
    lmtp.close()
    assert subjects_through_frontend(org, user) == [b"hand-over 0", b"hand-over 1", b"hand-over 2"]


class PeerConversation(LmtpConversation):
    """LMTP to a server's lmtp-peer port, over TLS, with `context`'s certificate."""

    def __init__(self, server: MailboxServer, context: ssl.SSLContext) -> None:
        raw = socket.create_connection((server.address, server.lmtp_peer_port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname=server.address)
        self.file = self.sock.makefile("rb")


def test_forwarded_mail_is_never_forwarded_again(organization: Organization) -> None:
    org = organization
    mbx2 = org.mailbox["mbx2"]
    db01_user = org.add_mailbox("db01@example.test", "DB01")  # active on mbx1
    db02_user = org.add_mailbox("db02@example.test", "DB02")  # active on mbx2
    material = TlsMaterial.of(org.data)
    as_mbx1 = material.mutual_client_context(
        material.replication_identity("mbx1", org.mailbox["mbx1"].address)
    )
    lmtp = PeerConversation(mbx2, as_mbx1)
    assert lmtp.reply()[0].startswith(b"220 mbx2 popguard LMTP of organization")
    assert lmtp.command(b"LHLO mbx1")[-1].startswith(b"250 ")
    assert lmtp.command(SENDER)[0].startswith(b"250")
    assert rcpt(lmtp, db01_user) == (
        b"451 4.3.0 <db01@example.test>: mailbox database DB01 is active on mbx1, not here, "
        b"and forwarded mail is not forwarded again; try again later"
    )
    assert rcpt(lmtp, db02_user) == b"250 2.1.5 OK"
    send_data(lmtp, message("from a peer"))
    assert lmtp.reply()[0].startswith(b"250 2.0.0 <db02@example.test> delivered as uid 1")
    lmtp.close()


def test_the_peer_port_takes_only_mailbox_servers(organization: Organization) -> None:
    org = organization
    mbx2 = org.mailbox["mbx2"]
    material = TlsMaterial.of(org.data)
    # The operator's certificate is the organization's, but not a mailbox server's.
    as_admin = material.mutual_client_context(material.admin_identity())
    lmtp = PeerConversation(mbx2, as_admin)
    assert lmtp.file.readline().startswith(b"554 5.7.1 mbx2 takes mail from this organization")
    assert lmtp.file.readline() == b""
    # No certificate at all: the handshake fails (with TLS 1.3 the client learns it at
    # its first read), and not one octet of LMTP is said.
    said = b""
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        anonymous = PeerConversation(mbx2, material.client_context())
        said = anonymous.file.readline()
    assert said == b""


# -- with the real Postfix: both mailbox servers as LMTP next hops


def postfix_to_both(
    org: Organization, workdir: Path, extra_main_cf: str = ""
) -> tuple[realclients.PostfixInstance, str]:
    """A private Postfix for example.test whose LMTP next hops are mbx1, then mbx2; the
    address its SMTP server listens on."""
    smtp_host = free_loopback_address((SMTP_PORT,))
    mbx1, mbx2 = org.mailbox["mbx1"], org.mailbox["mbx2"]
    postfix = realclients.start_postfix_to_lmtp(
        workdir,
        smtp_host,
        SMTP_PORT,
        mbx1.address,
        mbx1.lmtp_port,
        "example.test",
        more_lmtp_hops=[(mbx2.address, mbx2.lmtp_port)],
        extra_main_cf=extra_main_cf,
    )
    return postfix, smtp_host


SMTP_PORT = 10025


@pytest.mark.timeout(300)
def test_postfix_with_both_mailbox_servers_as_next_hops_delivers_across(
    organization: Organization, tmp_path: Path
) -> None:
    org = organization
    user = org.add_mailbox("via-postfix@example.test", "DB02")  # active on mbx2
    postfix, smtp_host = postfix_to_both(org, tmp_path)
    try:
        realclients.send_via_smtp(
            smtp_host, SMTP_PORT, "sender@example.test", user, message("through mbx1")
        )
        (sent,) = realclients.wait_for_postfix_delivery(postfix, 1)
        # The first next hop took it: mbx1, which handed it to mbx2, whose 250 it relayed.
        assert f"relay={org.mailbox['mbx1'].address}" in sent.replace("[", "").replace("]", "")
        assert "delivered as uid 1" in sent, sent
        # mbx1's delivery down: Postfix goes on to the next hop in its list, mbx2.
        org.mailbox["mbx1"].kill("delivery")
        realclients.send_via_smtp(
            smtp_host, SMTP_PORT, "sender@example.test", user, message("straight to mbx2")
        )
        second = realclients.wait_for_postfix_delivery(postfix, 2, timeout=60)[1]
        assert f"relay={org.mailbox['mbx2'].address}" in second.replace("[", "").replace("]", "")
    finally:
        postfix.stop()
    assert subjects_through_frontend(org, user) == [b"through mbx1", b"straight to mbx2"]


# The README's recipient check: Postfix asks popguard's LMTP at RCPT time (a probe that
# stops after RCPT), and refuses an unknown user while the sender is still connected.
RECIPIENT_CHECK = """\
smtpd_recipient_restrictions = reject_unauth_destination, reject_unverified_recipient
unverified_recipient_reject_code = 550
address_verify_poll_delay = 1s
"""


@pytest.mark.timeout(300)
def test_postfix_refuses_an_unknown_user_at_smtp_time(
    organization: Organization, tmp_path: Path
) -> None:
    org = organization
    user = org.add_mailbox("known@example.test", "DB02")
    postfix, smtp_host = postfix_to_both(org, tmp_path, RECIPIENT_CHECK)
    try:
        with smtplib.SMTP(smtp_host, SMTP_PORT, timeout=60) as smtp:
            smtp.ehlo("client.example.test")
            smtp.mail("sender@example.test")
            code, text = smtp.rcpt("nobody@example.test")
            # The first answer may be "verification in progress" (450): as an MTA would,
            # ask again; the answer comes from popguard's 550 5.1.1 at RCPT.
            for _ in range(10):
                if code != 450:
                    break
                time.sleep(1)
                code, text = smtp.rcpt("nobody@example.test")
            assert code == 550, text
            assert b"5.1.1" in text and b"no such mailbox" in text, text
            code, text = smtp.rcpt(user)
            for _ in range(10):
                if code != 450:
                    break
                time.sleep(1)
                code, text = smtp.rcpt(user)
            assert code == 250, text
            smtp.data(message("checked at RCPT"))
        realclients.wait_for_postfix_delivery(postfix, 1, timeout=60)
    finally:
        postfix.stop()
    assert subjects_through_frontend(org, user) == [b"checked at RCPT"]
