"""Handing accepted mail to the mailbox server that holds its recipients' active copy.

One LMTP transaction (RFC 2033) over TLS to that server's `lmtp-peer` port, where it
demands this server's certificate: the target's certificate is verified against the
organization's CA and must name the target, and its greeting must carry the
organization's id, so mail never goes to a stranger that took the address. Each
recipient gets the target's own reply for it, at RCPT or after DATA. Whatever goes
wrong (no answer, TLS refused, a timeout, the connection lost before a recipient's
reply) gives that recipient a 451, never a 250: a 250 here is the target's 250, which
it sends once the message is durable there.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from popguard.directory.directory import Server
from popguard.net import tls
from popguard.services.lmtp_client import lmtp_ident

log = logging.getLogger("popguard.delivery")

T = TypeVar("T")

# Between servers of one organization, so far below RFC 5321 section 4.5.3.2's
# minimums (5 minutes for the greeting and each command, 10 for DATA's end): a target
# that is that slow is better treated as down, and the MTA tries again.
CONNECT_TIMEOUT = 10.0  # TCP and the TLS handshake
REPLY_TIMEOUT = 60.0  # the greeting and each reply to a command
# From the final dot to the last recipient's reply: one durable write per database.
FINAL_REPLY_TIMEOUT = 300.0
# RFC 5321 section 4.5.3.1.5: a reply line has at most 512 octets; some servers send
# longer ones, so allow more, but bound what one reply may hold.
MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100
# What of MAIL's parameters the target needs to see again (RFC 6152, RFC 6531); SIZE
# is sent anew, as the content's own size.
FORWARDED_MAIL_PARAMETERS = ("BODY=", "SMTPUTF8")
# A connection kept for the next transaction to the same server: far below the target's
# idle timeout (120 s by default), like Postfix's smtp_connection_cache_time_limit (2 s).
IDLE_KEEP = 5.0
IDLE_PER_SERVER = 4

_REPLY_LINE = re.compile(rb"^([2-5]\d\d)([ -])(.*)\r?\n$", re.DOTALL)


@dataclass(frozen=True)
class Transaction:
    """What the MTA handed us, for the target's recipients."""

    sender: str  # without angle brackets; "" for the null sender
    mail_options: tuple[str, ...]
    recipients: tuple[str, ...]  # each once
    content: bytes  # as received, lines ending in CRLF, no transparency dots


class ForwardFailed(Exception):
    """The transaction broke off: `detail` is the RFC 3463 code, `why` the reason."""

    def __init__(self, detail: str, why: str) -> None:
        super().__init__(why)
        self.detail = detail
        self.why = why


class Forwarder:
    """Hands transactions from this server (`helo`, `context` with its certificate) to
    the other mailbox servers of `organization`.

    A connection that ended its transaction well is kept for IDLE_KEEP seconds for the
    next one to the same server (at most IDLE_PER_SERVER each), as Postfix's connection
    cache does: it saves the TCP and TLS handshakes, the greeting and LHLO. A kept
    connection that turns out closed (the target restarted, or cut it as idle) fails at
    MAIL, which stores nothing, so the transaction starts again on a new connection.
    """

    def __init__(
        self,
        helo: str,
        source: str,
        context: ssl.SSLContext,
        organization: str,
        data_timeout: float,
    ) -> None:
        self.helo = helo
        # This server's own address, as the target's logs and firewalls expect.
        self.source = source
        self.context = context
        self.organization = organization
        self.data_timeout = data_timeout  # to send the content: what an MTA gets for it
        self._idle: dict[tuple[str, str, int], list[_Peer]] = {}

    async def forward(self, target: Server, transaction: Transaction) -> dict[str, str]:
        """The reply line for each of `transaction`'s recipients. Never raises."""
        replies: dict[str, str] = {}
        try:
            await self._transact(target, transaction, replies)
        except ForwardFailed as failure:
            self._fail(target, transaction, replies, failure)
        except Exception:  # a bug must not cost the other recipients their replies
            log.exception("forwarding to %s failed", target.name)
            self._fail(target, transaction, replies, ForwardFailed("4.3.0", "local error"))
        return replies

    def close(self) -> None:
        for peers in self._idle.values():
            for peer in peers:
                peer.abort()
        self._idle.clear()

    @staticmethod
    def _fail(
        target: Server, transaction: Transaction, replies: dict[str, str], failure: ForwardFailed
    ) -> None:
        missing = [r for r in transaction.recipients if r not in replies]
        if missing:
            log.warning(
                "forwarding to %s: %s; %d recipient(s) not acknowledged",
                target.name,
                failure.why,
                len(missing),
            )
        for recipient in missing:
            replies[recipient] = (
                f"451 {failure.detail} <{recipient}>: not delivered to {target.name}, the "
                f"server of the active copy ({failure.why}), try again later"
            )

    async def _transact(
        self, target: Server, transaction: Transaction, replies: dict[str, str]
    ) -> None:
        options = [
            option
            for option in transaction.mail_options
            if option.upper().startswith(FORWARDED_MAIL_PARAMETERS)
        ]
        options.append(f"SIZE={len(transaction.content)}")
        mail = f"MAIL FROM:<{transaction.sender}> {' '.join(options)}"
        peer = self._kept(target)
        if peer is not None:
            try:
                await _within(REPLY_TIMEOUT, target, peer.command(mail, "MAIL"))
            except ForwardFailed as stale:
                log.info("a kept connection to %s is gone (%s): a new one", target.name, stale)
                peer.abort()
                peer = None
        if peer is None:
            peer = await self._open(target)
            try:
                await _within(REPLY_TIMEOUT, target, peer.command(mail, "MAIL"))
            except BaseException:
                peer.abort()
                raise
        try:
            await self._deliver(peer, target, transaction, replies)
        except BaseException:
            peer.abort()
            raise
        self._keep(target, peer)

    async def _deliver(
        self, peer: _Peer, target: Server, transaction: Transaction, replies: dict[str, str]
    ) -> None:
        """After MAIL: the recipients, the content, and each accepted one's reply."""
        accepted = []
        for recipient in transaction.recipients:
            rcpt = peer.send(f"RCPT TO:<{recipient}>", "RCPT")
            answer = await _within(REPLY_TIMEOUT, target, rcpt)
            if answer.ok:
                accepted.append(recipient)
            else:
                replies[recipient] = answer.text
        if not accepted:
            # A transaction with no recipient ends with RSET (RFC 5321 section 4.1.1.5).
            await _within(REPLY_TIMEOUT, target, peer.command("RSET", "RSET"))
            return
        await _within(REPLY_TIMEOUT, target, peer.command("DATA", "DATA", expect=b"3"))
        await _within(self.data_timeout, target, peer.send_content(transaction.content))

        async def final_replies() -> None:
            # RFC 2033 section 4.2: one reply per accepted RCPT, in RCPT order; each is
            # final as soon as it comes, whatever happens to the others.
            for recipient in accepted:
                replies[recipient] = (await peer.reply("the end of DATA")).text

        await _within(FINAL_REPLY_TIMEOUT, target, final_replies())

    def _key(self, target: Server) -> tuple[str, str, int]:
        return (target.name.lower(), target.address, target.port("lmtp-peer"))

    def _kept(self, target: Server) -> _Peer | None:
        peers = self._idle.get(self._key(target), [])
        while peers:
            peer = peers.pop()
            peer.cancel_expiry()
            if not peer.reader.at_eof() and not peer.writer.transport.is_closing():
                return peer
            peer.abort()
        return None

    def _keep(self, target: Server, peer: _Peer) -> None:
        peers = self._idle.setdefault(self._key(target), [])
        if len(peers) >= IDLE_PER_SERVER:
            peer.quit()
            return

        def expire() -> None:
            if peer in peers:
                peers.remove(peer)
                peer.quit()

        peer.expiry = asyncio.get_running_loop().call_later(IDLE_KEEP, expire)
        peers.append(peer)

    async def _open(self, target: Server) -> _Peer:
        """A verified connection to `target`, greeted and past LHLO."""
        reader, writer = await self._connect(target)
        peer = _Peer(target, reader, writer)
        try:
            greeting = await _within(REPLY_TIMEOUT, target, peer.reply("the greeting"))
            if not greeting.ok or not greeting.text.endswith(lmtp_ident(self.organization)):
                raise ForwardFailed(
                    "4.7.0", f"its greeting {greeting.last_line!r} is not this organization's"
                )
            await _within(REPLY_TIMEOUT, target, peer.command(f"LHLO {self.helo}", "LHLO"))
        except BaseException:
            peer.abort()
            raise
        return peer

    async def _connect(self, target: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        where = f"{target.address}:{target.port('lmtp-peer')}"
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    target.address,
                    target.port("lmtp-peer"),
                    ssl=self.context,
                    # The certificate names the server's address (tls.replication_identity).
                    server_hostname=target.address,
                    ssl_handshake_timeout=CONNECT_TIMEOUT,
                    limit=MAX_REPLY_LINE,
                    local_addr=(self.source, 0),
                )
        except ssl.SSLError as exc:
            raise ForwardFailed("4.7.0", f"TLS with {where} failed: {exc.reason}") from None
        except TimeoutError:
            raise ForwardFailed("4.4.1", f"no answer from {where}") from None
        except OSError as exc:
            raise ForwardFailed("4.4.1", f"cannot connect to {where}: {exc.strerror}") from None
        certificate = writer.get_extra_info("peercert")
        name, unit = tls.peer_name(certificate), tls.peer_unit(certificate)
        if (name or "").lower() != target.name.lower() or unit != tls.REPLICATION_UNIT:
            writer.transport.abort()
            raise ForwardFailed(
                "4.7.0",
                f"{where} shows the certificate of {name!r} ({unit!r}), not {target.name}'s",
            )
        return reader, writer


async def _within(seconds: float, target: Server, step: Awaitable[T]) -> T:
    try:
        async with asyncio.timeout(seconds):
            return await step
    except TimeoutError:
        raise ForwardFailed("4.4.2", f"{target.name} did not answer in time") from None


@dataclass(frozen=True)
class _Reply:
    code: bytes
    lines: tuple[bytes, ...]  # each without its CRLF

    @property
    def ok(self) -> bool:
        return self.code.startswith(b"2")

    @property
    def text(self) -> str:
        """The reply as the target sent it, its lines joined by CRLF."""
        return "\r\n".join(line.decode("utf-8", errors="replace") for line in self.lines)

    @property
    def last_line(self) -> str:
        return self.lines[-1].decode("utf-8", errors="replace")


class _Peer:
    def __init__(
        self, target: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.name = target.name
        self.reader = reader
        self.writer = writer
        self.expiry: asyncio.TimerHandle | None = None  # while kept for the next transaction

    def cancel_expiry(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None

    def abort(self) -> None:
        self.cancel_expiry()
        if not self.writer.transport.is_closing():
            self.writer.transport.abort()

    async def reply(self, what: str) -> _Reply:
        lines: list[bytes] = []
        code = b""
        while len(lines) < MAX_REPLY_LINES:
            try:
                line = await self.reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                raise ForwardFailed("4.4.2", f"{self.name} sent an over-long line") from None
            except OSError as exc:
                raise ForwardFailed(
                    "4.4.2", f"the connection to {self.name} broke before {what}: {exc}"
                ) from None
            if not line:
                raise ForwardFailed("4.4.2", f"{self.name} closed the connection before {what}")
            match = _REPLY_LINE.match(line)
            if match is None or (code and match.group(1) != code):
                raise ForwardFailed("4.4.2", f"{self.name} broke LMTP: {line[:80]!r}")
            code = match.group(1)
            lines.append(line.rstrip(b"\r\n"))
            if match.group(2) == b" ":
                return _Reply(code, tuple(lines))
        raise ForwardFailed("4.4.2", f"{self.name} sent a reply of too many lines")

    async def send(self, line: str, what: str) -> _Reply:
        await self._write(line.encode("utf-8", errors="surrogateescape") + b"\r\n")
        return await self.reply(f"its reply to {what}")

    async def command(self, line: str, what: str, expect: bytes = b"2") -> None:
        """A command that must succeed for the transaction to go on."""
        answer = await self.send(line, what)
        if not answer.code.startswith(expect):
            raise ForwardFailed("4.4.0", f"{self.name} answered {what} with {answer.last_line!r}")

    async def send_content(self, content: bytes) -> None:
        if content and not content.endswith(b"\r\n"):
            content += b"\r\n"
        # RFC 5321 section 4.5.2: a dot is added before each line that starts with one.
        stuffed = re.sub(rb"(?m)^\.", b"..", content)
        await self._write(stuffed + b".\r\n")

    def quit(self) -> None:
        """Say goodbye and close; QUIT's answer adds nothing to wait for."""
        self.cancel_expiry()
        if not self.writer.transport.is_closing():
            self.writer.write(b"QUIT\r\n")
            self.writer.close()

    async def _write(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except OSError as exc:
            raise ForwardFailed(
                "4.4.2", f"the connection to {self.name} broke while sending: {exc}"
            ) from None
