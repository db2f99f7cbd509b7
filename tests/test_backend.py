"""The POP3 back end as a real process, talked to with Python's poplib and raw sockets."""

from __future__ import annotations

import base64
import json
import poplib
import socket
import ssl
import time
from pathlib import Path

import pytest

from popguard import paths
from popguard.net import tls
from popguard.pop3.session import LoginType
from popguard.services.counters import read_counters

from .conftest import PASSWORD, MailboxServer, message


def connect(server: MailboxServer) -> poplib.POP3:
    return poplib.POP3(server.address, server.pop3_port, timeout=10)


def login(server: MailboxServer, user: str, password: str = PASSWORD) -> poplib.POP3:
    client = connect(server)
    client.user(user)
    client.pass_(password)
    return client


def raw_session(server: MailboxServer, payload: bytes, pause: float | None = None) -> bytes:
    """Send `payload` at once (pipelined) and read every reply until the server closes
    (at most 30 s), or, with `pause`, until it is silent that long (for a payload after
    which the server keeps the connection open). Without `pause` a slow reply (an
    argon2id check on a loaded machine) is waited for, not taken for the end."""
    with socket.create_connection((server.address, server.pop3_port), timeout=10) as sock:
        sock.sendall(payload)
        sock.settimeout(pause if pause is not None else 1.0)
        received = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if pause is not None:
                    break
                continue
            if not chunk:
                break
            received += chunk
        return received


def test_deliver_list_retrieve_delete(mailbox_server: MailboxServer) -> None:
    user = mailbox_server.add_mailbox("alice@example.test")
    first, second = message("first"), message("second", body=".starts with a dot\r\nend\r\n")
    mailbox_server.deliver(user, first)
    mailbox_server.deliver(user, second)
    client = login(mailbox_server, user)
    count, _ = client.stat()
    assert count == 2
    uids_before = client.uidl()[1]
    _, lines, _ = client.retr(2)
    assert b"\r\n".join(lines) + b"\r\n" == b"Return-Path: <sender@example.test>\r\n" + second
    assert client.dele(1).startswith(b"+OK")
    assert client.quit().startswith(b"+OK")
    client = login(mailbox_server, user)
    assert client.stat()[0] == 1
    # The surviving message keeps its UIDL across sessions.
    assert client.uidl()[1] == [b"1 " + uids_before[1].split()[1]]
    client.quit()


def test_uids_are_never_reused(mailbox_server: MailboxServer) -> None:
    user = mailbox_server.add_mailbox("uids@example.test")
    seen: set[bytes] = set()
    for round_number in range(3):
        mailbox_server.deliver(user, message(f"round {round_number}"))
        client = login(mailbox_server, user)
        (uid_line,) = client.uidl()[1]
        uid = uid_line.split()[1]
        assert uid not in seen
        seen.add(uid)
        client.dele(1)
        client.quit()
    mailbox_server.stop_all()
    mailbox_server.start("pop3be")
    mailbox_server.start("delivery")
    mailbox_server.deliver(user, message("after restart"))
    client = login(mailbox_server, user)
    assert client.uidl()[1][0].split()[1] not in seen
    client.quit()


def test_second_login_gets_in_use(mailbox_server: MailboxServer) -> None:
    user = mailbox_server.add_mailbox("busy@example.test")
    first = login(mailbox_server, user)
    second = connect(mailbox_server)
    second.user(user)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(PASSWORD)
    first.quit()
    second.user(user)
    second.pass_(PASSWORD)
    second.quit()


def test_wrong_password_and_unknown_user_get_auth_code(mailbox_server: MailboxServer) -> None:
    user = mailbox_server.add_mailbox("carol@example.test")
    for name, password in ((user, "wrong"), ("nobody@example.test", PASSWORD)):
        client = connect(mailbox_server)
        client.user(name)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] authentication failed"):
            client.pass_(password)
        client.quit()
    assert "failed login for 'carol@example.test'" in mailbox_server.log_text("pop3be")


def test_password_change_takes_effect_at_once(mailbox_server: MailboxServer) -> None:
    from popguard.directory.passwords import hash_password

    user = mailbox_server.add_mailbox("dave@example.test")
    login(mailbox_server, user).quit()  # now in the authentication cache
    with mailbox_server.directory() as directory:
        directory.set_password_hash(user, hash_password("a new password"))
    client = connect(mailbox_server)
    client.user(user)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_(PASSWORD)
    client.quit()
    login(mailbox_server, user, "a new password").quit()


def test_implicit_tls_and_stls(mailbox_server: MailboxServer) -> None:
    user = mailbox_server.add_mailbox("erin@example.test")
    mailbox_server.deliver(user, message("tls"))
    mailbox_server.set_settings(LoginType=LoginType.SECURE_LOGIN)
    client = connect(mailbox_server)
    assert "USER" not in client.capa()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Plaintext authentication disallowed"):
        client.user(user)
    client.stls(mailbox_server.ssl_context())
    assert "USER" in client.capa()
    client.user(user)
    client.pass_(PASSWORD)
    assert client.stat()[0] == 1
    client.quit()
    secure = poplib.POP3_SSL(
        mailbox_server.address, mailbox_server.pop3s_port, context=mailbox_server.ssl_context()
    )
    secure.user(user)
    secure.pass_(PASSWORD)
    assert secure.stat()[0] == 1
    secure.quit()


def test_pipelined_session_over_a_raw_socket(mailbox_server: MailboxServer) -> None:
    user = mailbox_server.add_mailbox("frank@example.test")
    mailbox_server.deliver(user, message("one"))
    mailbox_server.deliver(user, message("two"))
    reply = raw_session(
        mailbox_server,
        f"USER {user}\r\nPASS {PASSWORD}\r\nSTAT\r\nLIST\r\nUIDL 2\r\nDELE 1\r\nQUIT\r\n".encode(),
    )
    lines = reply.split(b"\r\n")
    assert lines[0].startswith(b"+OK popguard POP3 back end")
    assert lines[1] == b"+OK send PASS"
    assert lines[2].startswith(b"+OK Logged in, 2 messages")
    assert lines[3].startswith(b"+OK 2 ")
    assert reply.endswith(b"+OK popguard signing off (1 messages deleted)\r\n")


def test_garbage_flood_is_cut_off_and_service_stays_up(mailbox_server: MailboxServer) -> None:
    junk = b"\x00\xff\xfe garbage \x01\x02\r\n" * 50 + b"A" * 100_000 + b"\r\n"
    reply = raw_session(mailbox_server, junk)
    assert b"Traceback" not in reply
    assert reply.rstrip().endswith(b"-ERR too many bad commands, closing the connection")
    user = mailbox_server.add_mailbox("grace@example.test")
    login(mailbox_server, user).quit()


def test_disconnect_without_quit_deletes_nothing(mailbox_server: MailboxServer) -> None:
    user = mailbox_server.add_mailbox("heidi@example.test")
    mailbox_server.deliver(user, message("keep me"))
    raw_session(mailbox_server, f"USER {user}\r\nPASS {PASSWORD}\r\nDELE 1\r\n".encode(), 0.3)
    client = login(mailbox_server, user)
    assert client.stat()[0] == 1
    client.quit()


def test_connection_limits(mailbox_server: MailboxServer) -> None:
    mailbox_server.set_settings(MaxConnectionFromSingleIP=2)
    held = [connect(mailbox_server), connect(mailbox_server)]
    with socket.create_connection((mailbox_server.address, mailbox_server.pop3_port), 5) as sock:
        assert sock.recv(200).startswith(b"-ERR [SYS/TEMP] too many connections from your address")
    for client in held:
        client.quit()
    time.sleep(0.2)
    connect(mailbox_server).quit()


def test_idle_client_is_cut_at_the_timeout(mailbox_server: MailboxServer) -> None:
    mailbox_server.set_settings(PreAuthenticatedConnectionTimeout=1)
    with socket.create_connection((mailbox_server.address, mailbox_server.pop3_port), 5) as sock:
        # A recv that outlives this socket timeout raises: the server must cut first.
        sock.settimeout(8)
        greeting = sock.recv(200)
        assert greeting.startswith(b"+OK")
        assert sock.recv(200) == b"-ERR [SYS/TEMP] autologout: idle for too long\r\n"
        assert sock.recv(200) == b""


def test_sort_order_descending(mailbox_server: MailboxServer) -> None:
    user = mailbox_server.add_mailbox("ivan@example.test")
    mailbox_server.deliver(user, message("older"))
    time.sleep(0.01)
    mailbox_server.deliver(user, message("newer"))
    mailbox_server.set_settings(MessageRetrievalSortOrder="Descending")
    client = login(mailbox_server, user)
    assert b"Subject: newer" in b"\r\n".join(client.top(1, 0)[1])
    client.quit()


def test_protocol_log_shows_the_session_without_the_password(
    mailbox_server: MailboxServer,
) -> None:
    user = mailbox_server.add_mailbox("judy@example.test")
    mailbox_server.deliver(user, message("logged"))
    mailbox_server.set_settings(ProtocolLogEnabled=True)
    client = login(mailbox_server, user)
    client.retr(1)
    client.quit()
    token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
    with socket.create_connection((mailbox_server.address, mailbox_server.pop3s_port), 10) as raw:
        context = mailbox_server.ssl_context()
        with context.wrap_socket(raw, server_hostname=mailbox_server.address) as tls:
            tls.recv(200)
            tls.sendall(f"AUTH PLAIN {token}\r\nQUIT\r\n".encode())
            replies = b""
            while chunk := tls.recv(4096):
                replies += chunk
    assert b"+OK Logged in" in replies
    folder = paths.server_folder(mailbox_server.data, "mbx1").default_protocol_log_dir("pop3be")
    deadline = time.monotonic() + 5
    text = ""
    while time.monotonic() < deadline and "Disconnected: QUIT" not in text:
        text = "".join(p.read_text() for p in sorted(folder.glob("POP3BE*.LOG")))
        time.sleep(0.1)
    assert (
        "#Fields: dateTime,sessionId,seqNumber,sIp,cIp,user,duration,rqsize,rpsize,command" in text
    )
    assert f",USER,{user}," in text
    assert ",PASS,****," in text
    assert ",RETR,1," in text
    assert "AUTH,PLAIN ****" in text
    assert PASSWORD not in text
    assert token not in text


def test_counters_are_published(mailbox_server: MailboxServer) -> None:
    user = mailbox_server.add_mailbox("ken@example.test")
    held = login(mailbox_server, user)
    held.noop()
    counters_file = paths.server_folder(mailbox_server.data, "mbx1").counters_file("pop3be")
    deadline = time.monotonic() + 5
    counters = None
    while time.monotonic() < deadline:
        counters = read_counters(counters_file)
        if counters and counters["CurrentConnections"] == 1 and counters["TotalCommands"] >= 3:
            break
        time.sleep(0.2)
    assert counters is not None, "no counters file"
    assert counters["CurrentConnections"] == 1
    assert counters["SuccessfulLogins"] == 1
    assert counters["AverageCommandProcessingTimeMs"] > 0
    assert counters["ProcessId"] == mailbox_server.processes["pop3be"].pid
    held.quit()
    json.dumps(counters)


def test_failed_logins_are_delayed_more_each_time(mailbox_server: MailboxServer) -> None:
    user = mailbox_server.add_mailbox("leo@example.test")
    for _ in range(3):
        client = connect(mailbox_server)
        client.user(user)
        with pytest.raises(poplib.error_proto):
            client.pass_("wrong")
        client.quit()
    # The delay doubles (0.25 s, 0.5 s, 1 s): check the order, not the clock.
    log = mailbox_server.log_text("pop3be")
    assert (
        "answering in 0.25s" in log and "answering in 0.50s" in log and "answering in 1.00s" in log
    )


def test_settings_file_path_is_inside_data(tmp_path: Path, mailbox_server: MailboxServer) -> None:
    assert paths.directory_file(mailbox_server.data).exists()


def test_commands_pipelined_after_stls_are_not_run(mailbox_server: MailboxServer) -> None:
    """CVE-2011-0411: plaintext sent right after STLS must not count as sent inside TLS."""
    user = mailbox_server.add_mailbox("mallory@example.test")
    with socket.create_connection((mailbox_server.address, mailbox_server.pop3_port), 10) as raw:
        assert raw.recv(200).startswith(b"+OK")
        raw.sendall(f"STLS\r\nUSER {user}\r\nPASS {PASSWORD}\r\n".encode())
        assert raw.recv(200) == b"+OK Begin TLS negotiation\r\n"
        context = mailbox_server.ssl_context()
        with context.wrap_socket(raw, server_hostname=mailbox_server.address) as tls:
            tls.sendall(b"STAT\r\n")
            # Were the injected USER/PASS run, this would be "+OK 0 0".
            assert tls.recv(200) == b"-ERR STAT is not valid in the AUTHORIZATION state\r\n"


def test_certificate_name_change_applies_without_restart(mailbox_server: MailboxServer) -> None:
    def served_names() -> set[str]:
        context = mailbox_server.ssl_context()
        context.check_hostname = False
        address = (mailbox_server.address, mailbox_server.pop3s_port)
        with (
            socket.create_connection(address, 10) as raw,
            context.wrap_socket(raw) as tls,
        ):
            certificate = tls.getpeercert(binary_form=True)
        assert certificate is not None
        from cryptography import x509

        names = x509.load_der_x509_certificate(certificate).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        return set(names.value.get_values_for_type(x509.DNSName))

    assert "mail.example.test" not in served_names()
    pid = mailbox_server.processes["pop3be"].pid
    mailbox_server.set_settings(X509CertificateName="mail.example.test")
    deadline = time.monotonic() + 10
    while "mail.example.test" not in served_names() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "mail.example.test" in served_names()
    assert mailbox_server.processes["pop3be"].pid == pid


def test_minimum_login_interval_gives_login_delay(mailbox_server: MailboxServer) -> None:
    user = mailbox_server.add_mailbox("poller@example.test")
    mailbox_server.set_settings(MinimumLoginInterval=600)
    client = connect(mailbox_server)
    assert client.capa()["LOGIN-DELAY"] == ["600"]
    client.user(user)
    client.pass_(PASSWORD)
    client.quit()
    again = connect(mailbox_server)
    again.user(user)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[LOGIN-DELAY\] logged in too recently"):
        again.pass_(PASSWORD)
    again.quit()


# TLS 1.2 CBC suites an ECDSA-keyed server could pick if it offered them (RFC 7457).
CBC_SUITES = ["ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256", "AES256-SHA256"]


@pytest.mark.parametrize("suite", CBC_SUITES)
def test_a_tls12_cbc_suite_is_refused(mailbox_server: MailboxServer, suite: str) -> None:
    context = mailbox_server.ssl_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(suite)
    endpoint = (mailbox_server.address, mailbox_server.pop3s_port)
    # The server ends the handshake (asyncio closes at once: the client reads EOF).
    with socket.create_connection(endpoint, 10) as raw, pytest.raises(ssl.SSLError):
        context.wrap_socket(raw, server_hostname=mailbox_server.address)


def test_tls12_offers_aead_suites_only(mailbox_server: MailboxServer) -> None:
    context = mailbox_server.ssl_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ALL")  # the client offers everything; the server picks
    endpoint = (mailbox_server.address, mailbox_server.pop3s_port)
    with (
        socket.create_connection(endpoint, 10) as raw,
        context.wrap_socket(raw, server_hostname=mailbox_server.address) as secure,
    ):
        suite = secure.cipher()
    assert suite is not None
    assert suite[0] in tls.SERVER_CIPHERS.split(":")


def test_the_certificate_names_only_this_server(mailbox_server: MailboxServer) -> None:
    address = mailbox_server.address
    context = mailbox_server.ssl_context()
    with (
        socket.create_connection((address, mailbox_server.pop3s_port), 10) as raw,
        context.wrap_socket(raw, server_hostname=address) as secure,
    ):
        certificate = secure.getpeercert()
    assert certificate is not None
    assert sorted(certificate["subjectAltName"]) == [
        ("DNS", address), ("DNS", "mbx1"), ("IP Address", address),
    ]  # fmt: skip
    # So it does not pass for a server on 127.0.0.1 or localhost.
    for other in ("localhost", "127.0.0.1"):
        with (
            socket.create_connection((address, mailbox_server.pop3s_port), 10) as raw,
            pytest.raises(ssl.SSLCertVerificationError, match="mismatch"),
        ):
            context.wrap_socket(raw, server_hostname=other)
