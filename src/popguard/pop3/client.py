"""The client side of POP3: reading status lines, as the proxy and probes do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# RFC 2449 section 4: a response line is at most 512 octets, CRLF included.
MAX_STATUS_LINE = 512


class ProtocolError(Exception):
    """The server said something that is not POP3."""


@dataclass(frozen=True)
class StatusLine:
    ok: bool
    code: str | None  # the RFC 2449 / RFC 3206 response code, e.g. "IN-USE"
    text: str
    raw: bytes  # the line as received, CRLF included


def parse_status_line(line: bytes) -> StatusLine:
    """A "+OK ..." or "-ERR [CODE] ..." line; anything else is a ProtocolError."""
    if line.startswith(b"+OK"):
        ok, rest = True, line[3:]
    elif line.startswith(b"-ERR"):
        ok, rest = False, line[4:]
    else:
        raise ProtocolError(f"not a POP3 status line: {line[:60]!r}")
    if rest[:1] not in (b"", b" ", b"\r", b"\n"):
        raise ProtocolError(f"not a POP3 status line: {line[:60]!r}")
    text = rest.strip().decode("utf-8", "replace")
    code = None
    if text.startswith("["):
        end = text.find("]")
        if end > 1:
            code, text = text[1:end], text[end + 1 :].strip()
    return StatusLine(ok, code, text, line)


class ReadableStream(Protocol):
    async def read(self) -> bytes: ...


class LineReader:
    """Whole lines from a stream of chunks, each bounded in length."""

    def __init__(self, stream: ReadableStream, limit: int = MAX_STATUS_LINE) -> None:
        self._stream = stream
        self._limit = limit
        self._buffer = bytearray()

    async def line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > self._limit:
                raise ProtocolError(f"line longer than {self._limit} octets")
            data = await self._stream.read()
            if not data:
                raise ConnectionResetError("the server closed the connection")
            self._buffer += data

    async def status(self) -> StatusLine:
        return parse_status_line(await self.line())

    def unread(self) -> bytes:
        """What was received after the last line returned."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest
