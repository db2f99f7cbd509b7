"""Probe kinds: small registered functions with one signature that never raise.

Each records what it said and heard in a Transcript (passwords redacted), and on
failure the *component* that failed and why (with the RFC 3206 response code
when the server gave one), so that an Auth failure is never taken for a dead
service. Timeouts are enforced by the engine from outside; the transcript tells
which step the probe was in when its time ran out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from popguard.health.definitions import ProbeDefinition
from popguard.pop3.client import MAX_STATUS_LINE, ProtocolError, StatusLine, parse_status_line
from popguard.pop3.session import redact

# Failure components, from the outside in.
NETWORKING, TLS, POP3, AUTH, STORE, BACKEND, DELIVERY, COUNTERS, PROCESS = (
    "Networking", "TLS", "POP3", "Auth", "Store", "Backend", "Delivery", "Counters", "Process",
)  # fmt: skip
DIRECTORY = "Directory"
MAX_MULTILINE = 64 * 1024 * 1024


@dataclass(frozen=True)
class Credential:
    address: str
    password: str


@dataclass
class ProbeTarget:
    """Where one probe instance points, resolved by the engine for each run."""

    resource: str  # TargetResource: the database, or the service probed
    host: str = ""
    port: int = 0
    tls: str = "tls"
    context: ssl.SSLContext | None = None
    credential: Credential | None = None
    counters_files: dict[str, Path] = field(default_factory=dict)
    # Puts the probe message into the health mailbox when it has none (CTP).
    deliver_probe_message: Callable[[str], Awaitable[str | None]] | None = None
    # The address to connect from: a server probes itself from its own address, which
    # a front end out of service (PopProxy Inactive) still serves.
    source: str | None = None
    # For process-starts: the service's state, process id and uptime from its supervisor.
    read_process: Callable[[], Awaitable[ProcessState]] | None = None


@dataclass(frozen=True)
class ProcessState:
    state: str  # Running | Stopped | Starting | Failed | ...
    pid: int | None
    uptime: float | None
    detail: str = ""
    unexpected_exits: int | None = None  # exits the supervisor did not ask for


class ProbeFailure(Exception):
    def __init__(self, component: str, reason: str, error: str) -> None:
        super().__init__(error)
        self.component, self.reason = component, reason


@dataclass
class Transcript:
    """The conversation so far, and the step under way (what a timeout blames)."""

    lines: list[str] = field(default_factory=list)
    step: str = "start"
    component: str = NETWORKING
    started: float = field(default_factory=time.monotonic)

    def at(self, step: str, component: str) -> None:
        self.step, self.component = step, component
        # Each step's start, so that a reader (the web page) tells each step's latency.
        elapsed = (time.monotonic() - self.started) * 1000
        self.lines.append(f"{STEP_MARK}{elapsed:.1f} ms {step} [{component}]")

    def sent(self, line: str) -> None:
        keyword, _, argument = line.partition(" ")
        self.lines.append(f"C: {keyword} {redact(keyword, argument)}".rstrip())

    def received(self, line: bytes) -> None:
        self.lines.append("S: " + line.decode("utf-8", "replace").rstrip("\r\n"))

    def note(self, text: str) -> None:
        self.lines.append(f"-- {text}")

    def text(self) -> str:
        return "\n".join(self.lines)


# The line that opens a step in a transcript: "@ 12.3 ms login [Auth]".
STEP_MARK = "@ "


@dataclass
class Outcome:
    sample_value: float | None = None  # latency in ms when None


class Pop3Dialog:
    """A POP3 client for probes, on asyncio streams, writing everything to a transcript."""

    def __init__(self, transcript: Transcript) -> None:
        self.transcript = transcript
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self, target: ProbeTarget) -> StatusLine:
        """TCP, TLS as the target asks (implicit, or STLS after the greeting); the greeting."""
        await self.open(target)
        if target.tls == "tls":
            await self.start_tls(target)
        greeting = await self.greeting()
        if target.tls == "stls":
            await self.expect_ok("STLS", POP3)
            await self.start_tls(target)
        return greeting

    async def open(self, target: ProbeTarget) -> None:
        """The TCP connection alone."""
        self.transcript.at("connect", NETWORKING)
        self.transcript.note(f"connecting to {target.host}:{target.port} ({target.tls})")
        try:
            self._reader, self._writer = await asyncio.open_connection(
                target.host, target.port, limit=MAX_STATUS_LINE * 4,
                local_addr=(target.source, 0) if target.source else None,
            )  # fmt: skip
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ProbeFailure(NETWORKING, reason, f"cannot connect: {reason}") from None

    async def greeting(self) -> StatusLine:
        self.transcript.at("greeting", POP3)
        return await self.status("greeting")

    async def start_tls(self, target: ProbeTarget) -> None:
        self.transcript.at("TLS handshake", TLS)
        assert self._writer is not None and target.context is not None
        try:
            await self._writer.start_tls(target.context, server_hostname=target.host)
        except (ssl.SSLError, OSError) as exc:
            raise ProbeFailure(TLS, "handshake", f"TLS handshake failed: {exc}") from None
        self.transcript.note("TLS established")

    async def _line(self) -> bytes:
        assert self._reader is not None
        try:
            line = await self._reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            raise ProbeFailure(POP3, "line too long", "the server sent an over-long line") from None
        except ssl.SSLError as exc:
            raise ProbeFailure(TLS, "read", f"TLS error: {exc}") from None
        except OSError as exc:
            raise ProbeFailure(NETWORKING, "reset", f"connection lost: {exc}") from None
        if not line:
            raise ProbeFailure(
                self.transcript.component,
                "closed",
                f"the server closed the connection ({self.transcript.step})",
            )
        return line

    async def status(self, what: str) -> StatusLine:
        line = await self._line()
        self.transcript.received(line)
        try:
            return parse_status_line(line)
        except ProtocolError as exc:
            raise ProbeFailure(POP3, "not POP3", f"{what}: {exc}") from None

    async def command(self, text: str, component: str) -> StatusLine:
        assert self._writer is not None
        self.transcript.at(text.split(" ", 1)[0], component)
        self.transcript.sent(text)
        try:
            self._writer.write(text.encode() + b"\r\n")
            await self._writer.drain()
        except OSError as exc:
            raise ProbeFailure(NETWORKING, "reset", f"connection lost: {exc}") from None
        return await self.status(text.split(" ", 1)[0])

    async def expect_ok(self, text: str, component: str) -> StatusLine:
        reply = await self.command(text, component)
        if not reply.ok:
            keyword = text.split(" ", 1)[0]
            code = f"[{reply.code}] " if reply.code else ""
            raise ProbeFailure(
                component, reply.code or "-ERR", f"{keyword}: -ERR {code}{reply.text}"
            )
        return reply

    async def multiline(self) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while True:
            line = await self._line()
            if line in (b".\r\n", b".\n"):
                return lines
            total += len(line)
            if total > MAX_MULTILINE:
                raise ProbeFailure(POP3, "too long", "multi-line answer too long")
            lines.append(line)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(TimeoutError, OSError, ssl.SSLError):
                await asyncio.wait_for(self._writer.wait_closed(), 1.0)


async def capabilities_probe(
    definition: ProbeDefinition, target: ProbeTarget, transcript: Transcript
) -> Outcome:
    """Greeting and CAPA, no login (PopSelfTestProbe, PopProxyTestProbe)."""
    dialog = Pop3Dialog(transcript)
    try:
        greeting = await dialog.connect(target)
        if not greeting.ok:
            raise ProbeFailure(POP3, greeting.code or "-ERR", f"greeting: -ERR {greeting.text}")
        await dialog.expect_ok("CAPA", POP3)
        capabilities = await dialog.multiline()
        transcript.note(f"{len(capabilities)} capabilities")
        await dialog.expect_ok("QUIT", POP3)
    finally:
        await dialog.close()
    return Outcome()


# Words of a login refusal that name the directory (services/pop3_service.py's
# DIRECTORY_UNREACHABLE) as what failed: POP3 itself works.
DIRECTORY_WORDS = ("directory",)
# Words of a login refusal that name the store as what failed: the back end's "mailbox
# database is not available here now" and "mailbox store error".
STORE_WORDS = ("database", "store")
# The front end's own refusal of a user with too many sessions; every other refusal it
# passes on comes from the back end.
FRONT_END_OWN = "too many connections"


def _login_component(reply: StatusLine, through_front_end: bool) -> str:
    """Which part a refused login blames. A [SYS/TEMP] refusal by a running service is
    that service's failure unless its words name the store."""
    if reply.code == "AUTH":
        return AUTH
    if reply.code not in ("SYS/TEMP", "SYS/PERM"):
        return POP3
    text = reply.text.lower()
    if any(word in text for word in DIRECTORY_WORDS):
        return DIRECTORY
    if any(word in text for word in STORE_WORDS):
        return STORE
    if through_front_end and FRONT_END_OWN not in text:
        return BACKEND  # "mailbox server not reachable", or the back end's own refusal
    return POP3


async def login_probe(
    definition: ProbeDefinition, target: ProbeTarget, transcript: Transcript
) -> Outcome:
    """Log in with the health mailbox, STAT, optionally RETR the probe message, QUIT
    (PopDeepTestProbe at the back end, PopCTPProbe through a front end)."""
    if target.credential is None:
        raise ProbeFailure(AUTH, "no credential", f"no health mailbox for {target.resource}")
    through_front_end = definition.endpoint in ("pop3", "pop3-tls")
    for attempt in (1, 2):
        dialog = Pop3Dialog(transcript)
        try:
            greeting = await dialog.connect(target)
            if not greeting.ok:
                raise ProbeFailure(POP3, greeting.code or "-ERR", f"greeting: -ERR {greeting.text}")
            await dialog.expect_ok(f"USER {target.credential.address}", AUTH)
            reply = await dialog.command(f"PASS {target.credential.password}", AUTH)
            if not reply.ok:
                component = _login_component(reply, through_front_end)
                code = f"[{reply.code}] " if reply.code else ""
                raise ProbeFailure(
                    component, reply.code or "-ERR", f"login: -ERR {code}{reply.text}"
                )
            stat = await dialog.expect_ok("STAT", STORE)
            fields = stat.text.split()
            if not fields or not (fields[0].isascii() and fields[0].isdigit()):
                raise ProbeFailure(POP3, "bad STAT", f"STAT answer not understood: {stat.text!r}")
            count = int(fields[0])
            if definition.retrieve and count == 0 and attempt == 1 and target.deliver_probe_message:
                await dialog.expect_ok("QUIT", POP3)
                transcript.at("delivering the probe message", DELIVERY)
                problem = await target.deliver_probe_message(target.credential.address)
                if problem:
                    raise ProbeFailure(DELIVERY, "LMTP", f"probe message not delivered: {problem}")
                transcript.note("probe message delivered through LMTP; logging in again")
                continue
            if definition.retrieve:
                if count == 0:
                    raise ProbeFailure(STORE, "empty", "the probe message is not in the mailbox")
                await dialog.expect_ok("RETR 1", STORE)
                message = await dialog.multiline()
                transcript.note(f"RETR 1: {sum(len(line) for line in message)} octets")
            await dialog.expect_ok("QUIT", STORE)
            return Outcome()
        finally:
            await dialog.close()
    raise ProbeFailure(STORE, "empty", "the probe message never appeared")


async def counter_probe(
    definition: ProbeDefinition, target: ProbeTarget, transcript: Transcript
) -> Outcome:
    """Read a published counter (AverageCommandProcessingTimeMs) of this server's service."""
    transcript.at("reading counters", COUNTERS)
    for service, path in target.counters_files.items():
        counter = definition.counters.get(service)
        if counter is None:
            continue
        try:
            published = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ProbeFailure(COUNTERS, "unreadable", f"{path.name}: {exc}") from None
        value = published.get(counter) if isinstance(published, dict) else None
        transcript.note(f"{service} {counter} = {value}")
        if not isinstance(value, int | float):
            raise ProbeFailure(COUNTERS, "missing", f"{service} publishes no {counter}")
        return Outcome(sample_value=float(value))
    raise ProbeFailure(COUNTERS, "missing", "no counters published on this server")


async def process_starts_probe(
    definition: ProbeDefinition, target: ProbeTarget, transcript: Transcript
) -> Outcome:
    """Read a service's state from its supervisor: the number of times it exited without
    the supervisor asking (crashes the supervisor mended at once) is the sample, so that
    a monitor sees a crash loop; a stop and start someone asked for does not count."""
    transcript.at("reading the supervisor", PROCESS)
    assert target.read_process is not None
    process = await target.read_process()
    transcript.note(
        f"{target.resource}: {process.state}, pid {process.pid}, up {process.uptime}s, "
        f"{process.unexpected_exits} unexpected exits"
    )
    if process.state != "Running" or process.uptime is None:
        raise ProbeFailure(
            PROCESS, process.state, f"{target.resource} is {process.state} {process.detail}".strip()
        )
    if process.unexpected_exits is None:
        raise ProbeFailure(PROCESS, "no exit count", "the supervisor does not count exits")
    return Outcome(sample_value=float(process.unexpected_exits))


ProbeKind = Callable[[ProbeDefinition, ProbeTarget, Transcript], Awaitable[Outcome]]

PROBE_KINDS: dict[str, ProbeKind] = {
    "pop3-capabilities": capabilities_probe,
    "pop3-login": login_probe,
    "counter": counter_probe,
    "process-starts": process_starts_probe,
}
