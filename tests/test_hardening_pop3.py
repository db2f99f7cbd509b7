"""POP3 connection hardening (issue 18): a full server makes room by closing the oldest
connection that has not logged in, logins and command lines have deadlines that
trickled bytes do not move, and a password typed into USER stays out of the log."""

from __future__ import annotations

import poplib
import socket
import time
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popguard import paths
from popguard.pop3.session import NeedData, Reply, ServerSession, SessionConfig
from popguard.services.protocol_log import shown_user_argument

from .conftest import PASSWORD, MailboxServer, Organization
from .test_frontend import login, wait_for_counters

EVICTED = (
    b"-ERR [SYS/TEMP] too many connections to this server,"
    b" closing this one as it has not logged in\r\n"
)


def idle_connection(host: str, port: int) -> socket.socket:
    """A connection that reads the greeting (so it is admitted) and then says nothing."""
    sock = socket.create_connection((host, port), timeout=10)
    assert sock.recv(200).startswith(b"+OK")
    return sock


def rest_of(sock: socket.socket) -> bytes:
    """Everything the server still sends, until it closes."""
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def test_a_full_front_end_evicts_the_oldest_connection_not_logged_in(
    organization: Organization,
) -> None:
    limit = 8
    organization.set_frontend_settings(MaxConnections=limit)
    users = [organization.add_mailbox(f"flood{n}@example.test") for n in range(limit + 1)]
    host, port = organization.frontend_address, organization.pop3_port
    idle = [idle_connection(host, port) for _ in range(limit)]
    sessions: list[poplib.POP3_SSL] = []
    try:
        # The server is full of connections that never log in: a user still gets in,
        # in the place of the oldest of them.
        sessions.append(login(organization, users[0]))
        assert rest_of(idle[0]) == EVICTED
        # The flood goes on: each newcomer takes a connection's place that has not
        # logged in, never the user's session.
        idle += [idle_connection(host, port) for _ in range(10)]
        assert sessions[0].stat() == (0, 0)
        # More users log in until every place is held by a logged-in session.
        sessions += [login(organization, user) for user in users[1:limit]]
        for sock in idle[1:]:
            assert rest_of(sock) == EVICTED
        with socket.create_connection((host, port), timeout=10) as refused:
            assert rest_of(refused) == (
                b"-ERR [SYS/TEMP] too many connections to this server, try again later\r\n"
            )
        # The server's own probes connect from its address and are served all the same.
        probe = login(organization, users[limit], source=host)
        assert probe.stat() == (0, 0)
        probe.quit()
        assert all(session.stat() == (0, 0) for session in sessions)
        wait_for_counters(
            organization, "cas1", "pop3",
            EvictedConnections=1 + 10 + (limit - 1), RejectedConnections=1,
        )  # fmt: skip
    finally:
        for session in sessions:
            session.quit()
        for sock in idle:
            sock.close()


def trickle(sock: socket.socket, pieces: Iterable[bytes], pause: float) -> bytes:
    """Send the pieces `pause` apart, reading all the while; everything the server
    sent once it closed the connection. Fails if it is still open after the last."""
    received = b""
    sock.settimeout(pause)
    for piece in pieces:
        sock.sendall(piece)
        try:
            while chunk := sock.recv(4096):
                received += chunk
            return received
        except TimeoutError:
            continue
    raise AssertionError(f"still open after every piece; it sent {received!r}")


def one_byte_at_a_time(text: bytes) -> list[bytes]:
    return [text[n : n + 1] for n in range(len(text))]


def test_a_client_trickling_bytes_is_cut_at_the_login_deadline(
    organization: Organization,
) -> None:
    organization.set_frontend_settings(PreAuthenticatedConnectionTimeout=2)
    host, port = organization.frontend_address, organization.pop3_port
    cut = b"-ERR [SYS/TEMP] autologout: login not completed within 2 seconds\r\n"
    # A byte every half second, never a line end: each byte would restart an idle timer.
    with idle_connection(host, port) as sock:
        assert trickle(sock, one_byte_at_a_time(b"USER slowloris@example.test"), 0.5) == cut
    # Whole commands that never log in are cut at the same deadline.
    with idle_connection(host, port) as sock:
        received = trickle(sock, [b"CAPA\r\n"] * 30, 0.5)
    assert received.startswith(b"+OK Capability list follows\r\n")
    assert received.endswith(b".\r\n" + cut)


def test_a_logged_in_client_trickling_a_command_line_is_cut(organization: Organization) -> None:
    """Through the front end, which relays bytes: the back end's session bounds the line."""
    user = organization.add_mailbox("trickle@example.test")
    organization.mailbox["mbx1"].set_settings(AuthenticatedConnectionTimeout=2)
    client = login(organization, user)
    assert client.stat() == (0, 0)
    received = trickle(client.sock, one_byte_at_a_time(b"STAT STAT STAT STAT STAT STAT"), 0.5)
    assert (
        received == b"-ERR [SYS/TEMP] autologout: command line not completed within 2 seconds\r\n"
    )
    client.close()


def test_a_password_typed_into_user_stays_out_of_the_protocol_log(
    mailbox_server: MailboxServer,
) -> None:
    user = mailbox_server.add_mailbox("quinn@example.test")
    mailbox_server.set_settings(ProtocolLogEnabled=True)
    for typed, password in (
        ("Edge5-PwInUser-Secret", PASSWORD),  # the password in USER
        ("Secret@Looks-Like.An-Address", PASSWORD),  # address-shaped, no such mailbox
        (user, "wrong password"),  # a known mailbox, a failed login
        (user.upper(), PASSWORD),  # a known mailbox as typed, logged in
    ):
        client = poplib.POP3(mailbox_server.address, mailbox_server.pop3_port, timeout=15)
        client.user(typed)
        if password == PASSWORD and typed.lower() == user:
            client.pass_(password)
        else:
            with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
                client.pass_(password)
        client.quit()
    folder = paths.server_folder(mailbox_server.data, "mbx1").default_protocol_log_dir("pop3be")
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline and text.count("Disconnected: QUIT") < 4:
        text = "".join(p.read_text() for p in sorted(folder.glob("POP3BE*.LOG")))
        time.sleep(0.1)
    assert "Secret" not in text
    assert text.count(",USER,****,") == 2
    assert text.count(f",USER,{user},") == 1
    assert text.count(f",USER,{user.upper()},") == 1
    # The held USER line keeps its place: before the PASS that followed it.
    assert text.index(",USER,****,") < text.index(",PASS,****,")


KNOWN = frozenset({"ann@example.test", "bob@example.test"})


@given(st.text(max_size=80), st.sampled_from(["", "ann@example.test"]))
def test_user_arguments_show_only_known_mailboxes(argument: str, logged_in: str) -> None:
    asked: list[str] = []

    def is_known(address: str) -> bool:
        asked.append(address)
        return address in KNOWN

    shown = shown_user_argument(argument, logged_in, is_known)
    address = argument.strip().lower()
    if not address or address in KNOWN:
        assert shown == argument
    else:
        assert shown == "****"
    # Only something shaped like an address is looked up, and nothing once logged in as it.
    assert all("@" in a for a in asked)
    if logged_in and address == logged_in:
        assert not asked


@given(st.sampled_from(sorted(KNOWN)), st.sampled_from(["", " ", "  "]), st.booleans())
def test_a_known_address_is_shown_however_it_is_cased(
    address: str, padding: str, upper: bool
) -> None:
    typed = padding + (address.upper() if upper else address) + padding
    assert shown_user_argument(typed, "", KNOWN.__contains__) == typed


@given(st.integers(0, 6), st.text(alphabet="CAP", max_size=4), st.data())
def test_the_session_says_when_a_line_is_partial(
    lines: int, partial: str, data: st.DataObject
) -> None:
    stream = b"CAPA\r\n" * lines + partial.encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    session = ServerSession(SessionConfig())
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        if start == end:
            continue  # b"" would say the client closed
        session.receive_data(stream[start:end])
        while not isinstance(event := session.next_event(), NeedData):
            assert isinstance(event, Reply)
    assert session.lines_read == lines
    assert session.partial_line == bool(partial)
