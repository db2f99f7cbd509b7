"""The POP3 front end (`popguard serve pop3`), Exchange's MSExchangePOP3 on a
Client Access server.

It answers the greeting, CAPA and the AUTHORIZATION state itself. At login it
checks the password against the directory, finds the server holding the active
copy of the user's database (read anew for every login, so a database move
takes effect at the next session), logs in there with the same credentials, and
from then on relays bytes both ways without parsing them.

The leg to a back end on another host is TLS, the back end's certificate verified
against the organization's CA. A back end on this host is reached on its Unix
socket instead, in the data folder that only the service user and root can enter:
there TLS would protect the bytes from no one who could not read its keys anyway,
and it costs the leg about half its CPU (BENCHMARKS.md). The front end's
SameHostBackendTls setting makes that leg TLS too.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from popguard import paths
from popguard.directory.directory import Server
from popguard.errors import UserError
from popguard.net.byte_stream import TLS_HANDSHAKE_TIMEOUT, ByteStream
from popguard.pop3.client import LineReader, ProtocolError, StatusLine
from popguard.pop3.replies import ResponseCode
from popguard.pop3.session import Authenticate, ServerSession
from popguard.services.context import ServerContext
from popguard.services.counters import ServiceCounters
from popguard.services.pop3_service import CommandTimer, Connection, Handoff, Pop3Service

log = logging.getLogger("popguard.pop3")

# Connecting to the back end, TLS, its greeting and the login, all together: a
# back end that accepts and then says nothing costs the user this long at most.
BACKEND_LOGIN_TIMEOUT = 10.0
# A relay ends when neither side has moved for the autologout time plus this: the
# back end's own autologout normally ends it first, with its own -ERR.
RELAY_IDLE_SLACK = 30.0
# After the client closes its side, the back end's answers to what it sent last
# (often QUIT) are still passed on for this long.
HALF_CLOSE_GRACE = 10.0
COMPONENT = "PopProxy"


class FrontendCounters(ServiceCounters):
    """The back end's counters plus how the front end's back ends behave."""

    LATENCY_SAMPLES = 200

    def __init__(self, service: str) -> None:
        super().__init__(service)
        self.backend_failures = 0
        self.backend_tls_resumed = 0  # back-end connections that resumed a TLS session
        self.backend_local = 0  # back-end connections on a back end's Unix socket
        self._latencies: deque[float] = deque(maxlen=self.LATENCY_SAMPLES)

    def backend_connected(self, elapsed_ms: float) -> None:
        self._latencies.append(elapsed_ms)

    def snapshot(self) -> dict[str, Any]:
        latencies = self._latencies
        return super().snapshot() | {
            "BackendConnectLatencyMs": round(sum(latencies) / len(latencies), 3)
            if latencies
            else 0.0,
            "BackendFailures": self.backend_failures,
            "BackendTlsResumed": self.backend_tls_resumed,
            "BackendLocal": self.backend_local,
        }


class FrontendService(Pop3Service):
    role = "frontend"
    service = "pop3"
    log_prefix = "POP3"
    endpoints = ("pop3", "pop3-tls")
    title = "front end"
    counters_type = FrontendCounters

    def __init__(self, context: ServerContext) -> None:
        super().__init__(context)
        self._backend_tls = context.tls.resuming_client_context()
        self._routes: dict[str, tuple[Server, int]] = {}  # see _route
        self._routes_version = -1
        self.component_state = self.directory.component_state(self.server.name, COMPONENT)

    @property
    def frontend_counters(self) -> FrontendCounters:
        assert isinstance(self.counters, FrontendCounters)
        return self.counters

    def directory_changed(self) -> None:
        state = self.directory.component_state(self.server.name, COMPONENT)
        if state != self.component_state:
            log.info("%s is now %s", COMPONENT, state)
            self.component_state = state

    def refusal(self, client_ip: str) -> str | None:
        if self.component_state != "Active" and not self._is_local(client_ip):
            return f"this server is not taking connections now ({COMPONENT} {self.component_state})"
        return super().refusal(client_ip)

    async def authenticate(
        self,
        session: ServerSession,
        request: Authenticate,
        connection: Connection,
        timer: CommandTimer,
    ) -> Handoff | None:
        mailbox = await self.verified_mailbox(session, request, connection, timer)
        if mailbox is None:
            return None
        # MaxConnectionsPerUser is the server's: the master counts for every worker,
        # from now until the connection ends (or the login fails below).
        if not await self.take_user(connection, mailbox.address):
            timer.context = "TooManyForUser"
            session.login_failed("too many connections for this user", ResponseCode.SYS_TEMP)
            return None
        connection.user = mailbox.address
        try:
            backend, max_command = self._route(mailbox.database)
        except UserError as exc:
            timer.context = str(exc)
            self._give_back(connection)
            session.login_failed(
                "mailbox database is not available now, try again later", ResponseCode.SYS_TEMP
            )
            return None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(BACKEND_LOGIN_TIMEOUT):
                stream = await self._connect(backend)
                try:
                    reply, leftover = await _log_in(
                        stream, mailbox.address, request.password, max_command
                    )
                except BaseException:
                    stream.abort()
                    raise
        except (OSError, TimeoutError, ssl.SSLError, ProtocolError, UserError) as exc:
            # UserError: the directory names a back end without a pop3be-tls port.
            self.frontend_counters.backend_failures += 1
            reason = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
            log.warning("back end %s failed for %s: %s", backend.name, mailbox.address, reason)
            timer.context = f"Backend={backend.name};Failed={reason}"
            self._give_back(connection)
            session.login_failed(
                "mailbox server not reachable, try again later", ResponseCode.SYS_TEMP
            )
            return None
        self.frontend_counters.backend_connected((time.perf_counter() - started) * 1000.0)
        timer.context = f"Backend={backend.name}"
        if not reply.ok:
            # [IN-USE], [LOGIN-DELAY], [SYS/TEMP]: the client sees the back end's words.
            stream.close()
            self._give_back(connection)
            session.login_refused(reply.raw)
            return None
        self.counters.successful_logins += 1
        return Handoff(stream, backend.name, reply.raw + leftover)

    def _route(self, database: str) -> tuple[Server, int]:
        """The server with the active copy of `database`, and its MaxCommandSize.

        Remembered, but never stale: the directory's change counter moves whenever
        another process commits to it (this service never writes to it), and
        reading it is one statement where the lookups are four and a JSON parse.
        So a moved copy still takes effect at the next login.
        """
        version = self.directory.change_counter()
        if version != self._routes_version:
            self._routes.clear()
            self._routes_version = version
        route = self._routes.get(database)
        if route is None:
            backend = self.directory.get_server(self.directory.active_server(database))
            route = (backend, self.directory.pop_settings(backend.name)[0].MaxCommandSize)
            self._routes[database] = route
        return route

    def _give_back(self, connection: Connection) -> None:
        self.give_back_user(connection)
        connection.user = ""

    async def _connect(self, backend: Server) -> ByteStream:
        loop = asyncio.get_running_loop()
        if not self.settings.SameHostBackendTls:
            # On this host when its socket is in this host's data folder; a back end on
            # another host has none here (ENOENT costs one system call), and one not
            # serving its socket now (ECONNREFUSED), or one the folder's owner cannot
            # use (EACCES, after a change of service user), may still answer its port.
            folder = paths.server_folder(self.context.data, backend.name)
            try:
                _, stream = await loop.create_unix_connection(
                    ByteStream, str(folder.local_socket_file("pop3be"))
                )
            except OSError:
                pass
            else:
                self.frontend_counters.backend_local += 1
                return stream
        transport, stream = await loop.create_connection(
            ByteStream,
            backend.address,
            backend.port("pop3be-tls"),
            ssl=self._backend_tls,
            server_hostname=backend.address,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
        )
        ssl_object = transport.get_extra_info("ssl_object")
        self._backend_tls.handshake_done(ssl_object)
        if ssl_object is not None and ssl_object.session_reused:
            self.frontend_counters.backend_tls_resumed += 1
        return stream

    async def relay(
        self, handoff: Handoff, session: ServerSession, client: ByteStream, connection: Connection
    ) -> str:
        backend = handoff.backend
        client.write(handoff.reply)
        pending = session.detach(connection.user)
        if pending:
            backend.write(pending)
            self.counters.commands_relayed(pending.count(b"\n"))
        # The back end runs the session's autologout and says so to the client; the
        # proxy only ends a relay in which neither side has moved for longer.
        activity = _Activity(self.settings.AuthenticatedConnectionTimeout + RELAY_IDLE_SLACK)

        def client_sent(data: bytes) -> None:
            activity.touch()
            # Not parsed, so counted by lines; their timing is the back end's to measure.
            self.counters.commands_relayed(data.count(b"\n"))

        upstream = asyncio.create_task(_pump(client, backend, client_sent))
        downstream = asyncio.create_task(_pump(backend, client, lambda _: activity.touch()))
        watchdog = asyncio.create_task(activity.expired())
        tasks: set[asyncio.Task[Any]] = {upstream, downstream, watchdog}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if upstream in done and not upstream.exception():
                # The client closed its side: what it sent before (often QUIT) is
                # still answered, for a short while, then the relay ends.
                gone = asyncio.create_task(client.closed.wait())
                tasks.add(gone)
                done, _ = await asyncio.wait(
                    {downstream, watchdog, gone}, timeout=HALF_CLOSE_GRACE,
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
                return f"client closed; relayed via {handoff.backend_name}"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            backend.close()
        if watchdog in done:
            client.abort()
            return f"relay idle for {activity.limit:.0f} s; via {handoff.backend_name}"
        finished = upstream if upstream in done else downstream
        side = "client" if finished is upstream else f"back end {handoff.backend_name}"
        error = finished.exception()
        if error is not None:
            client.abort()
            return f"{side} connection error: {error.__class__.__name__}"
        return f"{side} closed; relayed via {handoff.backend_name}"


async def _log_in(
    stream: ByteStream, address: str, password: str, max_command: int
) -> tuple[StatusLine, bytes]:
    """AUTH PLAIN on the back end with the client's own credentials.

    The back end's reply, and any bytes that came with it. The initial response
    rides on the AUTH line when that fits the back end's MaxCommandSize; else it
    is sent after "+ ", where RFC 5034 allows a longer line.
    """
    reader = LineReader(stream)
    greeting = await reader.status()
    if not greeting.ok:
        raise ProtocolError(f"greeting {greeting.raw[:80]!r}")
    token = base64.b64encode(b"\0" + address.encode() + b"\0" + password.encode())
    command = b"AUTH PLAIN " + token + b"\r\n"
    if len(command) <= max_command:
        stream.write(command)
    else:
        stream.write(b"AUTH PLAIN\r\n")
        if await reader.line() != b"+ \r\n":
            raise ProtocolError("the back end refused AUTH PLAIN")
        stream.write(token + b"\r\n")
    reply = await reader.status()
    return reply, reader.unread()


class _Activity:
    """When either side of a relay last moved; `expired` returns once it is too long ago."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._last = time.monotonic()

    def touch(self) -> None:
        self._last = time.monotonic()

    async def expired(self) -> None:
        # A deadline that moves: sleeping to it and checking again costs one wake-up
        # per idle period, where an Event set on every chunk would cost far more.
        while (left := self._last + self.limit - time.monotonic()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(left)


async def _pump(source: ByteStream, sink: ByteStream, moved: Callable[[bytes], None]) -> None:
    """Copy bytes until `source` closes, at the pace `sink` can take them."""
    while data := await source.read():
        if sink.closed.is_set():
            raise ConnectionResetError("the other side has gone")
        moved(data)
        sink.write(data)
        if not sink.writable:
            await sink.drain()


def serve(data: Path, server_name: str) -> None:
    from popguard.services.pop3_service import serve_pop3

    serve_pop3(data, server_name, FrontendService)
