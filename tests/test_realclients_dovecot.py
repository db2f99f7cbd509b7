"""Prove the real-client helpers in tests/realclients.py against real servers.

A private Dovecot (dovecot-pop3d) on 127.0.9.1 serves a maildir of three messages
over STLS and implicit TLS; every client retrieves them with keep=True, then with
keep=False, and the mailbox must then be empty.  A private Postfix relays two
messages over LMTP to an aiosmtpd LMTP server.

Needs root and the packages from scripts/install-test-deps.sh.
"""

from __future__ import annotations

import os
import smtplib
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP

from popguard.testing.net import free_port
from tests import realclients as rc
from tests.dovecot_server import SERVER_NAME, Dovecot, private_dovecot

HOST = "127.0.9.1"
SMTP_HOST = "127.0.9.2"
LMTP_HOST = "127.0.9.3"
USER = "alice"
# Quoting must survive every client's config syntax; the backslash before a hex digit
# checks that fetchmail's \\xhh escapes (used for '"' and '\\') are not greedy.
PASSWORD = 'pa"ss w\\d0rd%'


def message(i: int) -> bytes:
    """Test message i, as stored on disk (LF line ends)."""
    return (
        f"From: Sender <sender@example.net>\n"
        f"To: {USER}@example.org\n"
        f"Subject: realclients test {i}\n"
        f"Message-ID: <realclients-{i}@popguard.test>\n"
        f"Date: Thu, 01 Jan 2026 00:00:0{i} +0000\n"
        f"\n"
        f"body token-{i}\n"
        f".a line starting with a dot\n"
        f"From a line that mbox must quote\n"
        f">From an already quoted line\n"
        f"..\n"
        f"last line\n"
    ).encode()


def expected(i: int) -> bytes:
    """What a POP3 server sends for message(i): CRLF line ends."""
    return rc.to_crlf(message(i))


EXPECTED = [expected(i) for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    with private_dovecot(HOST, USER, PASSWORD) as server:
        yield server


@pytest.fixture
def mailbox(dovecot: Dovecot) -> Dovecot:
    dovecot.fill([message(i) for i in (1, 2, 3)])
    return dovecot


def test_make_test_pki_verifies_with_python_ssl(mailbox: Dovecot) -> None:
    assert mailbox.stat() == 3


@pytest.mark.parametrize("tls", rc.TLS_MODES)
@pytest.mark.parametrize("client", sorted(rc.CLIENTS))
def test_client_retrieves_keeps_then_deletes(
    mailbox: Dovecot, client: str, tls: rc.TlsMode, tmp_path: Path
) -> None:
    fetch = rc.CLIENTS[client]
    kwargs: dict[str, Any] = {
        "host": HOST,
        "port": mailbox.port(tls),
        "tls": tls,
        "cafile": mailbox.pki.ca_file,
        "user": USER,
        "password": PASSWORD,
        "timeout": 20,
    }
    if client == "getmail" and tls == "stls":
        with pytest.raises(rc.UnsupportedByClient):
            fetch(keep=True, **kwargs)
        assert mailbox.stat() == 3
        return

    kept = fetch(keep=True, workdir=tmp_path, **kwargs)
    assert [rc.comparable(m) for m in kept] == EXPECTED
    if client in ("curl", "poplib", "fetchmail", "mpop"):
        # Byte-exact apart from the headers the client adds.
        assert kept == EXPECTED
    assert mailbox.stat() == 3

    again = fetch(keep=False, **kwargs)
    assert [rc.comparable(m) for m in again] == EXPECTED
    assert mailbox.stat() == 0
    assert mailbox.files() == []

    assert fetch(keep=False, **kwargs) == []


@pytest.mark.parametrize("tls", rc.TLS_MODES)
@pytest.mark.parametrize("client", sorted(rc.CLIENTS))
def test_client_rejects_untrusted_certificate(
    mailbox: Dovecot, client: str, tls: rc.TlsMode, tmp_path: Path
) -> None:
    """Verification is really on: a CA that did not sign the server cert fails."""
    if client == "getmail" and tls == "stls":
        return  # covered above: refuses before connecting
    other = rc.make_test_pki(tmp_path / "other", [HOST])
    with pytest.raises((rc.ClientError, ssl.SSLError)):
        rc.CLIENTS[client](
            HOST,
            mailbox.port(tls),
            tls,
            other.ca_file,
            USER,
            PASSWORD,
            keep=False,
            timeout=10,
        )
    assert mailbox.stat() == 3


@pytest.mark.parametrize("client", sorted(rc.CLIENTS))
def test_client_verifies_against_server_name(mailbox: Dovecot, client: str) -> None:
    """server_name: connect to 127.0.9.1 but check the certificate for another name."""
    got = rc.CLIENTS[client](
        HOST,
        mailbox.implicit_port,
        "implicit",
        mailbox.pki.ca_file,
        USER,
        PASSWORD,
        keep=True,
        timeout=10,
        server_name=SERVER_NAME,
    )
    assert [rc.comparable(m) for m in got] == EXPECTED


@pytest.mark.parametrize("client", sorted(rc.CLIENTS))
def test_client_rejects_wrong_server_name(mailbox: Dovecot, client: str) -> None:
    """server_name is checked: the certificate does not name this one."""
    with pytest.raises((rc.ClientError, ssl.SSLError)):
        rc.CLIENTS[client](
            HOST,
            mailbox.implicit_port,
            "implicit",
            mailbox.pki.ca_file,
            USER,
            PASSWORD,
            keep=False,
            timeout=10,
            server_name="wrong.popguard.invalid",
        )
    assert mailbox.stat() == 3


def test_strip_client_headers_keeps_server_received() -> None:
    msg = (
        b"Received: from 127.0.0.1 [127.0.0.1]\n\tby vm with POP3 (fetchmail-6.4.37)\n"
        b"\tfor <root@localhost> (single-drop); Thu, 1 Jan 2026 00:00:00 +0000\n"
        b"Received: from mx by popguard (Postfix) with ESMTP id X; Thu, 1 Jan 2026\n"
        b"Subject: s\n\nbody\n"
    )
    assert rc.strip_client_headers(msg) == (
        b"Received: from mx by popguard (Postfix) with ESMTP id X; Thu, 1 Jan 2026\r\n"
        b"Subject: s\r\n\r\nbody\r\n"
    )


# --------------------------------------------------------------------------------------
# Postfix -> LMTP


class _Recorder:
    def __init__(self) -> None:
        self.envelopes: list[tuple[str, list[str], bytes]] = []
        self.cond = threading.Condition()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.cond:
            self.envelopes.append(
                (envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content))
            )
            self.cond.notify_all()
        return "250 2.0.0 stored"


class _LMTPController(Controller):
    def factory(self) -> Any:
        return LMTP(self.handler, **self.SMTP_kwargs)


def test_postfix_delivers_over_lmtp(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("Postfix needs root")
    recorder = _Recorder()
    lmtp = _LMTPController(recorder, hostname=LMTP_HOST, port=free_port(LMTP_HOST))
    lmtp.start()
    smtp_port = free_port(SMTP_HOST)
    try:
        postfix = rc.start_postfix_to_lmtp(
            tmp_path, SMTP_HOST, smtp_port, LMTP_HOST, lmtp.port, "example.org"
        )
        try:
            for i in (1, 2):
                rc.send_via_smtp(
                    SMTP_HOST,
                    smtp_port,
                    "sender@example.net",
                    f"{USER}@example.org",
                    rc.to_crlf(message(i)),
                )
            sent = rc.wait_for_postfix_delivery(postfix, 2, timeout=15)
            assert len(sent) == 2
            assert all(f"relay={LMTP_HOST}[{LMTP_HOST}]:{lmtp.port}" in line for line in sent)
            deadline = time.monotonic() + 5
            while postfix.queue_files() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert postfix.queue_is_empty()
            # Mail for any other domain is refused at RCPT time.
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                rc.send_via_smtp(
                    SMTP_HOST, smtp_port, "sender@example.net", "bob@other.test", message(3)
                )
        finally:
            postfix.stop()
        assert not postfix.queue_dir.exists()
        assert "status=sent" in postfix.maillog.read_text()
    finally:
        lmtp.stop()

    got = sorted(recorder.envelopes, key=lambda e: e[2].split(b"Subject: ")[1])
    assert [(f, r) for f, r, _ in got] == [
        ("sender@example.net", [f"{USER}@example.org"]),
        ("sender@example.net", [f"{USER}@example.org"]),
    ]
    for i, (_, _, content) in zip((1, 2), got, strict=True):
        assert f"Message-ID: <realclients-{i}@popguard.test>".encode() in content
        assert f"body token-{i}".encode() in content
        assert b"(Postfix) with ESMTP" in content  # Postfix's own Received:
