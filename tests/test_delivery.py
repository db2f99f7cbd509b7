"""LMTP delivery as a real process: per-recipient replies, unknown users, size limit,
duplicate recipients, RCPT syntax, NUL and 8-bit bodies, long lines, enhanced status
codes, and the timeouts that bound a connection."""

from __future__ import annotations

import contextlib
import poplib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from popguard.directory.directory import Directory
from popguard.directory.passwords import hash_password
from popguard.errors import UserError
from popguard.services.delivery import MAX_RECIPIENTS
from popguard.services.lmtp_client import deliver
from popguard.testing.net import wait_port

from .conftest import PASSWORD, MailboxServer, message

# RFC 2034 section 4: reply code, then class.subject.detail; the class is the first digit.
ENHANCED_REPLY = re.compile(rb"^([245])\d\d[ -]\1\.\d{1,3}\.\d{1,3}( |$)")


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


@contextlib.contextmanager
def delivery_with(server: MailboxServer, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    """mbx1's delivery restarted as `popguard serve delivery --server mbx1 OPTIONS`."""
    server.kill("delivery")
    process = subprocess.Popen(
        [sys.executable, "-m", "popguard", "--data", str(server.data), "serve", "delivery",
         "--server", "mbx1", *options],
    )  # fmt: skip
    server.processes["delivery"] = process
    wait_port(server.address, server.lmtp_port, process=process)
    yield process


def retrieve_all(server: MailboxServer, user: str) -> list[bytes]:
    """Every message of `user`'s mailbox as RETR gives it (dot-stuffing undone)."""
    client = poplib.POP3(server.address, server.pop3_port)
    client.user(user)
    client.pass_(PASSWORD)
    count = client.stat()[0]
    messages = [b"\r\n".join(client.retr(number)[1]) + b"\r\n" for number in range(1, count + 1)]
    client.quit()
    return messages


def start_transaction(lmtp: LmtpConversation, *recipients: str) -> None:
    assert lmtp.command(b"LHLO client.example.test")[-1].startswith(b"250 ")
    assert lmtp.command(b"MAIL FROM:<sender@example.test>")[0].startswith(b"250")
    for recipient in recipients:
        assert lmtp.command(f"RCPT TO:<{recipient}>".encode())[0].startswith(b"250")


def send_data(lmtp: LmtpConversation, content: bytes) -> None:
    """DATA with `content` dot-stuffed (RFC 5321 section 4.5.2) and the final dot."""
    assert lmtp.command(b"DATA")[0].startswith(b"354")
    stuffed = b"." + content if content.startswith(b".") else content
    lmtp.sock.sendall(stuffed.replace(b"\r\n.", b"\r\n..") + b".\r\n")


def test_a_recipient_given_twice_is_stored_once_and_answered_per_rcpt(
    mailbox_server: MailboxServer,
) -> None:
    alice = mailbox_server.add_mailbox("alice@example.test")
    lmtp = LmtpConversation(mailbox_server)
    start_transaction(lmtp)
    spellings = [alice, alice.upper(), "Alice@Example.Test"]
    accepted = [
        lmtp.command(f"RCPT TO:<{spellings[i % 3]}>".encode())[0] for i in range(MAX_RECIPIENTS)
    ]
    assert all(reply.startswith(b"250 2.1.5") for reply in accepted)
    assert sum(b"already a recipient" in reply for reply in accepted) == MAX_RECIPIENTS - 1
    # RFC 5321 section 4.5.3.1.8: past the bound, 452 and the transaction goes on.
    assert lmtp.command(f"RCPT TO:<{alice}>".encode()) == [b"452 4.5.3 Too many recipients"]
    send_data(lmtp, message("once"))
    replies = [lmtp.reply()[0] for _ in range(MAX_RECIPIENTS)]
    assert len(set(replies)) == 1 and replies[0].startswith(b"250 2.0.0 <alice@example.test>")
    assert lmtp.command(b"NOOP") == [b"250 2.0.0 OK"]
    lmtp.close()
    assert len(retrieve_all(mailbox_server, alice)) == 1


def test_rcpt_must_name_a_mailbox_in_angle_brackets(mailbox_server: MailboxServer) -> None:
    alice = mailbox_server.add_mailbox("alice@example.test")
    lmtp = LmtpConversation(mailbox_server)
    start_transaction(lmtp)
    refused = {
        f"RCPT TO:{alice}": b"501 5.1.3 ",
        "RCPT TO:<>": b"501 5.1.3 ",
        f"RCPT TO:<{alice}": b"501 5.1.3 ",
        "RCPT TO:<alice@>": b"501 5.1.3 ",
        "RCPT TO:<a b@example.test>": b"501 5.1.3 ",
        f"RCPT TO:<{alice}> NOTIFY=NEVER": b"555 5.5.4 ",
        f"RCPT TO:<{alice}>junk": b"501 5.5.4 ",
        f"RCPT <{alice}>": b"501 5.5.4 ",
        "RCPT TO:<nobody@example.test>": b"550 5.1.1 ",
    }
    for command, reply in refused.items():
        answer = lmtp.command(command.encode())
        assert answer[0].startswith(reply), (command, answer)
        assert b"<<>>" not in answer[0]
    assert lmtp.command(b"DATA")[0].startswith(b"503 5.5.1")  # nobody was accepted
    # RFC 5321 appendix C: a source route is accepted and ignored.
    assert lmtp.command(f"RCPT TO:<@relay.example.test:{alice}>".encode()) == [b"250 2.1.5 OK"]
    send_data(lmtp, message("routed"))
    assert lmtp.reply()[0].startswith(b"250 2.0.0 <alice@example.test>")
    lmtp.close()
    assert len(retrieve_all(mailbox_server, alice)) == 1


def test_nul_in_a_body_is_refused_once_per_recipient(mailbox_server: MailboxServer) -> None:
    alice = mailbox_server.add_mailbox("alice@example.test")
    bob = mailbox_server.add_mailbox("bob@example.test")
    lmtp = LmtpConversation(mailbox_server)
    start_transaction(lmtp, alice, bob, alice)
    send_data(lmtp, message("nul", body="one\r\ntw\0o\r\nthree\r\n"))
    replies = [lmtp.reply() for _ in range(3)]
    assert all(reply[0].startswith(b"554 5.6.0") for reply in replies), replies
    assert lmtp.command(b"NOOP") == [b"250 2.0.0 OK"]
    lmtp.close()
    assert retrieve_all(mailbox_server, alice) == retrieve_all(mailbox_server, bob) == []


def test_an_8bit_body_without_body_8bitmime_is_stored_byte_exact(
    mailbox_server: MailboxServer,
) -> None:
    alice = mailbox_server.add_mailbox("alice@example.test")
    lmtp = LmtpConversation(mailbox_server)
    start_transaction(lmtp, alice)
    content = message("latin-1").replace(b"Hello.", "Grüße, café \xff".encode("latin-1"))
    send_data(lmtp, content)
    assert lmtp.reply()[0].startswith(b"250 2.0.0")
    lmtp.close()
    assert retrieve_all(mailbox_server, alice) == [
        b"Return-Path: <sender@example.test>\r\n" + content
    ]


def test_long_lines_arrive_byte_exact_and_a_longer_one_is_refused(
    mailbox_server: MailboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # poplib refuses lines over 2048 octets by itself; this test reads longer ones.
    monkeypatch.setattr(poplib, "_MAXLINE", 200_000)
    alice = mailbox_server.add_mailbox("alice@example.test")
    newsletter = message(
        "html",
        body="<p>" + "a" * 4_993 + "</p>\r\n." + "b" * 59_999 + "\r\n.\r\nend\r\n",
    )
    assert [len(line) for line in newsletter.split(b"\r\n")].count(5_000) == 1
    assert [len(line) for line in newsletter.split(b"\r\n")].count(60_000) == 1
    lmtp = LmtpConversation(mailbox_server)
    start_transaction(lmtp, alice)
    send_data(lmtp, newsletter)
    assert lmtp.reply()[0].startswith(b"250 2.0.0")
    # One octet over 64 KiB, with the transparency dot: refused, the session goes on.
    assert lmtp.command(b"MAIL FROM:<sender@example.test>")[0].startswith(b"250")
    assert lmtp.command(f"RCPT TO:<{alice}>".encode())[0].startswith(b"250")
    send_data(lmtp, message("too long", body="." + "c" * 65_535 + "\r\n"))
    assert lmtp.reply() == [
        b"500 5.6.0 Line too long: a message line may have at most 65536 octets"
    ]
    assert lmtp.command(b"NOOP") == [b"250 2.0.0 OK"]
    lmtp.close()
    assert retrieve_all(mailbox_server, alice) == [
        b"Return-Path: <sender@example.test>\r\n" + newsletter
    ]


def test_every_reply_carries_an_enhanced_status_code(mailbox_server: MailboxServer) -> None:
    mailbox_server.add_mailbox("alice@example.test")
    lmtp = LmtpConversation(mailbox_server)
    before_lhlo = [
        (b"", b"500 5.5.2 "),
        (b"FOO", b"500 5.5.1 "),
        (b"HELO client", b"500 5.5.1 "),
        (b"MAIL FROM:<sender@example.test>", b"503 5.5.1 Error: send LHLO first"),
        (b"RCPT TO:<alice@example.test>", b"503 5.5.1 "),
        (b"DATA", b"503 5.5.1 "),
        (b"LHLO", b"501 5.5.4 Syntax: LHLO hostname"),
        (b"NOOP", b"250 2.0.0 "),
        (b"NOOP " + b"x" * 600, b"500 5.5.2 "),  # RFC 5321 section 4.5.3.1.4: 512
        (b"VRFY alice@example.test", b"252 2.0.0 "),
        (b"EXPN list", b"502 5.5.1 "),
        (b"HELP", b"250 2.0.0 "),
        (b"HELP NOSUCH", b"501 5.5.4 "),
        (b"STARTTLS", b"454 4.7.0 "),
    ]
    after_lhlo = [
        (b"MAIL FROM:<sender@example.test> BODY=BINARYMIME", b"501 5.5.4 "),
        (b"MAIL FROM:<sender@example.test> SIZE=999999999999", b"552 5.3.4 "),
        (b"MAIL FROM:<sender@example.test> FOO=BAR", b"555 5.5.4 "),
        (b"MAIL FROM:<sender@example.test> BODY=8BITMIME", b"250 2.1.0 "),
        (b"MAIL FROM:<sender@example.test>", b"503 5.5.1 "),
        (b"RCPT TO:<alice@example.test>", b"250 2.1.5 "),
        (b"DATA now", b"501 5.5.4 "),
        (b"RSET", b"250 2.0.0 "),
        (b"QUIT", b"221 2.0.0 Bye"),
    ]
    seen = []
    for command, reply in before_lhlo:
        seen += lmtp.command(command)
        assert seen[-1].startswith(reply), (command, seen[-1])
    # RFC 2034 section 3: the reply to LHLO is the one without codes; it names the
    # extension.
    assert b"250-ENHANCEDSTATUSCODES" in lmtp.command(b"LHLO client.example.test")
    for command, reply in after_lhlo:
        seen += lmtp.command(command)
        assert seen[-1].startswith(reply), (command, seen[-1])
    assert [line for line in seen if not ENHANCED_REPLY.match(line)] == []


def test_too_much_mail_data_is_refused_with_an_enhanced_code(
    mailbox_server: MailboxServer,
) -> None:
    alice = mailbox_server.add_mailbox("alice@example.test")
    with delivery_with(mailbox_server, "--max-message-size", "10000"):
        lmtp = LmtpConversation(mailbox_server)
        start_transaction(lmtp, alice, alice)
        send_data(lmtp, message("big", size=50_000))
        replies = [lmtp.reply() for _ in range(2)]
        assert replies == [[b"552 5.3.4 Message too big: at most 10000 octets are accepted"]] * 2
        lmtp.close()


TIMEOUTS = ("--command-timeout", "2", "--idle-timeout", "5")
# Bounds on the slow clients below: far beyond any timeout under test.
TRICKLE_STEPS = 30


def cut_after(lmtp: LmtpConversation, piece: bytes) -> tuple[int, bytes]:
    """Send `piece` once a second until the server closes the connection: how many
    pieces went out, and what the server said before closing."""
    lmtp.sock.settimeout(1.0)
    said = b""
    for sent in range(TRICKLE_STEPS):
        try:
            lmtp.sock.sendall(piece)
            while chunk := lmtp.sock.recv(4096):
                said += chunk
            return sent, said  # the server closed: recv gave b""
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return sent, said
    return TRICKLE_STEPS, said


def test_a_trickling_command_line_is_cut(mailbox_server: MailboxServer) -> None:
    with delivery_with(mailbox_server, *TIMEOUTS):
        lmtp = LmtpConversation(mailbox_server)
        assert lmtp.command(b"LHLO client")[-1].startswith(b"250 ")
        sent, said = cut_after(lmtp, b"N")
        assert sent < TRICKLE_STEPS
        assert said.startswith(b"421 4.4.2 mbx1 command not received whole, closing connection")


def test_an_idle_connection_is_closed(mailbox_server: MailboxServer) -> None:
    with delivery_with(mailbox_server, *TIMEOUTS):
        lmtp = LmtpConversation(mailbox_server)
        assert lmtp.command(b"LHLO client")[-1].startswith(b"250 ")
        lmtp.sock.settimeout(60)
        assert lmtp.file.readline() == b"421 4.4.2 mbx1 idle for too long, closing connection\r\n"
        assert lmtp.file.readline() == b""


def test_a_trickling_data_is_cut_and_a_busy_client_is_not(mailbox_server: MailboxServer) -> None:
    alice = mailbox_server.add_mailbox("alice@example.test")
    with delivery_with(mailbox_server, "--max-message-size", "10000", *TIMEOUTS):
        # Commands for longer than the idle timeout in all, each well within it: not cut.
        lmtp = LmtpConversation(mailbox_server)
        for _ in range(TRICKLE_STEPS):
            assert lmtp.command(b"NOOP") == [b"250 2.0.0 OK"]
            time.sleep(0.25)
        # DATA may last 2 s + 10000 octets at 64 KiB/s.
        start_transaction(lmtp, alice)
        assert lmtp.command(b"DATA")[0].startswith(b"354")
        sent, said = cut_after(lmtp, b"x\r\n")
        assert sent < TRICKLE_STEPS
        assert said.startswith(b"421 4.4.2 mbx1 DATA not received within 2.15259 s")
    assert retrieve_all(mailbox_server, alice) == []


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--idle-timeout", "soon"),
        ("--idle-timeout", "nan"),
        ("--command-timeout", "0"),
        ("--command-timeout", "inf"),
        ("--max-line-length", "100"),
        ("--max-line-length", "2000.5"),
    ],
)
def test_a_bad_limit_is_one_line_on_stderr(tmp_path: Path, option: str, value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "popguard", "--data", str(tmp_path), "serve", "delivery",
         "--server", "mbx1", option, value],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and value in lines[0], lines


def test_the_limits_are_in_the_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "popguard", "serve", "delivery", "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0
    shown = " ".join(done.stdout.split())  # as click wraps it
    for option, default in (
        ("--max-line-length", "65536"),
        ("--idle-timeout", "120"),
        ("--command-timeout", "60"),
    ):
        assert f"{option} " in shown and f"[default: {default}" in shown


def test_popguards_own_clients_deliver_only_to_their_own_organization(
    mailbox_server: MailboxServer, tmp_path: Path
) -> None:
    """A second organization whose directory names the same address and port (a second
    `up` on addresses in use) must not hand its mail to the first one's LMTP."""
    alice = mailbox_server.add_mailbox("alice@example.test")
    mailbox_server.deliver(alice, message("to the right organization"))
    with Directory(tmp_path / "other") as other:
        other.new_server(mailbox_server.name, ["mailbox"], mailbox_server.address)
        other.new_database("DB01", mailbox_server.name)
        other.new_mailbox(alice, "DB01", hash_password(PASSWORD))
        assert other.organization_id() != organization_of(mailbox_server)
        with pytest.raises(UserError, match="not mbx1's of this organization"):
            deliver(other, alice, message("to a stranger"))
    client = poplib.POP3(mailbox_server.address, mailbox_server.pop3_port, timeout=10)
    client.user(alice)
    client.pass_(PASSWORD)
    assert client.stat()[0] == 1  # only the message for this organization
    client.quit()


def organization_of(server: MailboxServer) -> str:
    with server.directory() as directory:
        return directory.organization_id()
