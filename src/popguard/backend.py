"""The POP3 back end (`popguard serve pop3be`), Exchange's MSExchangePOP3BE.

asyncio around the sans-I/O `ServerSession`: this module moves bytes, answers
the session's requests from the directory and the mounted databases, enforces
the connection limits and timeouts, and feeds the counters and protocol log.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import os
import secrets
import sqlite3
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import paths, tls
from .byte_stream import TLS_HANDSHAKE_TIMEOUT, ByteStream
from .counters import PUBLISH_INTERVAL, ServiceCounters
from .directory import Directory, Server
from .errors import UserError
from .mounted import MountedDatabases, NotMountedError
from .passwords import AuthCache, LoginDelays, hash_password, verify_password
from .pop3.replies import ResponseCode, err
from .pop3.session import (
    Authenticate,
    Close,
    CommandRecord,
    MaildropEntry,
    NeedData,
    Reply,
    Retrieve,
    ServerSession,
    SessionConfig,
    StartTls,
    Update,
)
from .protocol_log import ProtocolLog, ProtocolLogConfig, ProtocolLogRecord
from .service import every, listen
from .settings import PopSettings, SortOrder

log = logging.getLogger("popguard.pop3be")

SETTINGS_POLL_INTERVAL = 1.0
SHUTDOWN_GRACE = 5.0


@dataclass
class _Connection:
    session_id: str
    client_ip: str
    client_endpoint: str
    server_endpoint: str
    user: str = ""
    database: str = ""  # the logged-in user's mailbox database
    sequence: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


class _CommandTimer:
    """Times each command from its parsing to its reply being handed to the socket."""

    def __init__(self, backend: BackendService, connection: _Connection) -> None:
        self._backend = backend
        self._connection = connection
        self._record: CommandRecord | None = None  # the command being timed
        self._seen: CommandRecord | None = None  # the last command the session parsed
        self._started = 0.0
        self._response_size = 0
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
        self._backend.counters.command_done(elapsed_ms)
        self.log_line(record, elapsed_ms, self._response_size, self.context)
        self._record = None
        self._response_size = 0
        self.context = ""

    def log_line(
        self, record: CommandRecord, elapsed_ms: float, response_size: int, context: str
    ) -> None:
        protocol_log = self._backend.protocol_log
        if not protocol_log.enabled:
            return
        connection = self._connection
        protocol_log.write(
            ProtocolLogRecord(
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
            )
        )


class BackendService:
    def __init__(self, data: Path, server_name: str) -> None:
        self.data = data
        self.directory = Directory(data)
        self.server: Server = self.directory.get_server(server_name)
        if "mailbox" not in self.server.roles:
            raise UserError(f"server {self.server.name} does not have the mailbox role")
        self.settings, self._settings_revision = self.directory.pop_settings(self.server.name)
        self._directory_version = self.directory.change_counter()
        self.databases = MountedDatabases(data, self.server.name, self.directory)
        self.counters = ServiceCounters("pop3be")
        self.protocol_log = ProtocolLog("POP3BE")
        self.auth_cache = AuthCache()
        self.login_delays = LoginDelays()
        # Checked against when the user does not exist, so that an unknown user
        # costs the same time as a wrong password.
        self._decoy_hash = hash_password(secrets.token_urlsafe(16))
        self._locked: set[str] = set()
        self._last_login: dict[str, float] = {}  # only while MinimumLoginInterval is set
        self._per_ip: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # One context for the life of the service: the implicit-TLS listener holds
        # it, so a new certificate is loaded into it rather than a new context made.
        self._tls_context = tls.server_context(self._certificate())
        self._apply_log_settings()

    # Settings ------------------------------------------------------------------------

    def _certificate(self) -> tls.CertificatePair:
        name = self.settings.X509CertificateName or self.server.name
        ip_addresses = sorted({self.server.address, "127.0.0.1"})
        # The addresses appear as DNS names too: fetchmail matches a host given as
        # an IP address against the certificate's DNS names only.
        dns_names = sorted({self.server.name.lower(), name.lower(), "localhost", *ip_addresses})
        return tls.ensure_server_certificate(self.data, name, dns_names, ip_addresses)

    def _apply_log_settings(self) -> None:
        location = self.settings.LogFileLocation
        folder = (
            Path(location)
            if location
            else paths.default_protocol_log_dir(self.data, self.server.name, "pop3be")
        )
        self.protocol_log.configure(
            ProtocolLogConfig(
                enabled=self.settings.ProtocolLogEnabled,
                folder=folder,
                rollover=self.settings.LogFileRollOverSettings,
                size_quota=self.settings.LogPerFileSizeQuota,
            )
        )

    def reload_settings(self) -> None:
        """Pick up `set-popsettings` changes without a restart."""
        version = self.directory.change_counter()
        if version == self._directory_version:
            return
        self._directory_version = version
        settings, revision = self.directory.pop_settings(self.server.name)
        if revision == self._settings_revision:
            return
        old = self.settings
        self.settings, self._settings_revision = settings, revision
        self._apply_log_settings()
        if settings.X509CertificateName != old.X509CertificateName:
            try:
                pair = self._certificate()
                self._tls_context.load_cert_chain(pair.certificate, pair.key)
            except (ValueError, OSError, ssl.SSLError) as exc:
                log.error("keeping the current certificate: cannot use a new one: %s", exc)
        log.info("POP settings revision %d applied", revision)

    def _session_config(self) -> SessionConfig:
        return SessionConfig(
            login_type=self.settings.LoginType,
            max_command_size=self.settings.MaxCommandSize,
            tls_available=True,
            login_delay=self.settings.MinimumLoginInterval,
            greeting=f"popguard POP3 back end {self.server.name} ready",
        )

    # Lifecycle -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        address = self.server.address
        loop = asyncio.get_running_loop()
        listeners = []
        for endpoint, implicit_tls in (("pop3be", False), ("pop3be-tls", True)):
            port = self.server.port(endpoint)
            listeners.append(
                await listen(
                    functools.partial(
                        loop.create_server,
                        functools.partial(
                            ByteStream, functools.partial(self._accept, implicit_tls=implicit_tls)
                        ),
                        address,
                        port,
                        reuse_address=True,
                        ssl=self._tls_context if implicit_tls else None,
                        ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if implicit_tls else None,
                    ),
                    endpoint,
                    address,
                    port,
                )
            )
        counters_file = paths.counters_file(self.data, self.server.name, "pop3be")
        log.info(
            "listening on %s:%d (STLS) and %s:%d (TLS), pid %d",
            address,
            self.server.port("pop3be"),
            address,
            self.server.port("pop3be-tls"),
            os.getpid(),
        )
        background = [
            asyncio.create_task(every(SETTINGS_POLL_INTERVAL, self.reload_settings, stop)),
            asyncio.create_task(
                every(PUBLISH_INTERVAL, lambda: self.counters.publish(counters_file), stop)
            ),
        ]
        await stop.wait()
        log.info("stopping")
        for listener in listeners:
            listener.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=SHUTDOWN_GRACE)
        await asyncio.gather(*background, return_exceptions=True)
        self.databases.close()
        self.protocol_log.close()
        self.directory.close()

    def _accept(self, stream: ByteStream, implicit_tls: bool) -> None:
        task = asyncio.create_task(self._connection(stream, implicit_tls))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # One connection ------------------------------------------------------------------

    async def _connection(self, stream: ByteStream, implicit_tls: bool) -> None:
        peer, local = stream.peer(), stream.local()
        client_ip = peer[0]
        settings = self.settings
        refusal = self._connection_refusal(client_ip, settings)
        self.counters.total_connections += 1
        if refusal:
            self.counters.rejected_connections += 1
            stream.write(err(refusal, ResponseCode.SYS_TEMP))
            stream.close()
            return
        connection = _Connection(
            session_id=secrets.token_hex(8),
            client_ip=client_ip,
            client_endpoint=f"{peer[0]}:{peer[1]}",
            server_endpoint=f"{local[0]}:{local[1]}",
        )
        self.counters.current_connections += 1
        self._per_ip[client_ip] = self._per_ip.get(client_ip, 0) + 1
        session = ServerSession(self._session_config(), secure=implicit_tls)
        timer = _CommandTimer(self, connection)
        ending = "closed"
        try:
            stream.write(session.greeting())
            ending = await self._converse(session, stream, connection, timer)
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            ending = f"connection error: {exc.__class__.__name__}"
        except asyncio.CancelledError:
            ending = "service stopping"
            raise
        except Exception:
            # A bug must cost one session, never the service, and never show the
            # client an exception: they get a plain temporary error.
            log.exception("session %s failed", connection.session_id)
            ending = "internal error"
            stream.write(err("internal server error, try again later", ResponseCode.SYS_TEMP))
        finally:
            timer.finish()
            self._release(connection, session)
            timer.log_line(CommandRecord("*", "", 0), 0.0, 0, f"Disconnected: {ending}")
            stream.close()

    def _connection_refusal(self, client_ip: str, settings: PopSettings) -> str | None:
        if self.counters.current_connections >= settings.MaxConnections:
            return "too many connections to this server, try again later"
        if self._per_ip.get(client_ip, 0) >= settings.MaxConnectionFromSingleIP:
            return "too many connections from your address, try again later"
        return None

    def _release(self, connection: _Connection, session: ServerSession) -> None:
        self.counters.current_connections -= 1
        remaining = self._per_ip.get(connection.client_ip, 1) - 1
        if remaining:
            self._per_ip[connection.client_ip] = remaining
        else:
            self._per_ip.pop(connection.client_ip, None)
        self._unlock(session)

    def _unlock(self, session: ServerSession) -> None:
        if session.user is not None:
            self._locked.discard(session.user)

    async def _converse(
        self,
        session: ServerSession,
        stream: ByteStream,
        connection: _Connection,
        timer: _CommandTimer,
    ) -> str:
        """Run the session to its end; returns why it ended."""
        while True:
            event = session.next_event()
            timer.observe(session)
            timeout = (
                self.settings.AuthenticatedConnectionTimeout
                if session.user
                else self.settings.PreAuthenticatedConnectionTimeout
            )
            if isinstance(event, NeedData):
                timer.finish()
                try:
                    async with asyncio.timeout(timeout):
                        await stream.drain()
                        data = await stream.read()
                except TimeoutError:
                    # RFC 1939 section 3: an autologout timer ends the session
                    # without entering the UPDATE state, so nothing is deleted.
                    stream.write(err("autologout: idle for too long", ResponseCode.SYS_TEMP))
                    return "idle timeout"
                session.receive_data(data)
            elif isinstance(event, Reply):
                stream.write(event.data)
                timer.add_response(len(event.data))
                if not stream.writable:
                    # A client that reads slowly holds its session, not our memory.
                    async with asyncio.timeout(timeout):
                        await stream.drain()
            elif isinstance(event, Authenticate):
                await self._authenticate(session, event, connection, timer)
            elif isinstance(event, Retrieve):
                self._retrieve(session, event, connection)
            elif isinstance(event, Update):
                await self._update(session, event, connection)
            elif isinstance(event, StartTls):
                stream.stop_reading()
                stream.write(event.reply)
                timer.add_response(len(event.reply))
                async with asyncio.timeout(self.settings.PreAuthenticatedConnectionTimeout):
                    await stream.drain()
                    await stream.start_tls(self._tls_context)
                session.tls_started()
            elif isinstance(event, Close):
                # Unlocked before the event loop can run again, so a client that
                # reads "+OK" to QUIT and logs in at once never sees [IN-USE].
                self._unlock(session)
                async with asyncio.timeout(timeout):
                    await stream.drain()
                return event.reason

    # Requests from the session -------------------------------------------------------

    async def _authenticate(
        self,
        session: ServerSession,
        request: Authenticate,
        connection: _Connection,
        timer: _CommandTimer,
    ) -> None:
        address = request.user.strip().lower()
        mailbox = self.directory.find_mailbox(address)
        stored_hash = mailbox.password_hash if mailbox else self._decoy_hash
        verified = self.auth_cache.check(address, request.password, stored_hash)
        if not verified:
            verified = await asyncio.to_thread(verify_password, stored_hash, request.password)
            if verified and mailbox is not None:
                self.auth_cache.remember(address, request.password, stored_hash)
        if mailbox is None or not verified:
            self.counters.failed_logins += 1
            delay = self.login_delays.record_failure(connection.client_ip, address)
            log.warning(
                "failed login for %r from %s (%s), answering in %.2fs",
                address[:64],
                connection.client_endpoint,
                request.mechanism,
                delay,
            )
            timer.context = "AuthFailed"
            await asyncio.sleep(delay)
            session.login_failed("authentication failed", ResponseCode.AUTH)
            return
        self.login_delays.record_success(connection.client_ip, address)
        if address in self._locked:
            timer.context = "InUse"
            session.login_failed("mailbox is in use by another session", ResponseCode.IN_USE)
            return
        interval = self.settings.MinimumLoginInterval
        wait = self._last_login.get(address, -math.inf) + interval - time.monotonic()
        if interval and wait > 0:
            timer.context = "LoginDelay"
            session.login_failed(
                f"logged in too recently, wait {math.ceil(wait)} more seconds",
                ResponseCode.LOGIN_DELAY,
            )
            return
        try:
            store = self.databases.reader(mailbox.database)
            messages = store.maildrop(address)
        except (NotMountedError, UserError) as exc:
            timer.context = str(exc)
            session.login_failed(
                "mailbox database is not available here now, try again later",
                ResponseCode.SYS_TEMP,
            )
            return
        except sqlite3.Error:
            log.exception("reading the maildrop of %s failed", address)
            session.login_failed("mailbox store error, try again later", ResponseCode.SYS_TEMP)
            return
        if self.settings.MessageRetrievalSortOrder is SortOrder.DESCENDING:
            messages.sort(key=lambda m: (m.received, m.uid), reverse=True)
        self._locked.add(address)
        if self.settings.MinimumLoginInterval:
            self._last_login[address] = time.monotonic()
        self.counters.successful_logins += 1
        connection.user = address
        connection.database = mailbox.database
        timer.context = f"Database={mailbox.database}"
        session.login_succeeded(address, [MaildropEntry(m.uid, m.size) for m in messages])

    def _retrieve(self, session: ServerSession, request: Retrieve, connection: _Connection) -> None:
        try:
            wire = self.databases.reader(connection.database).wire(connection.user, request.uid)
        except (NotMountedError, UserError, sqlite3.Error) as exc:
            log.warning("RETR of uid %d for %s failed: %s", request.uid, connection.user, exc)
            wire = None
        if wire is not None:
            self.counters.messages_retrieved += 1
        session.message_found(request, wire)

    async def _update(
        self, session: ServerSession, request: Update, connection: _Connection
    ) -> None:
        user = connection.user
        if not request.deleted_uids:
            session.update_done(True)
            return
        try:
            removed = await self.databases.write(
                connection.database, lambda store: store.expunge(user, list(request.deleted_uids))
            )
        except (NotMountedError, UserError, sqlite3.Error) as exc:
            log.warning("deletions for %s not applied: %s", user, exc)
            session.update_done(False)
            return
        self.counters.messages_deleted += removed
        session.update_done(True)


def serve(data: Path, server_name: str) -> None:
    from .service import run_until_stopped, setup_logging

    setup_logging("pop3be", server_name)
    backend = BackendService(data, server_name)
    run_until_stopped(backend.run)
