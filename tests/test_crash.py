"""Nothing lost: kill -9 of delivery or of the back end at any moment."""

from __future__ import annotations

import poplib
import random
import smtplib
import socket
import threading
import time

from .conftest import PASSWORD, MailboxServer, message

DELIVERY_ROUNDS = 6
MESSAGES_PER_ROUND = 40


def _deliver_until_failure(server: MailboxServer, user: str, acknowledged: list[bytes]) -> None:
    """Deliver numbered messages; record each one that got 250, stop at the first failure."""
    try:
        with smtplib.LMTP(server.address, server.lmtp_port, timeout=10) as client:
            client.ehlo()
            for _ in range(MESSAGES_PER_ROUND):
                token = f"token-{random.getrandbits(64):016x}".encode()
                content = message("durable", body=token.decode() + "\r\n", size=4000)
                client.mail("sender@example.test")
                client.rcpt(user)
                code, _ = client.data(content)
                if code != 250:
                    return
                acknowledged.append(token)
    except (smtplib.SMTPException, OSError):
        return


def _all_messages(server: MailboxServer, user: str) -> list[bytes]:
    client = poplib.POP3(server.address, server.pop3_port, timeout=10)
    client.user(user)
    client.pass_(PASSWORD)
    count = client.stat()[0]
    bodies = [b"\r\n".join(client.retr(n)[1]) for n in range(1, count + 1)]
    client.quit()
    return bodies


def test_kill_9_of_delivery_loses_no_acknowledged_message(mailbox_server: MailboxServer) -> None:
    user = mailbox_server.add_mailbox("durable@example.test")
    acknowledged: list[bytes] = []
    for _ in range(DELIVERY_ROUNDS):
        worker = threading.Thread(
            target=_deliver_until_failure, args=(mailbox_server, user, acknowledged)
        )
        worker.start()
        time.sleep(random.uniform(0.05, 0.4))
        mailbox_server.kill("delivery")
        worker.join(30)
        mailbox_server.start("delivery")
    assert acknowledged, "no delivery was acknowledged at all"
    stored = b"\n".join(_all_messages(mailbox_server, user))
    missing = [token for token in acknowledged if token not in stored]
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged messages lost"
    for token in acknowledged:
        assert stored.count(token) == 1


def _quit_with_deletions(server: MailboxServer, user: str, outcome: dict[str, object]) -> None:
    try:
        with socket.create_connection((server.address, server.pop3_port), timeout=10) as sock:
            sock.sendall(
                f"USER {user}\r\nPASS {PASSWORD}\r\n".encode()
                + b"".join(f"DELE {n}\r\n".encode() for n in range(1, 31))
                + b"QUIT\r\n"
            )
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            outcome["reply"] = received
    except OSError as exc:
        outcome["error"] = exc


def test_kill_9_of_the_back_end_applies_all_or_none_of_a_quit(
    mailbox_server: MailboxServer,
) -> None:
    for attempt in range(5):
        user = mailbox_server.add_mailbox(f"atomic{attempt}@example.test")
        for n in range(30):
            mailbox_server.deliver(user, message(f"m{n}"))
        outcome: dict[str, object] = {}
        worker = threading.Thread(target=_quit_with_deletions, args=(mailbox_server, user, outcome))
        worker.start()
        time.sleep(random.uniform(0.0, 0.3))
        mailbox_server.kill("pop3be")
        worker.join(30)
        mailbox_server.start("pop3be")
        client = poplib.POP3(mailbox_server.address, mailbox_server.pop3_port, timeout=10)
        client.user(user)
        client.pass_(PASSWORD)
        remaining = client.stat()[0]
        client.quit()
        assert remaining in (0, 30), f"half a QUIT applied: {remaining} of 30 messages left"
        reply = outcome.get("reply", b"")
        if isinstance(reply, bytes) and b"signing off (30 messages deleted)" in reply:
            assert remaining == 0, "QUIT was acknowledged but the deletions were lost"
