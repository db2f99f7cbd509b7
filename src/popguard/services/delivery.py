"""LMTP delivery (`popguard serve delivery`): RFC 2033 with aiosmtpd.

Each recipient is checked at RCPT time (550 5.1.1 when unknown). After DATA the
message is written, durably, into the active copy of each recipient's mailbox
database, and the server answers once per accepted RCPT, in RCPT order, as RFC 2033
section 4.2 requires; a recipient named twice is stored once and answered twice.
DATA is read here rather than by aiosmtpd, so that a refused message (too big, a line
too long, a NUL) is also answered once per RCPT, and long lines are kept byte-exact.
Every reply carries an enhanced status code (`lmtp_replies`), and every connection is
bounded in time: idle, within a command line, and within DATA.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import Envelope, Session, syntax

from popguard.directory.directory import Server
from popguard.directory.sql.engine import DirectoryUnavailable
from popguard.errors import UserError
from popguard.net.serving import every, listen
from popguard.services.context import ServerContext
from popguard.services.counters import PUBLISH_INTERVAL, ServiceCounters
from popguard.services.lmtp_client import lmtp_ident
from popguard.services.lmtp_data import read_message_data
from popguard.services.lmtp_path import PathError, parse_rcpt_argument
from popguard.services.lmtp_replies import with_enhanced_codes
from popguard.store.mailbox_database import NotMountedError
from popguard.store.mounted import MountedDatabases

log = logging.getLogger("popguard.delivery")

# The largest message accepted, in octets (552 5.3.4 beyond it).
DEFAULT_MAX_MESSAGE_SIZE = 50 * 1024 * 1024
# RFC 5321 section 4.5.3.1.8: at least 100 recipients must be accepted.
MAX_RECIPIENTS = 1000
# RFC 5321 section 4.5.3.1.6 asks for at least 1000 octets a line; HTML newsletters
# send far longer ones and Dovecot's LMTP stores them, so popguard does too, up to this.
DEFAULT_MAX_LINE_LENGTH = 64 * 1024
# RFC 5321 section 4.5.3.2.7 has a server wait 5 minutes for a command; LMTP's clients
# are the organization's own MTAs, which send at once or close (Postfix keeps an idle
# LMTP connection 2 s), so popguard waits less and frees the connection sooner.
DEFAULT_IDLE_TIMEOUT = 120.0
# From a command line's first octet to its end, however slowly the octets come.
DEFAULT_COMMAND_TIMEOUT = 60.0
# DATA may take a command's time plus the largest message at this rate, in octets a
# second: RFC 5321 bounds no whole DATA (section 4.5.3.2.5 has a client wait 3 minutes
# on each send), and a local MTA sends far faster than this.
DATA_MIN_RATE = 64 * 1024

# RFC 5321 section 4.5.3.1.6: 998 octets of text (1000 with CRLF) plus the transparency
# dot; the upper bound keeps one line's buffer well under a message.
MIN_LINE_LENGTH = 999
MAX_LINE_LENGTH = 16 * 1024 * 1024
# Timeouts one may set, in seconds: above an hour a connection is not "bounded".
MIN_TIMEOUT = 0.01
MAX_TIMEOUT = 3600.0


@dataclass(frozen=True)
class Tunable:
    """A limit `popguard serve delivery` reads from the environment."""

    variable: str
    minimum: float
    maximum: float
    whole: bool


TUNABLES = {
    "max_line_length": Tunable(
        "POPGUARD_LMTP_MAX_LINE_LENGTH", MIN_LINE_LENGTH, MAX_LINE_LENGTH, whole=True
    ),
    "idle_timeout": Tunable("POPGUARD_LMTP_IDLE_TIMEOUT", MIN_TIMEOUT, MAX_TIMEOUT, whole=False),
    "command_timeout": Tunable(
        "POPGUARD_LMTP_COMMAND_TIMEOUT", MIN_TIMEOUT, MAX_TIMEOUT, whole=False
    ),
}


@dataclass(frozen=True)
class LmtpLimits:
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT

    @property
    def data_timeout(self) -> float:
        return self.command_timeout + self.max_message_size / DATA_MIN_RATE

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], max_message_size: int) -> LmtpLimits:
        """The limits that `TUNABLES`' variables set, the defaults for the others."""
        values: dict[str, Any] = {"max_message_size": max_message_size}
        for field, tunable in TUNABLES.items():
            text = environ.get(tunable.variable)
            if text is not None:
                values[field] = _tuned(tunable, text)
        return cls(**values)


def _tuned(tunable: Tunable, text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    # `not (a <= x <= b)` also refuses NaN.
    if not tunable.minimum <= number <= tunable.maximum or (
        tunable.whole and not number.is_integer()
    ):
        kind = "a whole number" if tunable.whole else "a number"
        raise UserError(
            f"{tunable.variable} must be {kind} from {tunable.minimum:g} to "
            f"{tunable.maximum:g}, not {text!r}"
        )
    return int(number) if tunable.whole else number


class PerRecipientLMTP(LMTP):
    """aiosmtpd's LMTP with popguard's RCPT, DATA, reply codes and timeouts.

    Timers: while the server waits for a command and none of it has come, the idle
    timer runs; from a command line's first octet to its newline, the command timer;
    from 354 to the final dot, the DATA deadline. Whichever runs out closes the
    connection with 421 4.4.2. None runs while the server itself is working.
    """

    def __init__(self, handler: DeliveryHandler, limits: LmtpLimits, **options: Any) -> None:
        # aiosmtpd sizes its stream buffer from line_length_limit in __init__; command
        # lines stay bounded by command_size_limit (512, RFC 5321 section 4.5.3.1.4).
        self.line_length_limit = limits.max_line_length
        super().__init__(
            handler,
            data_size_limit=limits.max_message_size,
            # aiosmtpd's own timer counts from the last valid command, also through
            # DATA; it must outlast popguard's, which cut first and say why.
            timeout=limits.idle_timeout + limits.command_timeout + limits.data_timeout,
            **options,
        )
        self.handler = handler
        self.limits = limits
        # aiosmtpd keeps these in a dict shared by every connection and adds to MAIL's
        # at each LHLO: one per connection, started afresh at LHLO, keeps MAIL's bound.
        self.command_size_limits = collections.defaultdict(lambda: self.command_size_limit)
        self._idle_timer: asyncio.TimerHandle | None = None
        self._command_timer: asyncio.TimerHandle | None = None
        self._reading_data = False
        self._answering_lhlo = False

    # -- timers

    def data_received(self, data: bytes) -> None:
        if not self._reading_data:
            self._cancel_idle_timer()
            _, newline, rest = data.rpartition(b"\n")
            if newline:
                self._cancel_command_timer()
            if rest and self._command_timer is None:
                self._command_timer = self.loop.call_later(
                    self.limits.command_timeout, self._time_out, "command not received whole"
                )
        super().data_received(data)

    def connection_lost(self, error: Exception | None) -> None:
        self._cancel_idle_timer()
        self._cancel_command_timer()
        super().connection_lost(error)

    def _wait_for_command(self) -> None:
        if not self._reading_data and self._command_timer is None:
            self._cancel_idle_timer()
            self._idle_timer = self.loop.call_later(
                self.limits.idle_timeout, self._time_out, "idle for too long"
            )

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _cancel_command_timer(self) -> None:
        if self._command_timer is not None:
            self._command_timer.cancel()
            self._command_timer = None

    def _time_out(self, why: str) -> None:
        self._idle_timer = self._command_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        peer = self.session.peer if self.session is not None else None
        log.info("closing LMTP connection from %s: %s", peer, why)
        self._writer.write(f"421 4.4.2 {self.hostname} {why}, closing connection\r\n".encode())
        # close() sends what is buffered first, then aiosmtpd's connection_lost ends
        # the session.
        transport.close()

    # -- replies

    async def push(self, status: str | bytes) -> None:
        text = status.decode() if isinstance(status, bytes) else status
        if not self._answering_lhlo:
            text = with_enhanced_codes(text)
        # Armed before the write: a client that stops reading (its window full, drain
        # waiting) is cut as an idle one.
        self._wait_for_command()
        await super().push(text)

    # -- commands

    @syntax("LHLO hostname")
    async def smtp_LHLO(self, arg: str) -> None:
        if not arg:
            await self.push("501 5.5.4 Syntax: LHLO hostname")
            return
        self.command_size_limits.clear()
        self._answering_lhlo = True
        try:
            await super().smtp_LHLO(arg)
        finally:
            self._answering_lhlo = False

    @syntax("RCPT TO: <address>")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed("LHLO"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.mail_from:
            await self.push("503 5.5.1 Send MAIL first")
            return
        try:
            recipient = parse_rcpt_argument(arg or "")
        except PathError as error:
            await self.push(error.reply)
            return
        if recipient.parameters:  # none is advertised (no DSN)
            await self.push("555 5.5.4 RCPT TO parameters not recognized or not implemented")
            return
        reply = await self.handler.handle_RCPT(
            self, self.session, self.envelope, recipient.address, []
        )
        await self.push(reply)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed("LHLO"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Send RCPT first")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        self._reading_data = True
        self._cancel_command_timer()
        self._cancel_idle_timer()
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            async with asyncio.timeout(self.limits.data_timeout):
                data = await read_message_data(
                    self._reader, self.limits.max_message_size, self.limits.max_line_length
                )
        except TimeoutError:
            self._time_out(f"DATA not received within {self.limits.data_timeout:g} s")
            return
        finally:
            self._reading_data = False
        envelope, self.envelope = self.envelope, Envelope()
        if data.refusal is not None:
            # RFC 2033 section 4.2: one reply per accepted RCPT, refusals too.
            await self.push("\r\n".join([data.refusal] * len(envelope.rcpt_tos)))
            return
        envelope.content = envelope.original_content = data.content
        await self.push(await self.handler.handle_DATA(self, self.session, envelope))


class DeliveryHandler:
    def __init__(self, service: DeliveryService) -> None:
        self._service = service

    async def handle_EHLO(
        self, server: Any, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        # aiosmtpd leaves this to a handler with this hook; MAIL checks it was given.
        session.host_name = hostname
        # RFC 2034 section 2: say that every reply carries an enhanced status code.
        return [*responses[:-1], "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self, server: Any, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:  # fmt: skip
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:  # fmt: skip
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        try:
            mailbox = self._service.directory.find_mailbox(address)
        except DirectoryUnavailable:  # unknown is not the same as absent: never 550 here
            return f"451 4.4.3 <{address}>: the directory is unreachable, try again later"
        if mailbox is None:
            return f"550 5.1.1 <{address}>: no such mailbox"
        duplicate = mailbox.address in envelope.rcpt_tos
        # Kept once per RCPT: each one is answered after DATA (RFC 2033 section 4.2).
        envelope.rcpt_tos.append(mailbox.address)
        if duplicate:
            return f"250 2.1.5 <{mailbox.address}> OK, already a recipient: stored once"
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        content: bytes = envelope.original_content or b""
        sender = (envelope.mail_from or "").strip("<>")
        # RFC 5321 section 4.4: the final delivery adds the Return-Path.
        message = f"Return-Path: <{sender}>\r\n".encode() + content
        replies: dict[str, str] = {}
        for recipient in envelope.rcpt_tos:
            if recipient not in replies:
                replies[recipient] = await self._service.deliver(recipient, message)
        return "\r\n".join(replies[recipient] for recipient in envelope.rcpt_tos)

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd would put the exception's name and text on the wire.
        log.error("LMTP command failed", exc_info=error)
        return "451 4.3.0 Local error in processing, try again later"


class DeliveryService:
    def __init__(self, context: ServerContext, limits: LmtpLimits | None = None) -> None:
        self.context = context
        self.directory = context.directory
        self.server: Server = context.server
        self.organization = context.directory.organization_id()
        self.databases = MountedDatabases(context.folder, self.server.name, self.directory)
        self.counters = ServiceCounters("delivery")
        self.limits = limits or LmtpLimits()

    async def deliver(self, recipient: str, message: bytes) -> str:
        """Store one copy for one recipient; the LMTP reply line for it. Never raises:
        an exception would make aiosmtpd answer once, with its text, for everyone."""
        try:
            mailbox = self.directory.find_mailbox(recipient)
            if mailbox is None:  # removed between RCPT and the end of DATA
                return f"550 5.1.1 <{recipient}>: no such mailbox"
            uid = await self.databases.write(
                mailbox.database, lambda store: store.deliver(mailbox.address, message)
            )
        except DirectoryUnavailable:
            return f"451 4.4.3 <{recipient}>: the directory is unreachable, try again later"
        except NotMountedError as exc:
            log.warning("not delivering to %s: %s", recipient, exc)
            return f"451 4.3.0 <{recipient}>: mailbox database not mounted here, try again later"
        except Exception:
            log.exception("delivery to %s failed", recipient)
            return f"451 4.3.0 <{recipient}>: temporary store failure, try again later"
        self.counters.command_done(0.0)
        log.info("delivered to %s as uid %d (%d octets)", recipient, uid, len(message))
        return f"250 2.0.0 <{recipient}> delivered as uid {uid}"

    async def run(self, stop: asyncio.Event) -> None:
        handler = DeliveryHandler(self)
        loop = asyncio.get_running_loop()
        address, port = self.server.address, self.server.port("lmtp")
        listener = await listen(
            functools.partial(
                loop.create_server,
                lambda: PerRecipientLMTP(
                    handler,
                    self.limits,
                    enable_SMTPUTF8=True,
                    decode_data=False,
                    hostname=self.server.name,
                    ident=lmtp_ident(self.organization),
                ),
                address,
                port,
                reuse_address=True,
            ),
            "lmtp",
            address,
            port,
        )
        log.info(
            "LMTP listening on %s:%d, pid %d",
            self.server.address,
            self.server.port("lmtp"),
            os.getpid(),
        )
        counters_file = self.context.folder.counters_file("delivery")
        publisher = asyncio.create_task(
            every(PUBLISH_INTERVAL, lambda: self.counters.publish(counters_file), stop)
        )
        await stop.wait()
        listener.close()
        await publisher
        self.databases.close()
        self.directory.close()


def serve(data: Path, server_name: str, max_message_size: int) -> None:
    from popguard.net.serving import run_until_stopped, setup_logging

    setup_logging("delivery", server_name)
    limits = LmtpLimits.from_environment(os.environ, max_message_size)
    service = DeliveryService(ServerContext.open(data, server_name, "mailbox"), limits)
    run_until_stopped(service.run)
