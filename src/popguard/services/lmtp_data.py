"""The content of one LMTP DATA, line by line as it arrives (RFC 5321 section 4.5.2).

Lines are kept byte for byte, less the transparency dot. The first reason to refuse the
message (too big, a line too long, a NUL) is noted and the rest is read and dropped, as
the reply may only come after the final dot (RFC 5321 section 4.2.5).
"""

from __future__ import annotations

import asyncio

END_OF_DATA = b".\r\n"
CRLF = b"\r\n"


class MessageData:
    def __init__(self, size_limit: int, line_limit: int) -> None:
        self.size_limit = size_limit
        # Octets of one line as sent (transparency dot included, CRLF not).
        self.line_limit = line_limit
        self.refusal: str | None = None
        self._lines: list[bytes] = []
        self._size = 0
        # The previous piece was part of an over-long line, not a line's end.
        self._in_long_line = False

    @property
    def content(self) -> bytes:
        return b"".join(self._lines)

    def add_line(self, line: bytes) -> bool:
        """One line ending in CRLF; True when it is the final dot."""
        if self._in_long_line:
            self._in_long_line = False
            return False
        if line == END_OF_DATA:
            return True
        if len(line) - len(CRLF) > self.line_limit:
            self._refuse(self._too_long())
            return False
        if line.startswith(b"."):
            line = line[1:]
        self._size += len(line)
        if self._size > self.size_limit:
            self._refuse(
                f"552 5.3.4 Message too big: at most {self.size_limit} octets are accepted"
            )
        elif b"\0" in line:
            # RFC 5322 section 2.3 and RFC 6152 section 3 forbid NUL in a message;
            # POP3 clients would be served it as is.
            self._refuse("554 5.6.0 Message contains NUL octets, which RFC 5322 forbids")
        elif self.refusal is None:
            self._lines.append(line)
        return False

    def add_fragment(self) -> None:
        """Part of a line longer than the reader holds came (and was dropped): the line is
        refused, and the next piece that ends in CRLF is that line's end."""
        self._in_long_line = True
        self._refuse(self._too_long())

    def _too_long(self) -> str:
        return f"500 5.6.0 Line too long: a message line may have at most {self.line_limit} octets"

    def _refuse(self, reply: str) -> None:
        if self.refusal is None:
            self.refusal = reply
        self._lines.clear()


async def read_message_data(
    reader: asyncio.StreamReader, size_limit: int, line_limit: int
) -> MessageData:
    """Read up to and including the final dot. `reader`'s limit is `line_limit`, so a
    longer line comes in fragments and is never held whole."""
    data = MessageData(size_limit, line_limit)
    while True:
        try:
            line = await reader.readuntil(CRLF)
        except asyncio.LimitOverrunError as overrun:
            await reader.read(overrun.consumed)
            data.add_fragment()
            continue
        if data.add_line(line):
            return data
