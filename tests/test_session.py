"""Transcript tests of the sans-I/O POP3 session: lines in, exact lines out."""

from __future__ import annotations

import base64

import pytest

from popguard.pop3 import limits
from popguard.pop3.session import (
    Authenticate,
    Close,
    Event,
    LoginType,
    MaildropEntry,
    NeedData,
    Reply,
    Retrieve,
    ServerSession,
    SessionConfig,
    StartTls,
    Update,
)

MESSAGES = {
    7: b"Subject: one\r\n\r\nfirst line\r\n..dotted\r\nthird\r\n",
    9: b"Subject: two\r\n\r\nbody\r\n",
}
MAILDROP = [MaildropEntry(7, 41), MaildropEntry(9, 24)]


class Driver:
    """Plays the I/O layer: answers requests the way the back end would."""

    def __init__(self, config: SessionConfig | None = None, secure: bool = False) -> None:
        self.session = ServerSession(config or SessionConfig(), secure=secure)
        self.events: list[Event] = []
        self.password = "secret"

    def send(self, data: bytes) -> bytes:
        self.session.receive_data(data)
        out = b""
        while True:
            event = self.session.next_event()
            self.events.append(event)
            if isinstance(event, NeedData | Close):
                return out
            if isinstance(event, Reply):
                out += event.data
            elif isinstance(event, Authenticate):
                if event.password == self.password and event.user == "alice@example.test":
                    self.session.login_succeeded(event.user, MAILDROP)
                else:
                    self.session.login_failed("authentication failed")
            elif isinstance(event, Retrieve):
                self.session.message_found(event, MESSAGES.get(event.uid))
            elif isinstance(event, Update):
                self.session.update_done(True)
            elif isinstance(event, StartTls):
                out += event.reply
                self.session.tls_started()

    def login(self) -> None:
        assert self.send(b"USER alice@example.test\r\nPASS secret\r\n").endswith(
            b"+OK Logged in, 2 messages (65 octets)\r\n"
        )


def plain_login_driver() -> Driver:
    return Driver(SessionConfig(login_type=LoginType.PLAIN_TEXT_LOGIN))


def test_greeting() -> None:
    assert Driver().session.greeting() == b"+OK popguard POP3 server ready\r\n"


def test_capa_before_tls_under_secure_login_hides_plaintext_mechanisms() -> None:
    reply = Driver().send(b"CAPA\r\n")
    assert reply == (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
        b"PIPELINING\r\nSTLS\r\nIMPLEMENTATION popguard\r\n.\r\n"
    )


def test_capa_after_tls_offers_user_and_sasl_plain() -> None:
    reply = Driver(secure=True).send(b"CAPA\r\n")
    assert b"USER\r\nSASL PLAIN\r\n" in reply
    assert b"STLS" not in reply


def test_secure_login_refuses_user_before_tls() -> None:
    reply = Driver().send(b"USER alice@example.test\r\n")
    assert reply.startswith(b"-ERR [AUTH] Plaintext authentication disallowed")


def test_plain_text_authentication_allows_sasl_but_not_user() -> None:
    driver = Driver(SessionConfig(login_type=LoginType.PLAIN_TEXT_AUTHENTICATION))
    assert driver.send(b"USER a\r\n").startswith(b"-ERR [AUTH]")
    token = base64.b64encode(b"\0alice@example.test\0secret")
    assert driver.send(b"AUTH PLAIN " + token + b"\r\n").startswith(b"+OK Logged in")


def test_stls_then_login() -> None:
    driver = Driver()
    assert driver.send(b"STLS\r\n") == b"+OK Begin TLS negotiation\r\n"
    assert driver.session.secure
    driver.login()


def test_stls_discards_commands_pipelined_in_the_clear() -> None:
    driver = Driver()
    reply = driver.send(b"STLS\r\nUSER alice@example.test\r\nPASS secret\r\n")
    assert reply == b"+OK Begin TLS negotiation\r\n"
    assert not any(isinstance(e, Authenticate) for e in driver.events)
    assert driver.send(b"STAT\r\n").startswith(b"-ERR STAT is not valid")


def test_user_pass_wrong_password_then_right() -> None:
    driver = plain_login_driver()
    assert driver.send(b"USER alice@example.test\r\n") == b"+OK send PASS\r\n"
    assert driver.send(b"PASS nope\r\n") == b"-ERR [AUTH] authentication failed\r\n"
    assert driver.send(b"PASS secret\r\n").startswith(b"-ERR PASS must follow")
    driver.login()


def test_password_may_contain_spaces() -> None:
    driver = plain_login_driver()
    driver.password = "two words "
    driver.send(b"USER alice@example.test\r\nPASS two words \r\n")
    assert driver.session.user == "alice@example.test"


def test_auth_plain_with_continuation_and_cancel() -> None:
    driver = Driver(secure=True)
    assert driver.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert driver.send(b"*\r\n") == b"-ERR AUTH canceled\r\n"
    assert driver.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert driver.send(b"not base64!\r\n").startswith(b"-ERR [AUTH] AUTH response is not valid")
    assert driver.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    token = base64.b64encode(b"\0alice@example.test\0secret")
    assert driver.send(token + b"\r\n").startswith(b"+OK Logged in")


def test_auth_plain_refuses_another_authorization_identity() -> None:
    token = base64.b64encode(b"bob@example.test\0alice@example.test\0secret")
    reply = Driver(secure=True).send(b"AUTH PLAIN " + token + b"\r\n")
    assert reply == b"-ERR [AUTH] acting as another user is not allowed\r\n"


def test_auth_unknown_mechanism_and_listing() -> None:
    driver = Driver(secure=True)
    assert (
        driver.send(b"AUTH CRAM-MD5\r\n")
        == b"-ERR unsupported authentication mechanism CRAM-MD5\r\n"
    )
    assert driver.send(b"AUTH\r\n") == b"+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n"


def test_transaction_commands() -> None:
    driver = plain_login_driver()
    driver.login()
    assert driver.send(b"STAT\r\n") == b"+OK 2 65\r\n"
    assert driver.send(b"LIST\r\n") == b"+OK 2 messages (65 octets)\r\n1 41\r\n2 24\r\n.\r\n"
    assert driver.send(b"LIST 2\r\n") == b"+OK 2 24\r\n"
    assert driver.send(b"UIDL\r\n") == b"+OK 2 messages (65 octets)\r\n1 7\r\n2 9\r\n.\r\n"
    assert driver.send(b"UIDL 1\r\n") == b"+OK 1 7\r\n"
    assert driver.send(b"RETR 1\r\n") == b"+OK 41 octets\r\n" + MESSAGES[7] + b".\r\n"
    assert driver.send(b"TOP 1 1\r\n") == (
        b"+OK top of message follows\r\nSubject: one\r\n\r\nfirst line\r\n.\r\n"
    )
    assert driver.send(b"TOP 1 0\r\n") == b"+OK top of message follows\r\nSubject: one\r\n\r\n.\r\n"
    assert driver.send(b"DELE 1\r\n") == b"+OK message 1 deleted\r\n"
    assert driver.send(b"DELE 1\r\n") == b"-ERR message 1 already deleted\r\n"
    assert driver.send(b"RETR 1\r\n") == b"-ERR message 1 already deleted\r\n"
    assert driver.send(b"STAT\r\n") == b"+OK 1 24\r\n"
    assert driver.send(b"LIST\r\n") == b"+OK 1 messages (24 octets)\r\n2 24\r\n.\r\n"
    assert driver.send(b"RSET\r\n") == b"+OK maildrop has 2 messages (65 octets)\r\n"
    assert driver.send(b"NOOP\r\n") == b"+OK\r\n"
    assert driver.send(b"DELE 2\r\n") == b"+OK message 2 deleted\r\n"
    assert driver.send(b"QUIT\r\n") == b"+OK popguard signing off (1 messages deleted)\r\n"
    updates = [e for e in driver.events if isinstance(e, Update)]
    assert updates == [Update((9,))]
    assert isinstance(driver.events[-1], Close)


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"RETR 0", b"-ERR no such message, only 2 in maildrop\r\n"),
        (b"RETR 3", b"-ERR no such message, only 2 in maildrop\r\n"),
        (b"RETR -1", b"-ERR invalid message number '-1'\r\n"),
        (b"RETR", b"-ERR invalid message number ''\r\n"),
        (b"LIST 99999999999", b"-ERR invalid message number '99999999999'\r\n"),
        (b"TOP 1", b"-ERR TOP needs a message number and a line count\r\n"),
        (b"TOP 1 x", b"-ERR TOP needs a message number and a line count\r\n"),
        (b"USER x", b"-ERR USER is not valid in the TRANSACTION state\r\n"),
        (b"STLS", b"-ERR STLS is not valid in the TRANSACTION state\r\n"),
        (b"APOP alice 0123", b"-ERR unknown command\r\n"),
        (b"", b"-ERR empty command\r\n"),
    ],
)
def test_bad_transaction_input(command: bytes, reply: bytes) -> None:
    driver = plain_login_driver()
    driver.login()
    assert driver.send(command + b"\r\n") == reply


def test_commands_are_case_insensitive_and_bare_lf_is_accepted() -> None:
    driver = plain_login_driver()
    driver.send(b"user alice@example.test\npass secret\n")
    assert driver.send(b"stat\n") == b"+OK 2 65\r\n"


def test_pipelined_commands_are_answered_in_order() -> None:
    driver = plain_login_driver()
    reply = driver.send(b"USER alice@example.test\r\nPASS secret\r\nSTAT\r\nLIST 1\r\nUIDL 2\r\n")
    assert reply == (
        b"+OK send PASS\r\n+OK Logged in, 2 messages (65 octets)\r\n"
        b"+OK 2 65\r\n+OK 1 41\r\n+OK 2 9\r\n"
    )


def test_commands_split_across_reads() -> None:
    driver = plain_login_driver()
    assert driver.send(b"US") == b""
    assert driver.send(b"ER alice@exa") == b""
    assert driver.send(b"mple.test\r") == b""
    assert driver.send(b"\n") == b"+OK send PASS\r\n"


def test_wrong_state_in_authorization() -> None:
    assert Driver().send(b"STAT\r\n") == b"-ERR STAT is not valid in the AUTHORIZATION state\r\n"


def test_over_long_line_is_refused_and_the_session_goes_on() -> None:
    driver = plain_login_driver()
    reply = driver.send(b"USER " + b"a" * 2000 + b"\r\nNOOP\r\nCAPA\r\n")
    assert reply.startswith(b"-ERR line too long (at most 512 octets)\r\n")
    assert b"-ERR NOOP is not valid in the AUTHORIZATION state\r\n" in reply
    assert b"+OK Capability list follows" in reply


def test_over_long_line_arriving_in_pieces_is_not_buffered_whole() -> None:
    driver = plain_login_driver()
    for _ in range(100):
        assert driver.send(b"x" * 1000) == b""
        assert len(driver.session._buffer) <= 1000 + 512
    assert driver.send(b"\r\n") == b"-ERR line too long (at most 512 octets)\r\n"


def test_non_utf8_and_control_characters() -> None:
    driver = plain_login_driver()
    assert driver.send(b"\xff\xfe\r\n") == b"-ERR command is not valid UTF-8\r\n"
    assert (
        driver.send(b"US\x00ER a\r\n") == b"-ERR control characters are not allowed in commands\r\n"
    )


def test_bad_command_budget_closes_the_connection() -> None:
    driver = plain_login_driver()
    reply = driver.send(b"BOGUS\r\n" * (limits.MAX_BAD_COMMANDS + 5))
    assert reply.count(b"-ERR unknown command\r\n") == limits.MAX_BAD_COMMANDS - 1
    assert reply.endswith(b"-ERR too many bad commands, closing the connection\r\n")
    assert isinstance(driver.events[-1], Close)


def test_disconnect_without_quit_deletes_nothing() -> None:
    driver = plain_login_driver()
    driver.login()
    driver.send(b"DELE 1\r\n")
    driver.send(b"")
    assert isinstance(driver.events[-1], Close)
    assert not any(isinstance(e, Update) for e in driver.events)


def test_quit_in_authorization_closes_without_update() -> None:
    driver = plain_login_driver()
    assert driver.send(b"QUIT\r\n") == b"+OK popguard signing off\r\n"
    assert isinstance(driver.events[-1], Close)


def test_update_failure_is_reported() -> None:
    session = ServerSession(SessionConfig(login_type=LoginType.PLAIN_TEXT_LOGIN))
    session.receive_data(b"USER alice@example.test\r\nPASS secret\r\n")
    assert isinstance(session.next_event(), Reply)
    assert isinstance(session.next_event(), Authenticate)
    session.login_succeeded("alice@example.test", MAILDROP)
    assert isinstance(session.next_event(), Reply)
    session.receive_data(b"DELE 1\r\nQUIT\r\n")
    assert isinstance(session.next_event(), Reply)
    assert session.next_event() == Update((7,))
    session.update_done(False)
    assert session.next_event() == Reply(b"-ERR [SYS/TEMP] some deleted messages not removed\r\n")


def test_message_gone_from_store_is_a_temporary_error() -> None:
    driver = plain_login_driver()
    driver.login()
    driver.session._maildrop.append(MaildropEntry(99, 10))
    assert driver.send(b"RETR 3\r\n") == b"-ERR [SYS/TEMP] message is no longer in the store\r\n"


def test_secrets_are_not_in_the_command_record() -> None:
    driver = plain_login_driver()
    driver.send(b"USER alice@example.test\r\nPASS hunter2\r\n")
    record = driver.session.last_command
    assert record is not None and record.keyword == "PASS" and "hunter2" not in record.parameters
    driver2 = Driver(secure=True)
    token = base64.b64encode(b"\0alice@example.test\0hunter2")
    driver2.send(b"AUTH PLAIN " + token + b"\r\n")
    record = driver2.session.last_command
    assert record is not None and token.decode() not in record.parameters


def test_next_event_while_waiting_is_a_programming_error() -> None:
    session = ServerSession(SessionConfig(login_type=LoginType.PLAIN_TEXT_LOGIN))
    session.receive_data(b"USER a\r\nPASS b\r\n")
    session.next_event()
    assert isinstance(session.next_event(), Authenticate)
    with pytest.raises(RuntimeError):
        session.next_event()


def test_unicode_digits_are_not_message_numbers() -> None:
    driver = plain_login_driver()
    driver.login()
    assert driver.send("RETR ²\r\n".encode()) == "-ERR invalid message number '²'\r\n".encode()
    assert driver.send("TOP 1 ¹\r\n".encode()) == (
        b"-ERR TOP needs a message number and a line count\r\n"
    )


def test_over_long_sasl_response_ends_the_auth_exchange() -> None:
    driver = Driver(secure=True)
    assert driver.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert driver.send(b"A" * 1100 + b"\r\n") == b"-ERR line too long (at most 1026 octets)\r\n"
    assert driver.send(b"CAPA\r\n").startswith(b"+OK Capability list follows")


def test_argument_errors_spend_the_bad_command_budget() -> None:
    driver = plain_login_driver()
    driver.login()
    reply = driver.send(b"RETR 0\r\n" * limits.MAX_BAD_COMMANDS)
    assert reply.endswith(b"-ERR too many bad commands, closing the connection\r\n")
    assert isinstance(driver.events[-1], Close)


def test_unknown_commands_are_recorded_without_their_arguments() -> None:
    driver = plain_login_driver()
    driver.send(b" PASS hunter2\r\n")
    record = driver.session.last_command
    assert record is not None and "hunter2" not in record.parameters
