"""The POP3 front end (`popguard serve pop3`), Exchange's MSExchangePOP3 on a
Client Access server.

It answers the greeting, CAPA and the AUTHORIZATION state itself. At login it
checks the password against the directory, finds the server holding the active
copy of the user's database (read anew for every login, so a database move
takes effect at the next session), logs in there over TLS with the same
credentials, and from then on relays bytes both ways without parsing them.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
from collections import deque
from pathlib import Path
from typing import Any

from . import tls
from .byte_stream import TLS_HANDSHAKE_TIMEOUT, ByteStream
from .counters import ServiceCounters
from .directory import Server
from .errors import UserError
from .pop3.client import LineReader, ProtocolError
from .pop3.replies import ResponseCode
from .pop3.session import Authenticate, ServerSession
from .pop3_service import CommandTimer, Connection, Handoff, Pop3Service

log = logging.getLogger("popguard.pop3")

# Connecting to the back end, TLS, its greeting and the login, all together: a
# back end that accepts and then says nothing costs the user this long at most.
BACKEND_LOGIN_TIMEOUT = 10.0
COMPONENT = "PopProxy"


class FrontendCounters(ServiceCounters):
    """The back end's counters plus how the front end's back ends behave."""

    LATENCY_SAMPLES = 200

    def __init__(self, service: str) -> None:
        super().__init__(service)
        self.backend_failures = 0
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
        }


class FrontendService(Pop3Service):
    role = "frontend"
    service = "pop3"
    log_prefix = "POP3"
    endpoints = ("pop3", "pop3-tls")
    title = "front end"
    counters_type = FrontendCounters

    def __init__(self, data: Path, server_name: str) -> None:
        super().__init__(data, server_name)
        assert isinstance(self.counters, FrontendCounters)
        self.frontend_counters = self.counters
        self._backend_tls = tls.client_context(data)
        self._per_user: dict[str, int] = {}
        self.component_state = self.directory.component_state(self.server.name, COMPONENT)

    def directory_changed(self) -> None:
        state = self.directory.component_state(self.server.name, COMPONENT)
        if state != self.component_state:
            log.info("%s is now %s", COMPONENT, state)
            self.component_state = state

    def _is_local(self, client_ip: str) -> bool:
        # Monitoring probes run on this server and connect from its own address.
        return client_ip == self.server.address

    def refusal(self, client_ip: str) -> str | None:
        if self.component_state != "Active" and not self._is_local(client_ip):
            return f"this server is not taking connections now ({COMPONENT} {self.component_state})"
        return super().refusal(client_ip)

    def session_ended(self, session: ServerSession, connection: Connection) -> None:
        user = connection.user
        if user:
            left = self._per_user.get(user, 1) - 1
            if left:
                self._per_user[user] = left
            else:
                self._per_user.pop(user, None)

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
        if self._per_user.get(mailbox.address, 0) >= self.settings.MaxConnectionsPerUser:
            timer.context = "TooManyForUser"
            session.login_failed("too many connections for this user", ResponseCode.SYS_TEMP)
            return None
        try:
            backend = self.directory.get_server(self.directory.active_server(mailbox.database))
        except UserError as exc:
            timer.context = str(exc)
            session.login_failed(
                "mailbox database is not available now, try again later", ResponseCode.SYS_TEMP
            )
            return None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(BACKEND_LOGIN_TIMEOUT):
                stream, reader = await self._connect(backend)
                try:
                    greeting = await reader.status()
                    if not greeting.ok:
                        raise ProtocolError(f"greeting {greeting.raw[:80]!r}")
                    token = base64.b64encode(
                        b"\0" + mailbox.address.encode() + b"\0" + request.password.encode()
                    )
                    stream.write(b"AUTH PLAIN " + token + b"\r\n")
                    reply = await reader.status()
                except BaseException:
                    stream.close()
                    raise
        except (OSError, TimeoutError, ssl.SSLError, ProtocolError) as exc:
            self.frontend_counters.backend_failures += 1
            reason = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
            log.warning("back end %s failed for %s: %s", backend.name, mailbox.address, reason)
            timer.context = f"Backend={backend.name};Failed={reason}"
            session.login_failed(
                "mailbox server not reachable, try again later", ResponseCode.SYS_TEMP
            )
            return None
        self.frontend_counters.backend_connected((time.perf_counter() - started) * 1000.0)
        timer.context = f"Backend={backend.name}"
        if not reply.ok:
            # [IN-USE], [LOGIN-DELAY], [SYS/TEMP]: the client sees the back end's words.
            stream.close()
            session.login_refused(reply.raw)
            return None
        self.counters.successful_logins += 1
        self._per_user[mailbox.address] = self._per_user.get(mailbox.address, 0) + 1
        connection.user = mailbox.address
        connection.database = mailbox.database
        return Handoff(stream, backend.name, reply.raw)

    async def _connect(self, backend: Server) -> tuple[ByteStream, LineReader]:
        loop = asyncio.get_running_loop()
        _, stream = await loop.create_connection(
            ByteStream,
            backend.address,
            backend.port("pop3be-tls"),
            ssl=self._backend_tls,
            server_hostname=backend.address,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
        )
        return stream, LineReader(stream)

    async def relay(
        self, handoff: Handoff, session: ServerSession, client: ByteStream, connection: Connection
    ) -> str:
        backend = handoff.backend
        client.write(handoff.reply)
        pending = session.detach(connection.user)
        if pending:
            backend.write(pending)
        idle = self.settings.AuthenticatedConnectionTimeout
        sent_at: deque[float] = deque()  # when each relayed client line left, for timing

        def client_sent(data: bytes) -> None:
            now = time.perf_counter()
            sent_at.extend(now for _ in range(data.count(b"\n")))

        def backend_answered(data: bytes) -> None:
            # Not parsed: the first bytes after a command count as its answer.
            if sent_at:
                self.counters.command_done((time.perf_counter() - sent_at.popleft()) * 1000.0)

        upstream = asyncio.create_task(_pump(client, backend, idle, client_sent))
        downstream = asyncio.create_task(_pump(backend, client, idle, backend_answered))
        try:
            done, _ = await asyncio.wait(
                {upstream, downstream}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (upstream, downstream):
                task.cancel()
            await asyncio.gather(upstream, downstream, return_exceptions=True)
            backend.close()
        finished = done.pop()
        side = "client" if finished is upstream else f"back end {handoff.backend_name}"
        error = finished.exception() if not finished.cancelled() else None
        if isinstance(error, TimeoutError):
            return f"{side} idle, relay ended"
        if error is not None:
            return f"{side} connection error: {error.__class__.__name__}"
        return f"{side} closed; relayed via {handoff.backend_name}"


async def _pump(source: ByteStream, sink: ByteStream, idle: float, seen: Any) -> None:
    """Copy bytes until `source` closes, at the pace `sink` can take them."""
    while True:
        async with asyncio.timeout(idle):
            data = await source.read()
        if not data:
            return
        seen(data)
        sink.write(data)
        if not sink.writable:
            async with asyncio.timeout(idle):
                await sink.drain()


def serve(data: Path, server_name: str) -> None:
    from .service import run_until_stopped, setup_logging

    setup_logging("pop3", server_name)
    frontend = FrontendService(data, server_name)
    run_until_stopped(frontend.run)
