"""Talking to another mailbox server's replication service (HTTPS, mutual TLS).

Every failure comes out as one of three exceptions, so the caller can tell a
server that is down (try again) from one that refuses us (a credential problem)
from one that answers with something that is not the protocol (never applied).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import httpx

from popguard.directory.directory import Server
from popguard.store import change_log
from popguard.store.change_log import LogEntry, LogFormatError
from popguard.store.mailbox_database import LogHead, QuotaExceededError, Restored

CONNECT_TIMEOUT = 3.0
REQUEST_TIMEOUT = 30.0
FAILSAFE_PATIENCE = 1.5  # seconds a peer has to say whether it reaches the directory
PULL_PATIENCE = 6.0  # seconds beyond the held wait for a batch of the log to arrive
MAX_BATCH_BYTES = 8 * 1024 * 1024
# How long a restore may take: the peer reads the mailbox's messages of matching sizes
# and writes every missing one in one transaction.
RESTORE_PATIENCE = 300.0
# How long a snapshot download may wait for the peer (to make the snapshot, then
# between two chunks): making one reads the whole database once.
SNAPSHOT_CHUNK_PATIENCE = 120.0


class PeerUnavailable(Exception):
    """The peer did not answer: down, unreachable or too slow."""


class PeerRefused(Exception):
    """The peer answered and said no (a credential, or a request it will not do)."""


class PeerProtocolError(Exception):
    """The peer answered with something that is not the replication protocol."""


@dataclass(frozen=True)
class LogBatch:
    entries: list[LogEntry]
    source_head: int  # the peer's last LSN when it answered


class Diverged(Exception):
    """Our log is not a prefix of the peer's: we hold changes it never had."""

    def __init__(self, peer_head: int) -> None:
        super().__init__(f"log diverged from the active copy's (its last LSN {peer_head})")
        self.peer_head = peer_head


class LogTrimmed(Exception):
    """The peer's log no longer has the entries after our head: we need a snapshot."""

    def __init__(self, base_lsn: int) -> None:
        super().__init__(f"the active copy's log starts after LSN {base_lsn}")
        self.base_lsn = base_lsn


@dataclass(frozen=True)
class Snapshot:
    lsn: int
    octets: int
    sha256: str


class ReplicationPeer:
    def __init__(self, server: Server, context: ssl.SSLContext) -> None:
        self.server = server
        self._client = httpx.AsyncClient(
            base_url=f"https://{_host(server.address)}:{server.port('replication')}/v1/",
            verify=context,
            timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT),
        )

    async def __aenter__(self) -> ReplicationPeer:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _request(
        self, method: str, path: str, patience: float = REQUEST_TIMEOUT, **kwargs: Any
    ) -> httpx.Response:
        name = self.server.name
        timeout = httpx.Timeout(patience, connect=CONNECT_TIMEOUT)
        try:
            try:
                response = await self._client.request(method, path, timeout=timeout, **kwargs)
            except httpx.RemoteProtocolError as exc:
                if method != "GET" or "without sending a response" not in str(exc):
                    raise
                # A read, once more on a new connection: a kept-alive one the peer
                # closed as the request left (it is stopping, or idle too long) says
                # nothing of our certificate, and the new one tells which it was.
                response = await self._client.request(method, path, timeout=timeout, **kwargs)
        except httpx.ConnectError as exc:
            if isinstance(exc.__cause__, ssl.SSLError) or "SSL" in str(exc):
                raise PeerRefused(f"TLS with {name} failed: {exc}") from None
            raise PeerUnavailable(f"{name} does not answer: {exc or 'connection failed'}") from None
        except httpx.TimeoutException:
            raise PeerUnavailable(f"{name} did not answer in time") from None
        except httpx.RemoteProtocolError as exc:
            if "without sending a response" in str(exc):
                # With TLS 1.3 a server that rejects our certificate says so only by
                # closing the connection after the handshake.
                raise PeerRefused(
                    f"{name} closed the connection without an answer (does it refuse "
                    "this server's certificate?)"
                ) from None
            raise PeerProtocolError(f"{name} broke the protocol: {exc}") from None
        except httpx.TransportError as exc:
            raise PeerUnavailable(f"{name}: {exc or type(exc).__name__}") from None
        if response.status_code in (401, 403):
            raise PeerRefused(f"{name} refused our credential: {_reason(response)}")
        return response

    async def log_after(self, database: str, head: LogHead, wait: float) -> LogBatch:
        response = await self._request(
            "GET",
            f"databases/{database}/log",
            # Not REQUEST_TIMEOUT: a pull held over a link that went silent must end
            # soon enough for this copy to report itself before its status goes
            # stale (ServiceDown), which would keep Active Manager from activating it.
            patience=wait + PULL_PATIENCE,
            params={
                "after": head.lsn,
                "checksum": head.checksum.hex(),
                "wait": wait,
                "max_bytes": MAX_BATCH_BYTES,
            },
        )
        if response.status_code == 409:
            raise Diverged(_int(_json(response).get("last_lsn"), "last_lsn"))
        if response.status_code == 410:
            raise LogTrimmed(_int(_json(response).get("base_lsn"), "base_lsn"))
        _expect_ok(response)
        try:
            entries = change_log.decode(response.content)
        except LogFormatError as exc:
            raise PeerProtocolError(f"{self.server.name} sent a malformed log: {exc}") from None
        source_head = _int(response.headers.get("X-Last-Lsn"), "X-Last-Lsn header")
        return LogBatch(entries, source_head)

    async def snapshot(self, database: str, out: Path) -> Snapshot:
        """Download a snapshot of the peer's copy into `out` (owner-only, fsynced),
        checked against the SHA-256 the peer sent before it: PeerProtocolError if it does
        not match or is cut short."""
        name = self.server.name
        digest, octets = hashlib.sha256(), 0
        timeout = httpx.Timeout(SNAPSHOT_CHUNK_PATIENCE, connect=CONNECT_TIMEOUT)
        try:
            async with self._client.stream(
                "GET", f"databases/{database}/snapshot", timeout=timeout
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    if response.status_code in (401, 403):
                        raise PeerRefused(f"{name} refused our credential: {_reason(response)}")
                    _expect_ok(response)
                expected = response.headers.get("X-Snapshot-Sha256", "")
                lsn = _int(response.headers.get("X-Snapshot-Lsn"), "X-Snapshot-Lsn header")
                sink = await asyncio.to_thread(_create_owner_only, out)
                try:
                    async for chunk in response.aiter_bytes(1 << 20):
                        digest.update(chunk)
                        octets += len(chunk)
                        await asyncio.to_thread(sink.write, chunk)
                    await asyncio.to_thread(_sync, sink)
                finally:
                    sink.close()
        except httpx.TimeoutException:
            raise PeerUnavailable(f"{name} did not send its snapshot in time") from None
        except httpx.TransportError as exc:
            raise PeerUnavailable(
                f"{name}: snapshot cut short: {exc or type(exc).__name__}"
            ) from None
        if digest.hexdigest() != expected:
            raise PeerProtocolError(
                f"{name}'s snapshot of {database} fails its SHA-256 ({octets} octets received)"
            )
        return Snapshot(lsn, octets, expected)

    async def checksum_at(self, database: str, lsn: int) -> bytes | None:
        response = await self._request("GET", f"databases/{database}/checksum/{lsn}")
        if response.status_code == 404:
            return None
        _expect_ok(response)
        value = _json(response).get("checksum")
        try:
            return bytes.fromhex(str(value))
        except ValueError:
            raise PeerProtocolError(f"{self.server.name} sent a checksum that is not hex") from None

    async def directory_reachable(self) -> bool:
        """Whether this peer's replication service renewed its lease lately (the
        failsafe: see service.py). PeerUnavailable when it does not answer in time."""
        response = await self._request("GET", "failsafe", patience=FAILSAFE_PATIENCE)
        _expect_ok(response)
        reachable = _json(response).get("directory_reachable")
        if not isinstance(reachable, bool):
            raise PeerProtocolError("directory_reachable is not true or false")
        return reachable

    async def head(self, database: str) -> dict[str, Any]:
        response = await self._request("GET", f"databases/{database}/head")
        _expect_ok(response)
        return _json(response)

    async def dismount(self, database: str) -> LogHead:
        response = await self._request("POST", f"databases/{database}/dismount")
        _expect_ok(response)
        return _log_head(_json(response))

    async def mount(self, database: str, expected: LogHead | None, catch_up: float) -> LogHead:
        body = (
            {"lsn": None, "checksum": None}
            if expected is None
            else {"lsn": expected.lsn, "checksum": expected.checksum.hex()}
        )
        response = await self._request(
            "POST",
            f"databases/{database}/mount",
            patience=catch_up + REQUEST_TIMEOUT,
            json={**body, "catch_up": catch_up},
        )
        _expect_ok(response)
        return _log_head(_json(response))

    async def usage(self, database: str) -> dict[str, tuple[int, int]]:
        """Each mailbox's (messages, octets) in the peer's copy of `database`."""
        response = await self._request("GET", f"databases/{database}/usage")
        _expect_ok(response)
        found = {}
        for address, value in _json(response).items():
            if not (isinstance(value, list) and len(value) == 2):
                raise PeerProtocolError(f"{self.server.name} sent a malformed usage")
            found[str(address)] = (_int(value[0], "items"), _int(value[1], "octets"))
        return found

    async def redeliver(self, database: str, origin: str, entries: list[LogEntry]) -> int:
        response = await self._request(
            "POST",
            f"databases/{database}/redeliver",
            content=b"".join(change_log.encode(entries)),
            headers={"X-Origin": origin},
        )
        _expect_ok(response)
        return _int(_json(response).get("stored"), "stored")

    async def restore(self, database: str, entries: list[LogEntry], quota: int | None) -> Restored:
        """Give the peer's active copy of `database` the messages in `entries` (all for
        one mailbox) that the mailbox does not hold, in one transaction. With a `quota`,
        QuotaExceededError when they do not fit (nothing is stored)."""
        response = await self._request(
            "POST",
            f"databases/{database}/restore",
            patience=RESTORE_PATIENCE,
            content=b"".join(change_log.encode(entries)),
            params={} if quota is None else {"quota": quota},
        )
        if response.status_code == 507:
            body = _json(response)
            raise QuotaExceededError(
                str(body.get("address", "")),
                _int(body.get("used"), "used"),
                _int(body.get("needed"), "needed"),
                _int(body.get("quota"), "quota"),
            )
        _expect_ok(response)
        body = _json(response)
        return Restored(
            _int(body.get("restored"), "restored"),
            _int(body.get("already_there"), "already_there"),
            _int(body.get("octets"), "octets"),
        )


def _create_owner_only(path: Path) -> BinaryIO:
    """A new file only its owner can read: a snapshot holds mail."""
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")


def _sync(sink: BinaryIO) -> None:
    sink.flush()
    os.fsync(sink.fileno())


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _reason(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))[:300]
    except (ValueError, AttributeError):
        return response.text[:300] or response.reason_phrase


def _expect_ok(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise PeerRefused(f"HTTP {response.status_code}: {_reason(response)}")


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except (ValueError, json.JSONDecodeError):
        raise PeerProtocolError("the answer is not JSON") from None
    if not isinstance(value, dict):
        raise PeerProtocolError("the answer is not a JSON object")
    return value


def _int(value: object, what: str) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise PeerProtocolError(f"{what} is not a number: {str(value)[:40]!r}") from None


def _log_head(value: dict[str, Any]) -> LogHead:
    lsn = _int(value.get("lsn"), "lsn")
    try:
        checksum = bytes.fromhex(str(value.get("checksum")))
    except ValueError:
        raise PeerProtocolError("checksum is not hex") from None
    return LogHead(lsn, checksum)
