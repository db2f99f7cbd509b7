"""LMTP delivery (`popguard serve delivery`): RFC 2033 with aiosmtpd.

Delivery on any mailbox server takes mail for a mailbox of any database. Each
recipient is decided at RCPT: unknown (550 5.1.1), its database being moved or without
an active copy (451 4.3.0), or accepted, for the active copy here or on another
mailbox server. After DATA the route is decided again (a move may have happened in
between): recipients whose copy is active here are written, durably, as before; the
others are handed, one LMTP transaction per server (`lmtp_forward`), to the server with
the active copy, and each gets that server's own reply. The server answers once per
accepted RCPT, in RCPT order, as RFC 2033 section 4.2 requires; a recipient named twice
is stored once and answered twice.

Two listeners: `lmtp` for the MTAs, and `lmtp-peer` for the other mailbox servers,
TLS from the first octet with a mailbox server's certificate required. What comes in
on `lmtp-peer` is only ever written here (451 when the copy is not active here), so a
message is forwarded at most once and never in a loop. A port of its own rather than
STARTTLS on `lmtp`: the whole connection is encrypted and authenticated before the
first command (no cleartext phase to strip or inject into), being on that port is
what says "from a mailbox server, do not forward", and the MTAs' port is unchanged.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import Envelope, Session, syntax

from popguard.directory.config import load_config
from popguard.directory.directory import Mailbox, Server
from popguard.directory.sql.engine import DirectoryUnavailable
from popguard.errors import UserError
from popguard.net import tls
from popguard.net.byte_stream import TLS_HANDSHAKE_TIMEOUT
from popguard.net.serving import every
from popguard.net.workers import (
    LISTEN_BACKLOG,
    WorkerChannel,
    WorkerSetup,
    listening_socket,
    stop_or_master_gone,
)
from popguard.services.context import ServerContext, fencing_enabled, synchronous_copy_enabled
from popguard.services.copy_acknowledgement import SynchronousCopyWait
from popguard.services.counters import PUBLISH_INTERVAL, ServiceCounters
from popguard.services.lmtp_client import lmtp_ident
from popguard.services.lmtp_data import read_message_data
from popguard.services.lmtp_forward import Forwarder, Transaction
from popguard.services.lmtp_limits import LmtpLimits
from popguard.services.lmtp_path import PathError, parse_rcpt_argument
from popguard.services.lmtp_replies import with_enhanced_codes
from popguard.store.mailbox_database import (
    NotMountedError,
    QuotaExceededError,
    StoreFullError,
)
from popguard.store.mounted import MountedDatabases

log = logging.getLogger("popguard.delivery")

# RFC 5321 section 4.5.3.1.8: at least 100 recipients must be accepted.
MAX_RECIPIENTS = 1000


class PerRecipientLMTP(LMTP):
    """aiosmtpd's LMTP with popguard's RCPT, DATA, reply codes and timeouts.

    Timers: while the server waits for a command and none of it has come, the idle
    timer runs; from a command line's first octet to its newline, the command timer;
    from 354 to the final dot, the DATA deadline. Whichever runs out closes the
    connection with 421 4.4.2. None runs while the server itself is working.
    """

    def __init__(
        self,
        handler: DeliveryHandler,
        limits: LmtpLimits,
        admit: Callable[[asyncio.BaseTransport], str | None] | None = None,
        **options: Any,
    ) -> None:
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
        # Who may use this listener: None lets them in, else the reply that refuses.
        self._admit = admit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        refusal = self._admit(transport) if self._admit is not None else None
        if refusal is not None:
            peer = transport.get_extra_info("peername")
            log.warning("refusing LMTP connection from %s: %s", peer, refusal)
            # Before the greeting, which aiosmtpd's task has not sent yet.
            self._writer.write(f"{refusal}\r\n".encode())
            transport.close()

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
        envelope, self.envelope = self.envelope, self._create_envelope()
        if data.refusal is not None:
            # RFC 2033 section 4.2: one reply per accepted RCPT, refusals too.
            await self.push("\r\n".join([data.refusal] * len(envelope.rcpt_tos)))
            return
        envelope.content = envelope.original_content = data.content
        await self.push(await self.handler.handle_DATA(self, self.session, envelope))


class DeliveryHandler:
    """The hooks of one listener: `may_forward` on the MTAs' one, not on `lmtp-peer`'s."""

    def __init__(self, service: DeliveryService, may_forward: bool) -> None:
        self._service = service
        self._may_forward = may_forward

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
        route = self._service.route(address, self._may_forward)
        if isinstance(route, str):
            return route
        duplicate = route.address in envelope.rcpt_tos
        # Kept once per RCPT: each one is answered after DATA (RFC 2033 section 4.2).
        envelope.rcpt_tos.append(route.address)
        if duplicate:
            return f"250 2.1.5 <{route.address}> OK, already a recipient: stored once"
        if route.server is not None:
            return f"250 2.1.5 OK, for the active copy of {route.database} on {route.server.name}"
        full = self._service.already_over_quota(route)
        if full is not None:
            envelope.rcpt_tos.pop()
            return full
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        content: bytes = envelope.original_content or b""
        sender = (envelope.mail_from or "").strip("<>")
        recipients = list(dict.fromkeys(envelope.rcpt_tos))
        log.info(
            "DATA of %d octets from %s for %d recipient(s)",
            len(content),
            session.peer,
            len(recipients),
        )
        replies: dict[str, str] = {}
        here: list[str] = []
        elsewhere: dict[str, tuple[Server, list[str]]] = {}
        for recipient in recipients:
            route = self._service.route(recipient, self._may_forward)
            if isinstance(route, str):
                replies[recipient] = route
            elif route.server is None:
                here.append(recipient)
            else:
                elsewhere.setdefault(route.server.name, (route.server, []))[1].append(recipient)

        async def write_here() -> None:
            # RFC 5321 section 4.4: the final delivery adds the Return-Path.
            message = f"Return-Path: <{sender}>\r\n".encode() + content
            for recipient in here:
                replies[recipient] = await self._service.deliver(recipient, message)

        async def hand_over(target: Server, their_recipients: list[str]) -> None:
            transaction = Transaction(
                sender, tuple(envelope.mail_options), tuple(their_recipients), content
            )
            replies.update(await self._service.forward(target, transaction))

        await asyncio.gather(
            write_here(), *(hand_over(target, rs) for target, rs in elsewhere.values())
        )
        return "\r\n".join(replies[recipient] for recipient in envelope.rcpt_tos)

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd would put the exception's name and text on the wire.
        log.error("LMTP command failed", exc_info=error)
        return "451 4.3.0 Local error in processing, try again later"


@dataclass(frozen=True)
class Route:
    """Where one recipient's mail goes: the active copy of `database`, here (`server`
    None) or on `server`."""

    address: str
    database: str
    server: Server | None


class DeliveryService:
    def __init__(self, context: ServerContext, limits: LmtpLimits | None = None) -> None:
        self.context = context
        self.directory = context.directory
        self.server: Server = context.server
        self.organization = context.directory.organization_id()
        self.databases = MountedDatabases(
            context.folder, self.server.name, self.directory, fencing_enabled(context)
        )
        self.counters = ServiceCounters("delivery")
        self.limits = limits or LmtpLimits()
        # This server's certificate for the other mailbox servers (replication's): it
        # shows it on `lmtp-peer` and when it hands mail over.
        identity = context.tls.replication_identity(self.server.name, self.server.address)
        self._peer_tls = context.tls.mutual_server_context(identity)
        self._copies = SynchronousCopyWait(
            self.server,
            self.directory,
            context.tls.mutual_client_context(identity),
            synchronous_copy_enabled(context),
        )
        self._forwarder = Forwarder(
            helo=self.server.name,
            source=self.server.address,
            context=context.tls.mutual_client_context(identity),
            organization=self.organization,
            data_timeout=self.limits.data_timeout,
        )

    def route(self, address: str, may_forward: bool) -> Route | str:
        """Where mail for `address` goes now, or the reply that refuses it for now."""
        try:
            mailbox = self.directory.find_mailbox(address)
            if mailbox is None:
                return f"550 5.1.1 <{address}>: no such mailbox"
            database = mailbox.database
            if self.directory.move_in_progress(database):
                return (
                    f"451 4.3.0 <{mailbox.address}>: mailbox database {database} is being "
                    "moved, try again later"
                )
            active = self.directory.active_server(database)
            if active.lower() == self.server.name.lower():
                return Route(mailbox.address, database, None)
            if not may_forward:
                return (
                    f"451 4.3.0 <{mailbox.address}>: mailbox database {database} is active on "
                    f"{active}, not here, and forwarded mail is not forwarded again; try "
                    "again later"
                )
            return Route(mailbox.address, database, self.directory.get_server(active))
        except DirectoryUnavailable:  # unknown is not the same as absent: never 550 here
            return f"451 4.4.3 <{address}>: the directory is unreachable, try again later"
        except UserError as exc:  # no active copy, or a server the directory lost
            log.warning("no route for %s: %s", address, exc)
            return f"451 4.3.0 <{address}>: {exc}, try again later"
        except Exception:
            # Never raised: after DATA it would cost every recipient its own reply.
            log.exception("no route for %s: the directory failed", address)
            return f"451 4.3.0 <{address}>: directory unavailable, try again later"

    async def forward(self, target: Server, transaction: Transaction) -> dict[str, str]:
        replies = await self._forwarder.forward(target, transaction)
        accepted = sum(reply.startswith("2") for reply in replies.values())
        log.info(
            "handed %d octets to %s for %d recipient(s): %d accepted",
            len(transaction.content),
            target.name,
            len(transaction.recipients),
            accepted,
        )
        return replies

    def admit_peer(self, transport: asyncio.BaseTransport) -> str | None:
        """None when the client of an `lmtp-peer` connection is a mailbox server of this
        organization (its verified certificate says which), else the reply to close with."""
        ssl_object = transport.get_extra_info("ssl_object")
        certificate = ssl_object.getpeercert() if ssl_object is not None else None
        name, unit = tls.peer_name(certificate), tls.peer_unit(certificate)
        refused = f"554 5.7.1 {self.server.name}"
        if name is None or unit != tls.REPLICATION_UNIT:
            return f"{refused} takes mail from this organization's mailbox servers only"
        try:
            peer = self.directory.get_server(name)
        except UserError:
            return f"{refused}: {name} is not a server of this organization"
        except Exception:
            log.exception("cannot look %s up in the directory", name)
            return f"421 4.3.0 {self.server.name} cannot read the directory now, try again later"
        if "mailbox" not in peer.roles:
            return f"{refused}: {name} is not a mailbox server"
        return None

    async def deliver(self, recipient: str, message: bytes) -> str:
        """Store one copy for one recipient; the LMTP reply line for it. Never raises:
        an exception would make aiosmtpd answer once, with its text, for everyone."""
        try:
            mailbox = self.directory.find_mailbox(recipient)
            if mailbox is None:  # removed between RCPT and the end of DATA
                return f"550 5.1.1 <{recipient}>: no such mailbox"
            quota = self.directory.mailbox_quota(mailbox)
            uid, lsn = await self.databases.write_logged(
                mailbox.database,
                lambda store: store.deliver(mailbox.address, message, quota=quota),
            )
        except QuotaExceededError as exc:
            log.info("not delivering to %s: %s", recipient, exc)
            return self.mailbox_full(recipient)
        except StoreFullError as exc:
            log.error("not delivering to %s: the disk is full: %s", recipient, exc)
            return f"452 4.3.1 <{recipient}>: mail system full, try again later"
        except DirectoryUnavailable:
            return f"451 4.4.3 <{recipient}>: the directory is unreachable, try again later"
        except NotMountedError as exc:
            log.warning("not delivering to %s: %s", recipient, exc)
            return f"451 4.3.0 <{recipient}>: mailbox database not mounted here, try again later"
        except Exception:
            log.exception("delivery to %s failed", recipient)
            return f"451 4.3.0 <{recipient}>: temporary store failure, try again later"
        # 250 only once a passive copy holds it too: a host lost with the active copy
        # must not take an acknowledged message with it. Otherwise 451: the sender
        # tries again, and the cost is a possible duplicate, never a loss.
        unconfirmed = await self._copies.held(mailbox.database, lsn)
        if unconfirmed is not None:
            log.warning("delivered to %s as uid %d, here only: %s", recipient, uid, unconfirmed)
            return f"451 4.3.0 <{recipient}>: stored, but {unconfirmed}; try again later"
        self.counters.command_done(0.0)
        log.info("delivered to %s as uid %d (%d octets)", recipient, uid, len(message))
        return f"250 2.0.0 <{recipient}> delivered as uid {uid}"

    # Quotas (store-ops) ---------------------------------------------------------------

    def mailbox_full(self, recipient: str) -> str:
        """The reply to mail for a mailbox over its quota: 552 5.2.2, or 452 4.2.2 with
        `[delivery] quota_full_tempfail` (read at the refusal: refusals are rare)."""
        try:
            temporary = load_config(self.context.data).delivery.quota_full_tempfail
        except UserError as exc:
            log.error("%s; answering a full mailbox with the default 552", exc)
            temporary = False
        if temporary:
            return f"452 4.2.2 <{recipient}>: mailbox full, try again later"
        return f"552 5.2.2 <{recipient}>: mailbox full"

    def already_over_quota(self, route: Route) -> str | None:
        """At RCPT, for a mailbox whose active copy is here: the refusal if it holds its
        whole quota already (no message can fit), else None (DATA decides by size)."""
        try:
            mailbox: Mailbox | None = self.directory.find_mailbox(route.address)
            if mailbox is None:
                return None
            quota = self.directory.mailbox_quota(mailbox)
            if quota is None:
                return None
            used = self.databases.reader(route.database).usage(route.address).octets
        except Exception:  # DATA checks again, in the writing transaction
            log.exception("reading the quota of %s failed", route.address)
            return None
        return self.mailbox_full(route.address) if used >= quota else None

    def _protocol(self, handler: DeliveryHandler, peers_only: bool) -> PerRecipientLMTP:
        return PerRecipientLMTP(
            handler,
            self.limits,
            admit=self.admit_peer if peers_only else None,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.server.name,
            ident=lmtp_ident(self.organization),
        )

    async def run(self, stop: asyncio.Event, setup: WorkerSetup) -> None:
        """One worker: serve the sockets the master listens on (services/service_master)."""
        loop = asyncio.get_running_loop()
        address = self.server.address
        channel = WorkerChannel(setup)
        await channel.open()
        listeners = []
        for endpoint, handler, peers_only in (
            ("lmtp", DeliveryHandler(self, may_forward=True), False),
            ("lmtp-peer", DeliveryHandler(self, may_forward=False), True),
        ):
            listener = await loop.create_server(
                functools.partial(self._protocol, handler, peers_only),
                sock=listening_socket(setup, endpoint),
                backlog=LISTEN_BACKLOG,
                ssl=self._peer_tls if peers_only else None,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if peers_only else None,
            )
            listeners.append(listener)
        channel.notify({"op": "ready"})
        log.info(
            "LMTP worker serving %s:%d, from other mailbox servers on %d, pid %d",
            address,
            self.server.port("lmtp"),
            self.server.port("lmtp-peer"),
            os.getpid(),
        )
        publisher = asyncio.create_task(
            every(PUBLISH_INTERVAL, lambda: channel.notify(self.counters.report()), stop)
        )
        await stop_or_master_gone(stop, channel)
        for listener in listeners:
            listener.close()
        self._forwarder.close()
        await self._copies.aclose()
        await publisher
        await channel.close()
        self.databases.close()
        self.directory.close()


def serve(data: Path, server_name: str, limits: LmtpLimits) -> None:
    from popguard.net.serving import run_until_stopped, setup_logging
    from popguard.services.service_master import serve_with_workers

    setup_logging("delivery", server_name)

    def worker(setup: WorkerSetup) -> None:
        service = DeliveryService(ServerContext.open(data, server_name, "mailbox"), limits)
        run_until_stopped(functools.partial(service.run, setup=setup))

    endpoints = ("lmtp", "lmtp-peer")
    serve_with_workers(data, server_name, "delivery", "mailbox", endpoints, worker, limits=False)
