"""Messages in the form POP3 sends them: CRLF line endings, dot-stuffed.

The store keeps each message already in this "wire" form, so RETR is a straight
copy followed by the terminating ".CRLF" (RFC 1939 section 3).
"""

from __future__ import annotations

import re

_BARE_LF = re.compile(rb"(?<!\r)\n")
TERMINATOR = b".\r\n"


def normalize(content: bytes) -> bytes:
    """CRLF line endings, ending with CRLF; the octets LIST reports the size of."""
    if content.count(b"\n") != content.count(b"\r\n"):
        content = _BARE_LF.sub(b"\r\n", content)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return content


def stuff(normalized: bytes) -> bytes:
    """Byte-stuff lines that begin with the termination octet (RFC 1939 section 3)."""
    stuffed = normalized.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def unstuff(wire: bytes) -> bytes:
    """The inverse of `stuff`, for clients and tests."""
    content = wire.replace(b"\r\n..", b"\r\n.")
    return content[1:] if content.startswith(b"..") else content


def to_wire(content: bytes) -> tuple[bytes, int]:
    """The stored form of a message and its size in octets as LIST reports it."""
    normalized = normalize(content)
    return stuff(normalized), len(normalized)


def top(wire: bytes, body_lines: int) -> bytes:
    """The header, the blank line and the first `body_lines` lines of the body."""
    if wire.startswith(b"\r\n"):  # a message with an empty header
        position = 2
    else:
        blank_line = wire.find(b"\r\n\r\n")
        if blank_line < 0:
            return wire  # no body at all: the header is the whole message
        position = blank_line + 4
    for _ in range(body_lines):
        next_end = wire.find(b"\r\n", position)
        if next_end < 0:
            return wire
        position = next_end + 2
    return wire[:position]
