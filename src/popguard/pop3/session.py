"""The POP3 server session as a pure state machine (in the manner of h11).

`ServerSession` takes the bytes a client sent and gives back events: replies to
write, or requests that need I/O (check a password, read a message, apply the
deletions, start TLS). The asyncio layer only moves bytes and answers those
requests; every protocol rule lives here, so it can be tested with transcripts
and random input without a socket.
"""

from __future__ import annotations

import binascii
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum, auto

from popguard.pop3 import limits
from popguard.pop3.message_format import TERMINATOR, top
from popguard.pop3.replies import ResponseCode, err, multiline, ok


# Exchange's LoginType, kept here because it is a rule of the protocol: when credentials may
# travel before TLS. PopSettings (in the directory) stores it.
class LoginType(StrEnum):
    PLAIN_TEXT_LOGIN = "PlainTextLogin"  # USER/PASS and AUTH PLAIN allowed without TLS
    PLAIN_TEXT_AUTHENTICATION = "PlainTextAuthentication"  # AUTH PLAIN only without TLS
    SECURE_LOGIN = "SecureLogin"  # no credentials before TLS


class Phase(Enum):
    AUTHORIZATION = auto()
    SASL_RESPONSE = auto()  # waiting for the client's line after "+ " (RFC 5034)
    TRANSACTION = auto()
    WAITING = auto()  # a request is out to the I/O layer; no input is read
    CLOSED = auto()


@dataclass(frozen=True)
class SessionConfig:
    login_type: LoginType = LoginType.SECURE_LOGIN
    max_command_size: int = 512
    tls_available: bool = True
    implementation: str = "popguard"
    greeting: str = "popguard POP3 server ready"
    login_delay: int = 0  # seconds between a user's logins; announced by CAPA when set


# Events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    data: bytes


@dataclass(frozen=True)
class Authenticate:
    user: str
    password: str = field(repr=False)
    mechanism: str  # "USER" for USER/PASS, else the SASL mechanism


@dataclass(frozen=True)
class Retrieve:
    number: int
    uid: int
    size: int
    body_lines: int | None  # None for RETR, the line count for TOP


@dataclass(frozen=True)
class Update:
    """QUIT in the TRANSACTION state: remove these messages in one transaction."""

    deleted_uids: tuple[int, ...]


@dataclass(frozen=True)
class StartTls:
    reply: bytes  # write this, then start TLS on the connection


@dataclass(frozen=True)
class Close:
    reason: str


class NeedData:
    """No complete command yet: read more bytes."""


NEED_DATA = NeedData()

Event = Reply | Authenticate | Retrieve | Update | StartTls | Close | NeedData


@dataclass(frozen=True)
class CommandRecord:
    """What the protocol log and counters need to know about one command."""

    keyword: str
    parameters: str  # secrets already removed
    size: int


# Slots: a session holds one of these per message for as long as it lasts.
@dataclass(frozen=True, slots=True)
class MaildropEntry:
    uid: int
    size: int


# The legal (command, phase) pairs, in one place.
_AUTH = frozenset({Phase.AUTHORIZATION})
_TRANSACTION = frozenset({Phase.TRANSACTION})
_BOTH = _AUTH | _TRANSACTION
COMMAND_PHASES: dict[str, frozenset[Phase]] = {
    "CAPA": _BOTH,
    "QUIT": _BOTH,
    "USER": _AUTH,
    "PASS": _AUTH,
    "AUTH": _AUTH,
    "STLS": _AUTH,
    "STAT": _TRANSACTION,
    "LIST": _TRANSACTION,
    "RETR": _TRANSACTION,
    "DELE": _TRANSACTION,
    "NOOP": _TRANSACTION,
    "RSET": _TRANSACTION,
    "TOP": _TRANSACTION,
    "UIDL": _TRANSACTION,
}

SASL_MECHANISMS = ("PLAIN",)
REDACTED = "****"  # what logs show instead of a secret


class ServerSession:
    def __init__(self, config: SessionConfig, secure: bool = False) -> None:
        self.config = config
        self.secure = secure
        self.phase = Phase.AUTHORIZATION
        self.user: str | None = None  # set once logged in
        self.last_command: CommandRecord | None = None
        self.bad_commands = 0
        self.lines_read = 0  # complete lines taken from the input, refused ones too
        self._buffer = bytearray()
        self._discarding = False  # inside an over-long line, until its end
        self._eof = False
        self._outbox: deque[Event] = deque()
        self._user_candidate: str | None = None  # from USER, waiting for PASS
        self._user_for_pass: str | None = None
        self._sasl_mechanism = ""
        self._maildrop: list[MaildropEntry] = []
        self._deleted: set[int] = set()  # message numbers marked by DELE

    # Input ------------------------------------------------------------------------

    def greeting(self) -> bytes:
        return ok(self.config.greeting)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; b"" means the client closed its side."""
        if not data:
            self._eof = True
        elif self.phase is not Phase.CLOSED:
            self._buffer += data

    @property
    def partial_line(self) -> bool:
        """Part of a line has arrived but not its end: the I/O layer bounds how long
        a line may take from its first byte, which an idle timer alone cannot do
        when every byte restarts it."""
        return bool(self._buffer) or self._discarding

    def next_event(self) -> Event:
        while True:
            if self._outbox:
                return self._outbox.popleft()
            if self.phase is Phase.CLOSED:
                return Close("session closed")
            if self.phase is Phase.WAITING:
                raise RuntimeError("next_event() called while a request is outstanding")
            line = self._next_line()
            if line is not None:
                self._handle_line(line)
            elif not self._outbox:
                if self._eof:
                    self.phase = Phase.CLOSED
                    # A client that leaves without QUIT deletes nothing (RFC 1939 section 6).
                    return Close("client closed the connection")
                return NEED_DATA

    def _line_limit(self) -> int:
        if self.phase is Phase.SASL_RESPONSE:
            return limits.MAX_SASL_LINE
        return self.config.max_command_size

    def _next_line(self) -> bytes | None:
        """The next complete line, without its line ending.

        None when there is none yet, or when the line was refused (the reason is
        then in the outbox).
        """
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > self._line_limit():
                # Keep memory bounded: drop what we have and remember that the rest
                # of this line is to be dropped too.
                self._buffer.clear()
                self._discarding = True
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self.lines_read += 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._discarding or len(line) > self._line_limit():
            limit = self._line_limit()
            self._discarding = False
            self.last_command = CommandRecord("?", "", len(line))
            if self.phase is Phase.SASL_RESPONSE:
                self.phase = Phase.AUTHORIZATION  # the AUTH exchange is over
            self._bad(f"line too long (at most {limit} octets)")
            return None
        return line

    # Commands -----------------------------------------------------------------------

    def _handle_line(self, line: bytes) -> None:
        if self.phase is Phase.SASL_RESPONSE:
            self.last_command = CommandRecord("AUTH", REDACTED, len(line))
            self._sasl_response(line)
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.last_command = CommandRecord("?", "", len(line))
            self._bad("command is not valid UTF-8")
            return
        if any(ord(c) < 0x20 or c == "\x7f" for c in text):
            self.last_command = CommandRecord("?", "", len(line))
            self._bad("control characters are not allowed in commands")
            return
        keyword, _, argument = text.partition(" ")
        keyword = keyword.upper()
        phases = COMMAND_PHASES.get(keyword)
        # Arguments are recorded only for known commands, secrets redacted: what a
        # client sends as an unknown command may be a password typed in the wrong place.
        shown = redact(keyword, argument) if phases else ""
        self.last_command = CommandRecord(keyword[:16], shown[:128], len(line))
        if phases is None:
            self._bad("unknown command" if keyword else "empty command")
            return
        if self.phase not in phases:
            self._bad(f"{keyword} is not valid in the {self.phase.name} state")
            return
        # USER names the mailbox for the PASS right after it and for nothing else.
        self._user_for_pass = self._user_candidate if keyword == "PASS" else None
        self._user_candidate = None
        getattr(self, f"_cmd_{keyword.lower()}")(argument)

    def _send(self, data: bytes) -> None:
        self._outbox.append(Reply(data))

    def _bad(self, text: str, code: ResponseCode | None = None) -> None:
        """Refuse what the client sent; each refusal spends the bad-command budget."""
        self.bad_commands += 1
        if self.bad_commands >= limits.MAX_BAD_COMMANDS:
            self._send(err("too many bad commands, closing the connection"))
            self._close("bad command budget spent")
        else:
            self._send(err(text, code))

    def _close(self, reason: str) -> None:
        self.phase = Phase.CLOSED
        self._buffer.clear()
        self._outbox.append(Close(reason))

    # AUTHORIZATION ------------------------------------------------------------------------

    def _plaintext_allowed(self, mechanism: str) -> bool:
        if self.secure or self.config.login_type is LoginType.PLAIN_TEXT_LOGIN:
            return True
        return self.config.login_type is LoginType.PLAIN_TEXT_AUTHENTICATION and mechanism != "USER"

    def _refuse_plaintext(self) -> None:
        self._bad(
            "Plaintext authentication disallowed on non-secure connections; use STLS",
            ResponseCode.AUTH,
        )

    def _cmd_capa(self, argument: str) -> None:
        capabilities = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.phase is Phase.AUTHORIZATION:
            if self._plaintext_allowed("USER"):
                capabilities.append("USER")
            if self._plaintext_allowed("PLAIN"):
                capabilities.append("SASL " + " ".join(SASL_MECHANISMS))
            if self.config.tls_available and not self.secure:
                capabilities.append("STLS")
        if self.config.login_delay:
            # RFC 2449 section 6.5: the minimum seconds between logins.
            capabilities.append(f"LOGIN-DELAY {self.config.login_delay}")
        capabilities.append(f"IMPLEMENTATION {self.config.implementation}")
        self._send(multiline(ok("Capability list follows"), capabilities))

    def _cmd_quit(self, argument: str) -> None:
        if self.phase is Phase.AUTHORIZATION:
            self._send(ok("popguard signing off"))
            self._close("QUIT")
            return
        self.phase = Phase.WAITING
        uids = tuple(sorted(self._maildrop[n - 1].uid for n in self._deleted))
        self._outbox.append(Update(uids))

    def _cmd_stls(self, argument: str) -> None:
        if self.secure:
            self._send(err("TLS is already active"))
            return
        if not self.config.tls_available:
            self._send(err("TLS is not available", ResponseCode.SYS_PERM))
            return
        # Anything the client pipelined after STLS arrived in the clear: drop it
        # rather than run it inside the TLS session (CVE-2011-0411).
        self._buffer.clear()
        self.phase = Phase.WAITING
        self._outbox.append(StartTls(ok("Begin TLS negotiation")))

    def _cmd_user(self, argument: str) -> None:
        if not self._plaintext_allowed("USER"):
            self._refuse_plaintext()
            return
        name = argument.strip()
        if not name:
            self._bad("USER needs a mailbox name")
            return
        self._user_candidate = name
        self._send(ok("send PASS"))

    def _cmd_pass(self, argument: str) -> None:
        if not self._plaintext_allowed("USER"):
            self._refuse_plaintext()
            return
        user = self._user_for_pass
        if user is None:
            self._bad("PASS must follow a successful USER")
            return
        self._request_login(user, argument, "USER")

    def _cmd_auth(self, argument: str) -> None:
        mechanism, _, initial = argument.strip().partition(" ")
        mechanism = mechanism.upper()
        if not mechanism:
            self._send(multiline(ok("SASL mechanisms follow"), list(SASL_MECHANISMS)))
            return
        if mechanism not in SASL_MECHANISMS:
            self._bad(f"unsupported authentication mechanism {mechanism[:20]}")
            return
        if not self._plaintext_allowed(mechanism):
            self._refuse_plaintext()
            return
        self._sasl_mechanism = mechanism
        if initial:
            # RFC 5034 section 4: "=" stands for an empty initial response.
            self._sasl_response(b"" if initial == "=" else initial.encode())
        else:
            self.phase = Phase.SASL_RESPONSE
            self._send(b"+ \r\n")

    def _sasl_response(self, line: bytes) -> None:
        self.phase = Phase.AUTHORIZATION
        if line == b"*":
            self._send(err("AUTH canceled"))
            return
        try:
            decoded = binascii.a2b_base64(line, strict_mode=True) if line else b""
        except (binascii.Error, ValueError):
            self._send(err("AUTH response is not valid base64", ResponseCode.AUTH))
            return
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            self._send(err("malformed PLAIN response (RFC 4616)", ResponseCode.AUTH))
            return
        try:
            authzid, authcid, password = (part.decode("utf-8") for part in parts)
        except UnicodeDecodeError:
            self._send(err("PLAIN credentials are not valid UTF-8", ResponseCode.AUTH))
            return
        if not authcid:
            self._send(err("PLAIN response has no user name", ResponseCode.AUTH))
            return
        if authzid and authzid != authcid:
            self._send(err("acting as another user is not allowed", ResponseCode.AUTH))
            return
        self._request_login(authcid, password, self._sasl_mechanism)

    def _request_login(self, user: str, password: str, mechanism: str) -> None:
        self.phase = Phase.WAITING
        self._outbox.append(Authenticate(user, password, mechanism))

    def login_succeeded(self, user: str, maildrop: Sequence[MaildropEntry]) -> None:
        """The I/O layer's answer to `Authenticate`: the user and their messages."""
        self._expect_waiting()
        self.user = user
        self._maildrop = list(maildrop)
        self._deleted = set()
        self.phase = Phase.TRANSACTION
        count, octets = self._totals()
        self._send(ok(f"Logged in, {count} messages ({octets} octets)"))

    def login_failed(self, text: str, code: ResponseCode | None = ResponseCode.AUTH) -> None:
        self._expect_waiting()
        self.phase = Phase.AUTHORIZATION
        self._send(err(text, code))

    def login_refused(self, reply: bytes) -> None:
        """A login refused elsewhere (the proxy's back end): its reply, word for word."""
        self._expect_waiting()
        self.phase = Phase.AUTHORIZATION
        self._send(reply)

    def detach(self, user: str) -> bytes:
        """The login was handed to a back end: end this session and give back what
        the client pipelined after its login, to be passed on unparsed."""
        self._expect_waiting()
        self.user = user
        self.phase = Phase.CLOSED
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    def tls_started(self) -> None:
        self._expect_waiting()
        self.secure = True
        self.phase = Phase.AUTHORIZATION
        # RFC 2595 section 4: forget anything learned before TLS.
        self._user_candidate = None
        self._buffer.clear()

    def _expect_waiting(self) -> None:
        if self.phase is not Phase.WAITING:
            raise RuntimeError(f"no request is outstanding (phase {self.phase.name})")

    # TRANSACTION ----------------------------------------------------------------------------

    def _totals(self) -> tuple[int, int]:
        live = [m for n, m in enumerate(self._maildrop, 1) if n not in self._deleted]
        return len(live), sum(m.size for m in live)

    def _message_number(self, argument: str) -> int | None:
        """A live message number, or None after queueing the reason it is not."""
        token = argument.strip()
        if not _is_number(token):
            self._bad(f"invalid message number {token[:20]!r}")
            return None
        number = int(token)
        if not 1 <= number <= len(self._maildrop):
            self._bad(f"no such message, only {len(self._maildrop)} in maildrop")
            return None
        if number in self._deleted:
            self._bad(f"message {number} already deleted")
            return None
        return number

    def _cmd_stat(self, argument: str) -> None:
        count, octets = self._totals()
        self._send(ok(f"{count} {octets}"))

    def _listing(self, argument: str, value: str) -> None:
        if argument.strip():
            number = self._message_number(argument)
            if number is not None:
                self._send(ok(f"{number} {self._value(number, value)}"))
            return
        count, octets = self._totals()
        lines = [
            f"{n} {self._value(n, value)}"
            for n in range(1, len(self._maildrop) + 1)
            if n not in self._deleted
        ]
        self._send(multiline(ok(f"{count} messages ({octets} octets)"), lines))

    def _value(self, number: int, value: str) -> str:
        entry = self._maildrop[number - 1]
        return str(entry.size) if value == "size" else str(entry.uid)

    def _cmd_list(self, argument: str) -> None:
        self._listing(argument, "size")

    def _cmd_uidl(self, argument: str) -> None:
        self._listing(argument, "uid")

    def _cmd_retr(self, argument: str) -> None:
        number = self._message_number(argument)
        if number is not None:
            self._request_message(number, None)

    def _cmd_top(self, argument: str) -> None:
        message, _, lines = argument.strip().partition(" ")
        if not _is_number(lines):
            self._bad("TOP needs a message number and a line count")
            return
        number = self._message_number(message)
        if number is not None:
            self._request_message(number, int(lines))

    def _request_message(self, number: int, body_lines: int | None) -> None:
        entry = self._maildrop[number - 1]
        self.phase = Phase.WAITING
        self._outbox.append(Retrieve(number, entry.uid, entry.size, body_lines))

    def message_found(self, request: Retrieve, wire: bytes | None) -> None:
        """The I/O layer's answer to `Retrieve`: the stored wire form, or None."""
        self._expect_waiting()
        self.phase = Phase.TRANSACTION
        if wire is None:
            # Only a crash between snapshot and now, or an operator's purge, gets here.
            self._send(err("message is no longer in the store", ResponseCode.SYS_TEMP))
            return
        if request.body_lines is None:
            self._send(ok(f"{request.size} octets"))
            self._send(wire)
        else:
            self._send(ok("top of message follows"))
            self._send(top(wire, request.body_lines))
        self._send(TERMINATOR)

    def _cmd_dele(self, argument: str) -> None:
        number = self._message_number(argument)
        if number is not None:
            self._deleted.add(number)
            self._send(ok(f"message {number} deleted"))

    def _cmd_noop(self, argument: str) -> None:
        self._send(ok())

    def _cmd_rset(self, argument: str) -> None:
        self._deleted.clear()
        count, octets = self._totals()
        self._send(ok(f"maildrop has {count} messages ({octets} octets)"))

    def update_done(self, succeeded: bool) -> None:
        """The I/O layer's answer to `Update`."""
        self._expect_waiting()
        if succeeded:
            self._send(ok(f"popguard signing off ({len(self._deleted)} messages deleted)"))
        else:
            # RFC 1939 section 6: say so when deletions could not be applied.
            self._send(err("some deleted messages not removed", ResponseCode.SYS_TEMP))
        self._close("QUIT")


_MECHANISM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,20}$")  # RFC 4422 section 3.1


def redact(keyword: str, argument: str) -> str:
    """The argument as logs may show it: no password, no SASL response.

    Idempotent, so a record redacted here can be redacted again by a log writer.
    """
    if keyword == "PASS":
        return REDACTED if argument else ""
    if keyword == "AUTH":
        mechanism, _, initial = argument.partition(" ")
        if not _MECHANISM_NAME.match(mechanism):
            return REDACTED if argument else ""
        return f"{mechanism} {REDACTED}" if initial else mechanism
    return argument


def _is_number(token: str) -> bool:
    """Decimal ASCII digits only: str.isdigit() also accepts '²', which int() refuses."""
    return token.isascii() and token.isdigit() and len(token) <= limits.MAX_MESSAGE_NUMBER_DIGITS
