"""LMTP delivery as a real process: per-recipient replies, unknown users, size limit."""

from __future__ import annotations

import poplib
import socket

from .conftest import PASSWORD, MailboxServer, message


class LmtpConversation:
    def __init__(self, server: MailboxServer) -> None:
        self.sock = socket.create_connection((server.address, server.lmtp_port), timeout=10)
        self.file = self.sock.makefile("rb")
        assert self.reply()[0].startswith(b"220")

    def reply(self) -> list[bytes]:
        lines = []
        while True:
            line = self.file.readline()
            assert line, "server closed the connection"
            lines.append(line.rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return lines

    def command(self, line: bytes) -> list[bytes]:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.command(b"QUIT")
        self.file.close()
        self.sock.close()


def test_one_reply_per_accepted_recipient(mailbox_server: MailboxServer) -> None:
    alice = mailbox_server.add_mailbox("alice@example.test")
    bob = mailbox_server.add_mailbox("bob@example.test")
    lmtp = LmtpConversation(mailbox_server)
    capabilities = lmtp.command(b"LHLO client.example.test")
    assert any(b"SIZE" in line for line in capabilities)
    assert lmtp.command(b"MAIL FROM:<sender@example.test>")[0].startswith(b"250")
    assert lmtp.command(f"RCPT TO:<{alice}>".encode())[0].startswith(b"250")
    assert lmtp.command(b"RCPT TO:<nobody@example.test>")[0].startswith(b"550 5.1.1")
    assert lmtp.command(f"RCPT TO:<{bob.upper()}>".encode())[0].startswith(b"250")
    assert lmtp.command(b"DATA")[0].startswith(b"354")
    lmtp.sock.sendall(message("to two").replace(b"\r\n.", b"\r\n..") + b".\r\n")
    first = lmtp.reply()
    second = lmtp.reply()
    assert first[0].startswith(b"250 2.0.0 <alice@example.test>")
    assert second[0].startswith(b"250 2.0.0 <bob@example.test>")
    lmtp.close()
    for user in (alice, bob):
        client = poplib.POP3(mailbox_server.address, mailbox_server.pop3_port)
        client.user(user)
        client.pass_(PASSWORD)
        assert client.stat()[0] == 1
        client.quit()


def test_message_over_the_size_limit_is_refused(mailbox_server: MailboxServer) -> None:
    mailbox_server.kill("delivery")
    mailbox_server.processes.pop("delivery", None)
    import subprocess
    import sys

    from popguard.testing.net import wait_port

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "popguard",
            "--data",
            str(mailbox_server.data),
            "serve",
            "delivery",
            "--server",
            "mbx1",
            "--max-message-size",
            "10000",
        ]
    )
    mailbox_server.processes["delivery"] = process
    wait_port(mailbox_server.address, mailbox_server.lmtp_port, process=process)
    alice = mailbox_server.add_mailbox("big@example.test")
    bob = mailbox_server.add_mailbox("big2@example.test")
    lmtp = LmtpConversation(mailbox_server)
    lmtp.command(b"LHLO client")
    lmtp.command(b"MAIL FROM:<s@example.test>")
    lmtp.command(f"RCPT TO:<{alice}>".encode())
    lmtp.command(f"RCPT TO:<{bob}>".encode())
    lmtp.command(b"DATA")
    lmtp.sock.sendall(message("big", size=50_000) + b".\r\n")
    # RFC 2033: one reply per accepted recipient, even when DATA is refused.
    assert lmtp.reply()[0].startswith(b"552")
    assert lmtp.reply()[0].startswith(b"552")
    assert lmtp.command(b"NOOP")[0].startswith(b"250")
    lmtp.close()
