"""What the POP3 back end and front end share: one asyncio server around the
sans-I/O `ServerSession`.

This module is one worker of the service (services/service_master.py starts the
master and its workers): it moves bytes, asks the master whether the server's
connection limits admit each connection (`services/server_limits.py`: the
limits are the server's, not a worker's; at MaxConnections the master closes
the oldest connection not logged in, whichever worker holds it), enforces the
timeouts, follows the POP settings live, and feeds the counters (summed by the
master) and the protocol log. A client has
PreAuthenticatedConnectionTimeout to log in, counted once from the accept, and
a command line must arrive whole within COMMAND_LINE_TIMEOUT of its first byte:
bytes trickled in one at a time do not keep a connection open. A subclass
says what a login means (`authenticate`) and, for the back end, how to read and
delete messages; the front end instead hands the logged-in connection over to a
back end (`Handoff`) and relays bytes.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import datetime
import functools
import itertools
import logging
import os
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from popguard.control.faults import Fault, read_fault
from popguard.directory.directory import Mailbox, Server
from popguard.directory.sql.engine import DirectoryUnavailable
from popguard.net import tls
from popguard.net.byte_stream import TLS_HANDSHAKE_TIMEOUT, ByteStream
from popguard.net.serving import every
from popguard.net.workers import (
    LISTEN_BACKLOG,
    LOCAL_ENDPOINT,
    WorkerChannel,
    WorkerSetup,
    listening_socket,
    stop_or_master_gone,
    worker_setup,
)
from popguard.pop3.replies import ResponseCode, err
from popguard.pop3.session import (
    Authenticate,
    Close,
    CommandRecord,
    NeedData,
    Reply,
    Retrieve,
    ServerSession,
    SessionConfig,
    StartTls,
    Update,
)
from popguard.services.authentication import LOCAL_FRONTEND, Authenticator
from popguard.services.context import ServerContext
from popguard.services.counters import PUBLISH_INTERVAL, ServiceCounters
from popguard.services.protocol_log import (
    ProtocolLog,
    ProtocolLogConfig,
    ProtocolLogRecord,
    shown_user_argument,
)

log = logging.getLogger("popguard.pop3")

DIRECTORY_POLL_INTERVAL = 1.0
SHUTDOWN_GRACE = 5.0

# A login the directory cannot judge now (PostgreSQL unreachable, this mailbox never
# seen by this process): the health probes read "directory" as the failing part.
DIRECTORY_UNREACHABLE = "the directory is unreachable; try again later"
MASTER_GONE = "service is stopping, try again later"
# The master answers an admission at once; one that does not within this (stopped,
# overloaded) is a service that cannot take connections now.
ADMISSION_TIMEOUT = 10.0
MASTER_SLOW = "service is busy, try again later"
# A command line must be complete this many seconds after its first byte (or within
# the connection's own timeout, if that is shorter). RFC 1939 section 3's autologout
# timer measures inactivity, which a client sending one byte every few seconds never
# shows; this bounds what such a client can hold.
COMMAND_LINE_TIMEOUT = 60


@dataclass
class Connection:
    session_id: str
    client_ip: str
    client_endpoint: str
    server_endpoint: str
    user: str = ""
    database: str = ""  # the logged-in user's mailbox database
    ended: bool = False  # session_ended has run
    accepted: float = 0.0  # event-loop time of the accept: the login deadline counts from it
    received: int = 0  # octets the client sent to this session
    evicted: bool = False  # closed to make room for a newcomer
    sequence: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


class CommandTimer:
    """Times each command from its parsing to its reply being handed to the socket."""

    def __init__(self, service: Pop3Service, connection: Connection) -> None:
        self._service = service
        self._connection = connection
        self._record: CommandRecord | None = None  # the command being timed
        self._seen: CommandRecord | None = None  # the last command the session parsed
        self._started = 0.0
        self._response_size = 0
        self._held_user: ProtocolLogRecord | None = None  # see log_line
        self.context = ""

    def observe(self, session: ServerSession) -> None:
        if session.last_command is not self._seen:
            self.finish()
            self._record = self._seen = session.last_command
            self._started = time.perf_counter()

    def add_response(self, size: int) -> None:
        self._response_size += size

    def finish(self) -> None:
        record = self._record
        if record is None:
            return
        elapsed_ms = (time.perf_counter() - self._started) * 1000.0
        self._service.counters.command_done(elapsed_ms)
        self.log_line(record, elapsed_ms, self._response_size, self.context)
        self._record = None
        self._response_size = 0
        self.context = ""

    def log_line(
        self, record: CommandRecord, elapsed_ms: float, response_size: int, context: str
    ) -> None:
        protocol_log = self._service.protocol_log
        if not protocol_log.enabled:
            return
        connection = self._connection
        line = ProtocolLogRecord(
            session_id=connection.session_id,
            sequence=next(connection.sequence),
            server_endpoint=connection.server_endpoint,
            client_endpoint=connection.client_endpoint,
            user=connection.user,
            duration_ms=elapsed_ms,
            request_size=record.size,
            response_size=response_size,
            command=record.keyword,
            parameters=record.parameters,
            context=context,
            moment=datetime.datetime.now(datetime.UTC),
        )
        self._write_held_user()
        if record.keyword == "USER":
            # USER's argument may be a password typed in the wrong place. Whether it
            # names a mailbox is known for free once the login after it is decided
            # (the next line is that PASS): so the line waits until then.
            self._held_user = line
            return
        protocol_log.write(line)

    def _write_held_user(self) -> None:
        held, self._held_user = self._held_user, None
        if held is None:
            return
        shown = shown_user_argument(held.parameters, self._connection.user, self._service.known)
        self._service.protocol_log.write(dataclasses.replace(held, parameters=shown))


@dataclass
class Handoff:
    """A login the front end completed on a back end: from now on, relay bytes."""

    backend: ByteStream
    backend_name: str
    reply: bytes  # the back end's "+OK" to the login, passed on to the client


class Pop3Service(abc.ABC):
    role: ClassVar[str]  # the directory role the server must have
    service: ClassVar[str]  # pop3be | pop3: names the counters and log folders
    log_prefix: ClassVar[str]  # POP3BE | POP3, as Exchange names its log files
    endpoints: ClassVar[tuple[str, str]]  # (plain+STLS, implicit TLS) port names
    title: ClassVar[str]  # for the greeting
    # Whether it also serves the front ends of its own host on a Unix socket
    # (ServerFolder.local_socket_file), where they need no TLS: see _connection.
    serves_local_socket: ClassVar[bool] = False
    counters_type: ClassVar[type[ServiceCounters]] = ServiceCounters

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self.directory = context.directory
        self.server: Server = context.server
        self.settings, self._settings_revision = self.directory.pop_settings(self.server.name)
        self.fault: Fault | None = read_fault(context.folder.fault_file(self.service))
        self._directory_version = self.directory.change_counter()
        self.counters = self.counters_type(self.service)
        self.counters.settings_revision = self._settings_revision
        self.protocol_log = ProtocolLog(self.log_prefix)
        setup = worker_setup()
        self.authenticator = Authenticator(
            self.directory,
            self.counters,
            self._share_login,
            bytes.fromhex(setup.cache_secret) if setup is not None else None,
        )
        self.channel: WorkerChannel | None = None  # to the master, once run() opened it
        # This worker's connections that have not logged in: the master may ask for
        # one of them to be closed to make room at MaxConnections.
        self._pre_login: dict[str, tuple[Connection, ByteStream]] = {}
        self._open: dict[str, tuple[Connection, ByteStream]] = {}  # every admitted one
        self._tasks: set[asyncio.Task[None]] = set()
        # One context for the life of the service: the implicit-TLS listener holds
        # it, so a new certificate is loaded into it rather than a new context made.
        self._tls_context = tls.server_context(self._certificate())
        self._apply_log_settings()

    # What a subclass decides -----------------------------------------------------------

    @abc.abstractmethod
    async def authenticate(
        self,
        session: ServerSession,
        request: Authenticate,
        connection: Connection,
        timer: CommandTimer,
    ) -> Handoff | None:
        """Answer the session's login request (login_succeeded or login_failed), or
        return a Handoff to relay the connection to a back end."""

    async def verified_mailbox(
        self,
        session: ServerSession,
        request: Authenticate,
        connection: Connection,
        timer: CommandTimer,
    ) -> Mailbox | None:
        """The mailbox whose password the client gave, or None after answering [AUTH]
        (or [SYS/TEMP] when the directory cannot say)."""
        try:
            mailbox = await self.authenticator.verify(
                request.user,
                request.password,
                connection.client_ip,
                connection.client_endpoint,
                request.mechanism,
            )
        except DirectoryUnavailable:
            timer.context = "DirectoryUnreachable"
            session.login_failed(DIRECTORY_UNREACHABLE, ResponseCode.SYS_TEMP)
            return None
        if mailbox is None:
            timer.context = "AuthFailed"
            session.login_failed("authentication failed", ResponseCode.AUTH)
        return mailbox

    def retrieve(self, session: ServerSession, request: Retrieve, connection: Connection) -> None:
        raise NotImplementedError(f"{self.service} does not serve messages itself")

    async def update(self, session: ServerSession, request: Update, connection: Connection) -> None:
        raise NotImplementedError(f"{self.service} does not serve messages itself")

    async def relay(
        self, handoff: Handoff, session: ServerSession, client: ByteStream, connection: Connection
    ) -> str:
        raise NotImplementedError(f"{self.service} does not relay")

    def session_ended(self, session: ServerSession, connection: Connection) -> None:
        """The session is over (the mailbox may be unlocked); called once."""

    def refusal(self, client_ip: str) -> str | None:
        """Why the subclass refuses a new connection from `client_ip` before any
        limit is looked at, or None."""
        return None

    def known(self, address: str) -> bool:
        """Whether `address` names a mailbox (for the protocol log's USER lines)."""
        return self.directory.find_mailbox(address) is not None

    def _is_local(self, client_ip: str) -> bool:
        # Monitoring probes run on this server and connect from its own address.
        return client_ip == self.server.address

    # The master ----------------------------------------------------------------------

    def _master(self) -> WorkerChannel:
        if self.channel is None:
            raise ConnectionError("no channel to the master")
        return self.channel

    def _share_login(
        self, failed: bool, client_ip: str, user: str, cache_key: bytes | None
    ) -> None:
        """Pass a login's outcome on to the other workers (through the master)."""
        if self.channel is not None:
            note = {"op": "login", "failed": failed, "ip": client_ip, "user": user}
            if cache_key is not None:
                note["key"] = cache_key.hex()
            self.channel.notify(note)

    def _login_elsewhere(self, message: dict[str, object]) -> None:
        key = message.get("key")
        self.authenticator.remote_outcome(
            bool(message["failed"]),
            str(message["ip"]),
            str(message["user"]),
            bytes.fromhex(key) if isinstance(key, str) else None,
        )

    def _logged_in(self, connection: Connection) -> None:
        """No newcomer may take this connection's place any more."""
        if self._pre_login.pop(connection.session_id, None) is not None and self.channel:
            self.channel.notify({"op": "logged_in", "session": connection.session_id})

    async def _admission(self, connection: Connection) -> str | None:
        """None when the server's limits admit `connection` (the master counts it from
        now until "closed"), else why not."""
        request = {
            "op": "admit",
            "session": connection.session_id,
            "ip": connection.client_ip,
            "local": self._is_local(connection.client_ip),
        }
        try:
            async with asyncio.timeout(ADMISSION_TIMEOUT):
                answer = await self._master().request(request)
        except ConnectionError:
            return MASTER_GONE
        except TimeoutError:
            # It may count the connection yet, when it answers: this says it has ended.
            self._master().notify({"op": "closed", "session": connection.session_id})
            return MASTER_SLOW
        refusal = answer.get("refusal") or answer.get("error")
        return str(refusal) if refusal else None

    async def take_user(self, connection: Connection, user: str) -> bool:
        """Whether MaxConnectionsPerUser (the server's) leaves `user` room for this
        connection, which then counts for it until it ends or `give_back_user`."""
        try:
            async with asyncio.timeout(ADMISSION_TIMEOUT):
                answer = await self._master().request(
                    {"op": "user", "session": connection.session_id, "user": user}
                )
        except ConnectionError:
            return False
        except TimeoutError:
            self.give_back_user(connection)
            return False
        return bool(answer.get("ok"))

    def give_back_user(self, connection: Connection) -> None:
        if self.channel is not None:
            self.channel.notify({"op": "user_done", "session": connection.session_id})

    def _evict(self, message: dict[str, object]) -> None:
        """The master makes room at MaxConnections with this connection of ours."""
        entry = self._pre_login.pop(str(message["session"]), None)
        if entry is None:  # it logged in or ended meanwhile: the master hears so soon
            return
        connection, stream = entry
        connection.evicted = True
        self.counters.evicted_connections += 1
        stream.write(
            err(
                "too many connections to this server, closing this one as it has not logged in",
                ResponseCode.SYS_TEMP,
            )
        )
        # Its task sees the end of the stream and ends the session the usual way.
        stream.close()

    def directory_changed(self) -> None:
        """Something in the directory changed (polled every second)."""

    def close_resources(self) -> None:
        """Release what the subclass holds when the service stops."""

    def periodic(self) -> list[tuple[float, Callable[[], None]]]:
        """(interval in seconds, job) a subclass runs on each worker's loop."""
        return []

    def open_connections(self) -> list[tuple[Connection, ByteStream]]:
        """Every connection admitted and not yet ended, logged in or not."""
        return list(self._open.values())

    # Settings ------------------------------------------------------------------------

    def _certificate(self) -> tls.CertificatePair:
        return self.context.tls.pop3_identity(
            self.server.name, self.server.address, self.settings.X509CertificateName
        )

    def _apply_log_settings(self) -> None:
        location = self.settings.LogFileLocation
        folder = (
            Path(location)
            if location
            else self.context.folder.default_protocol_log_dir(self.service)
        )
        self.protocol_log.configure(
            ProtocolLogConfig(
                enabled=self.settings.ProtocolLogEnabled,
                folder=folder,
                rollover=self.settings.LogFileRollOverSettings,
                size_quota=self.settings.LogPerFileSizeQuota,
            )
        )

    def poll_directory(self) -> None:
        """Pick up `set-popsettings` (and other directory) changes without a restart,
        and an injected fault (tests and demonstrations only)."""
        self.fault = read_fault(self.context.folder.fault_file(self.service))
        version = self.directory.change_counter()
        if version == self._directory_version:
            return
        self._directory_version = version
        self.directory_changed()
        settings, revision = self.directory.pop_settings(self.server.name)
        if revision == self._settings_revision:
            return
        old = self.settings
        self.settings, self._settings_revision = settings, revision
        self.counters.settings_revision = revision
        self._apply_log_settings()
        if settings.X509CertificateName != old.X509CertificateName:
            try:
                pair = self._certificate()
                self._tls_context.load_cert_chain(pair.certificate, pair.key)
            except (ValueError, OSError, ssl.SSLError) as exc:
                log.error("keeping the current certificate: cannot use a new one: %s", exc)
        log.info("POP settings revision %d applied", revision)

    def session_config(self) -> SessionConfig:
        return SessionConfig(
            login_type=self.settings.LoginType,
            max_command_size=self.settings.MaxCommandSize,
            tls_available=True,
            login_delay=self.settings.MinimumLoginInterval,
            greeting=f"popguard POP3 {self.title} {self.server.name} ready",
        )

    # Lifecycle -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, setup: WorkerSetup) -> None:
        """Serve the sockets the master listens on, until `stop` or the master goes."""
        address = self.server.address
        loop = asyncio.get_running_loop()
        channel = self.channel = WorkerChannel(setup)
        channel.on("evict", self._evict)
        channel.on("login", self._login_elsewhere)
        await channel.open()
        listeners = []
        for endpoint, implicit_tls in zip(self.endpoints, (False, True), strict=True):
            listeners.append(
                await loop.create_server(
                    functools.partial(
                        ByteStream, functools.partial(self._accept, implicit_tls=implicit_tls)
                    ),
                    sock=listening_socket(setup, endpoint),
                    backlog=LISTEN_BACKLOG,
                    ssl=self._tls_context if implicit_tls else None,
                    ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if implicit_tls else None,
                )
            )
        if LOCAL_ENDPOINT in setup.sockets:
            listeners.append(
                await loop.create_unix_server(
                    functools.partial(
                        ByteStream, functools.partial(self._accept, implicit_tls=False, local=True)
                    ),
                    sock=listening_socket(setup, LOCAL_ENDPOINT),
                    backlog=LISTEN_BACKLOG,
                )
            )
        channel.notify({"op": "ready"})
        plain, secure = (self.server.port(e) for e in self.endpoints)
        log.info(
            "%s worker serving %s:%d (STLS) and %s:%d (TLS)%s, pid %d",
            self.service,
            address,
            plain,
            address,
            secure,
            " and this host's front ends' Unix socket" if LOCAL_ENDPOINT in setup.sockets else "",
            os.getpid(),
        )
        background = [
            asyncio.create_task(every(DIRECTORY_POLL_INTERVAL, self.poll_directory, stop)),
            asyncio.create_task(
                every(PUBLISH_INTERVAL, lambda: channel.notify(self.counters.report()), stop)
            ),
            *(asyncio.create_task(every(interval, job, stop)) for interval, job in self.periodic()),
        ]
        await stop_or_master_gone(stop, channel)
        log.info("stopping")
        for listener in listeners:
            listener.close()
        # Sessions in the middle of something get a moment to finish it; the rest
        # are told the service is stopping.
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=SHUTDOWN_GRACE)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=SHUTDOWN_GRACE)
        await asyncio.gather(*background, return_exceptions=True)
        self.close_resources()
        self.protocol_log.close()
        await channel.close()
        self.directory.close()

    def _accept(self, stream: ByteStream, implicit_tls: bool, local: bool = False) -> None:
        task = asyncio.create_task(self._connection(stream, implicit_tls, local))
        self._tasks.add(task)
        self.counters.open_tasks = len(self._tasks)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.counters.open_tasks = len(self._tasks)

    # One connection ------------------------------------------------------------------

    async def _connection(self, stream: ByteStream, implicit_tls: bool, local: bool) -> None:
        if local:
            # The Unix socket: a front end of this host (only the service user and
            # root can connect). The limits count all of them as one client, as they
            # count a front end's address over TLS.
            client_ip, client_endpoint = LOCAL_FRONTEND, LOCAL_FRONTEND
            server_endpoint = f"unix:{self.context.folder.local_socket_file(self.service).name}"
        else:
            peer, ours = stream.peer(), stream.local()
            client_ip, client_endpoint = peer[0], f"{peer[0]}:{peer[1]}"
            server_endpoint = f"{ours[0]}:{ours[1]}"
        self.counters.total_connections += 1
        connection = Connection(
            session_id=secrets.token_hex(8),
            client_ip=client_ip,
            client_endpoint=client_endpoint,
            server_endpoint=server_endpoint,
            accepted=asyncio.get_running_loop().time(),
        )
        refusal = self.refusal(client_ip)
        if refusal is None:
            refusal = await self._admission(connection)
        if refusal:
            self.counters.rejected_connections += 1
            stream.write(err(str(refusal), ResponseCode.SYS_TEMP))
            stream.close()
            return
        self.counters.current_connections += 1
        self._pre_login[connection.session_id] = (connection, stream)
        self._open[connection.session_id] = (connection, stream)
        # The Unix socket is as private as TLS: no one but root and the service user
        # (who holds the TLS keys anyway) can read or inject its bytes.
        session = ServerSession(self.session_config(), secure=implicit_tls or local)
        timer = CommandTimer(self, connection)
        ending = "closed"
        relaying = False
        try:
            stream.write(session.greeting())
            handoff = await self._converse(session, stream, connection, timer)
            if isinstance(handoff, Handoff):
                timer.finish()
                relaying = True
                ending = await self.relay(handoff, session, stream, connection)
            else:
                ending = handoff
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            ending = f"connection error: {exc.__class__.__name__}"
            stream.abort()
        except asyncio.CancelledError:
            ending = "service stopping"
            if not relaying:  # mid-relay, a line of ours would corrupt the stream
                stream.write(err("service is stopping, try again later", ResponseCode.SYS_TEMP))
            raise
        except Exception:
            # A bug must cost one session, never the service, and never show the
            # client an exception: they get a plain temporary error.
            log.exception("session %s failed", connection.session_id)
            ending = "internal error"
            stream.write(err("internal server error, try again later", ResponseCode.SYS_TEMP))
        finally:
            if connection.evicted:
                ending = "evicted: the server was full and this connection had not logged in"
            timer.finish()
            self.counters.current_connections -= 1
            self._pre_login.pop(connection.session_id, None)
            self._open.pop(connection.session_id, None)
            self._end(session, connection)
            if self.channel is not None:
                self.channel.notify({"op": "closed", "session": connection.session_id})
            timer.log_line(CommandRecord("*", "", 0), 0.0, 0, f"Disconnected: {ending}")
            stream.close()

    def _end(self, session: ServerSession, connection: Connection) -> None:
        if not connection.ended:
            connection.ended = True
            self.session_ended(session, connection)

    async def _converse(
        self,
        session: ServerSession,
        stream: ByteStream,
        connection: Connection,
        timer: CommandTimer,
    ) -> str | Handoff:
        """Run the session to its end (returns why it ended) or to a handoff."""
        loop = asyncio.get_running_loop()
        line_started: float | None = None  # when the partial line's first byte came
        lines_then = 0  # session.lines_read at that time: a new line restarts the clock
        while True:
            event = session.next_event()
            timer.observe(session)
            if isinstance(event, NeedData):
                timer.finish()
                now = loop.time()
                if not session.partial_line:
                    line_started = None
                elif line_started is None or session.lines_read != lines_then:
                    line_started, lines_then = now, session.lines_read
                deadline, why = self._read_deadline(session, connection, line_started, now)
                try:
                    async with asyncio.timeout_at(deadline):
                        await stream.drain()
                        data = await stream.read()
                except TimeoutError:
                    # RFC 1939 section 3: an autologout timer ends the session
                    # without entering the UPDATE state, so nothing is deleted.
                    stream.write(err(f"autologout: {why}", ResponseCode.SYS_TEMP))
                    return f"autologout: {why}"
                connection.received += len(data)
                session.receive_data(data)
            elif isinstance(event, Reply):
                if self.fault is not None and self.fault.kind == "slow":
                    await asyncio.sleep(self.fault.seconds)
                stream.write(event.data)
                timer.add_response(len(event.data))
                if not stream.writable:
                    # A client that reads slowly holds its session, not our memory.
                    async with asyncio.timeout_at(self._write_deadline(session, connection)):
                        await stream.drain()
            elif isinstance(event, Authenticate):
                if self.fault is not None and self.fault.kind == "refuse-auth":
                    session.login_failed(
                        "logins refused for now (injected fault)", ResponseCode.SYS_TEMP
                    )
                    continue
                handoff = await self.authenticate(session, event, connection, timer)
                if handoff is not None or session.user is not None:
                    self._logged_in(connection)
                if handoff is not None:
                    return handoff
            elif isinstance(event, Retrieve):
                self.retrieve(session, event, connection)
            elif isinstance(event, Update):
                await self.update(session, event, connection)
                # The session ends with the reply to QUIT: the mailbox is released
                # before that reply is sent, since a client that reads it may log in
                # again at once, on another worker.
                self._end(session, connection)
            elif isinstance(event, StartTls):
                stream.stop_reading()
                stream.write(event.reply)
                timer.add_response(len(event.reply))
                async with asyncio.timeout_at(self._write_deadline(session, connection)):
                    await stream.drain()
                    await stream.start_tls(self._tls_context)
                session.tls_started()
            elif isinstance(event, Close):
                # Released before the event loop can run again, so a client that
                # reads "+OK" to QUIT and logs in at once never sees [IN-USE].
                self._end(session, connection)
                async with asyncio.timeout_at(self._write_deadline(session, connection)):
                    await stream.drain()
                return event.reason

    def _login_deadline(self, connection: Connection) -> float:
        return connection.accepted + self.settings.PreAuthenticatedConnectionTimeout

    def _write_deadline(self, session: ServerSession, connection: Connection) -> float:
        """Until when a client may keep us waiting for it to take our bytes."""
        if session.user is None:
            return self._login_deadline(connection)
        return asyncio.get_running_loop().time() + self.settings.AuthenticatedConnectionTimeout

    def _read_deadline(
        self,
        session: ServerSession,
        connection: Connection,
        line_started: float | None,
        now: float,
    ) -> tuple[float, str]:
        """Until when the client may take to send more, and what it is told after.

        Before login, the whole login has one deadline from the accept; after it,
        the client may be idle AuthenticatedConnectionTimeout between commands.
        Either way a partial line must be complete COMMAND_LINE_TIMEOUT (or the
        connection's timeout, if shorter) after its first byte.
        """
        if session.user is None:
            timeout = self.settings.PreAuthenticatedConnectionTimeout
            deadline = self._login_deadline(connection)
            why = (
                f"login not completed within {timeout} seconds"
                if connection.received
                else "idle for too long"
            )
        else:
            timeout = self.settings.AuthenticatedConnectionTimeout
            deadline, why = now + timeout, "idle for too long"
        if line_started is not None:
            line_limit = min(COMMAND_LINE_TIMEOUT, timeout)
            if line_started + line_limit < deadline:
                deadline = line_started + line_limit
                why = f"command line not completed within {line_limit} seconds"
        return deadline, why


def serve_pop3(data: Path, server_name: str, service_type: type[Pop3Service]) -> None:
    """`popguard serve pop3|pop3be`: the master, or (started by it) one worker."""
    from popguard.net.serving import run_until_stopped, setup_logging
    from popguard.services.service_master import serve_with_workers

    setup_logging(service_type.service, server_name)

    def worker(setup: WorkerSetup) -> None:
        service = service_type(ServerContext.open(data, server_name, service_type.role))
        run_until_stopped(functools.partial(service.run, setup=setup))

    serve_with_workers(
        data,
        server_name,
        service_type.service,
        service_type.role,
        service_type.endpoints,
        worker,
        limits=True,
        local_socket=service_type.serves_local_socket,
    )
