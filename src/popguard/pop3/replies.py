"""Building POP3 replies (RFC 1939 status lines, RFC 2449 / RFC 3206 codes)."""

from __future__ import annotations

from enum import StrEnum

CRLF = b"\r\n"


class ResponseCode(StrEnum):
    """RFC 2449 section 8 and RFC 3206 extended response codes."""

    IN_USE = "IN-USE"
    LOGIN_DELAY = "LOGIN-DELAY"
    SYS_TEMP = "SYS/TEMP"
    SYS_PERM = "SYS/PERM"
    AUTH = "AUTH"


def ok(text: str = "") -> bytes:
    return b"+OK " + text.encode() + CRLF if text else b"+OK" + CRLF


def err(text: str, code: ResponseCode | None = None) -> bytes:
    prefix = f"[{code}] " if code else ""
    return f"-ERR {prefix}{text}".encode() + CRLF


def multiline(first: bytes, lines: list[str]) -> bytes:
    """A status line, then lines (dot-stuffed), then the terminating dot."""
    body = b"".join(
        (b"." + line.encode() if line.startswith(".") else line.encode()) + CRLF for line in lines
    )
    return first + body + b"." + CRLF
