"""The mail every benchmarked server is filled with.

Each user gets the same set: a few 1 MiB messages for the RETR test and a couple of
small ones, so that STAT in the login test sees a mailbox that is not empty. The
messages are deterministic and use CRLF line endings (what POP3 sends on the wire),
so that the bytes a client receives are the same whichever server sends them.
"""

from __future__ import annotations

from dataclasses import dataclass

BIG_SIZE = 1024 * 1024  # 1 MiB, the size the issue asks RETR throughput for
SMALL_SIZE = 2 * 1024
BIG_COUNT = 4
SMALL_COUNT = 2
DOMAIN = "bench.test"

# 76 characters per line plus CRLF, like base64 bodies; no line starts with "." so the
# server does not need to dot-stuff anything and the byte counts stay comparable.
_LINE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


@dataclass(frozen=True)
class Message:
    """One message: its name (used for maildir file names) and its bytes."""

    name: str
    data: bytes


def make_message(name: str, size: int) -> Message:
    """Build a message of exactly `size` bytes (headers included) with CRLF lines."""
    headers = (
        f"From: Bench Sender <sender@{DOMAIN}>\r\n"
        f"To: undisclosed-recipients:;\r\n"
        f"Subject: popguard benchmark message {name}\r\n"
        "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        f"Message-ID: <{name}@{DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")
    if size < len(headers) + 3:
        raise ValueError(f"message size {size} is smaller than its headers")
    body = bytearray()
    remaining = size - len(headers)
    line_no = 0
    while remaining > 0:
        # A full line is 76 characters plus CRLF; the last one is shortened to fit.
        width = min(76, remaining - 2)
        if width <= 0:
            # One or two bytes left: they cannot hold a line, so widen the previous one.
            body[-2:-2] = b"x" * remaining
            break
        offset = line_no % len(_LINE_CHARS)
        chars = (_LINE_CHARS[offset:] + _LINE_CHARS * 2)[:width]
        body += chars.encode("ascii") + b"\r\n"
        remaining -= width + 2
        line_no += 1
    data = headers + bytes(body)
    assert len(data) == size, (len(data), size)
    return Message(name=name, data=data)


def standard_messages(big_count: int = BIG_COUNT, small_count: int = SMALL_COUNT) -> list[Message]:
    """The mail each user gets: small ones first, then the 1 MiB ones."""
    small = [make_message(f"small{i + 1}", SMALL_SIZE) for i in range(small_count)]
    big = [make_message(f"big{i + 1}", BIG_SIZE) for i in range(big_count)]
    return small + big


def user_names(count: int, domain: str = DOMAIN) -> list[str]:
    """user0001@bench.test ... : the same login names for every server."""
    return [f"user{i + 1:04d}@{domain}" for i in range(count)]
