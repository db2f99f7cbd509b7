"""A small byte stream over an asyncio Protocol, with an in-place TLS upgrade.

asyncio's StreamReader reads ahead on its own, so bytes a client pipelines after
STLS can sit in its buffer and come out as if sent inside TLS (CVE-2011-0411),
and on uvloop the read-ahead can even swallow the TLS ClientHello. This stream
owns its buffer: `start_tls` stops reading first, drops anything buffered, and
only then hands the socket to TLS. Flow control goes both ways: reading pauses
when the buffer is full, `drain` waits while the socket's send buffer is full.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import cast

# Above this many unread bytes the socket is not read any more until the session
# catches up, so a client that floods us cannot grow our memory.
READ_BUFFER_LIMIT = 256 * 1024
# A TLS handshake that has not finished by then is dropped: until it finishes the
# connection counts against no limit, so it must not linger.
TLS_HANDSHAKE_TIMEOUT = 10.0
# How long a closed connection may take to hand its last bytes to a peer.
CLOSE_GRACE = 10.0


class ByteStream(asyncio.Protocol):
    def __init__(self, on_connected: Callable[[ByteStream], None] | None = None) -> None:
        self._on_connected = on_connected
        self.transport: asyncio.Transport | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._reading_paused = False
        self._data_ready: asyncio.Event = asyncio.Event()
        self._can_write: asyncio.Event = asyncio.Event()
        self._can_write.set()
        self.closed: asyncio.Event = asyncio.Event()

    # Protocol callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        if self._on_connected is not None:
            self._on_connected(self)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self._data_ready.set()
        if self._buffered > READ_BUFFER_LIMIT and self.transport and not self._reading_paused:
            self.transport.pause_reading()
            self._reading_paused = True

    def eof_received(self) -> bool:
        self._eof = True
        self._data_ready.set()
        # Keep our side open: a client that half-closes after its last command
        # still gets the answers (the session closes the connection when done).
        # TLS has no half-close, and uvloop warns if asked for one there.
        return self.transport is None or self.transport.get_extra_info("ssl_object") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._data_ready.set()
        self._can_write.set()
        self.closed.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # The stream --------------------------------------------------------------------------

    async def read(self) -> bytes:
        """The next bytes the peer sent; b"" once it has closed."""
        while not self._chunks:
            if self._eof:
                return b""
            self._data_ready.clear()
            await self._data_ready.wait()
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._reading_paused and self._buffered <= READ_BUFFER_LIMIT // 2 and self.transport:
            self.transport.resume_reading()
            self._reading_paused = False
        return data

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    @property
    def writable(self) -> bool:
        """False while the socket's send buffer is above its high-water mark."""
        return self._can_write.is_set()

    async def drain(self) -> None:
        """Wait until the socket can take more (the peer is reading)."""
        if self.closed.is_set():
            raise ConnectionResetError("connection closed")
        await self._can_write.wait()

    def peer(self) -> tuple[str, int]:
        info = self.transport.get_extra_info("peername") if self.transport else None
        return (str(info[0]), int(info[1])) if info else ("?", 0)

    def local(self) -> tuple[str, int]:
        info = self.transport.get_extra_info("sockname") if self.transport else None
        return (str(info[0]), int(info[1])) if info else ("?", 0)

    def stop_reading(self) -> None:
        """Read nothing more from the socket (before STLS's reply goes out)."""
        if self.transport is not None and not self._reading_paused:
            self.transport.pause_reading()
            self._reading_paused = True

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Upgrade to TLS as the server; call `stop_reading` before the +OK is sent."""
        assert self.transport is not None
        self.stop_reading()
        # Whatever arrived in the clear after the STLS command is discarded.
        self._chunks.clear()
        self._buffered = 0
        loop = asyncio.get_running_loop()
        upgraded = await loop.start_tls(
            self.transport,
            self,
            context,
            server_side=True,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
        )
        if upgraded is None:
            raise ConnectionResetError("connection closed during the TLS handshake")
        self.transport = upgraded
        self._reading_paused = False

    def close(self) -> None:
        """Close after what is buffered has been sent, but give a peer that does not
        read at most CLOSE_GRACE seconds: then the socket is dropped."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        if not self.closed.is_set():
            asyncio.get_running_loop().call_later(CLOSE_GRACE, self.abort)

    def abort(self) -> None:
        """Drop the connection now, unsent data and all."""
        if self.transport is not None and not self.closed.is_set():
            self.transport.abort()
