"""LMTP deliveries at full speed on several connections, each one timed from the end of
its DATA to the 250 (store_size, delivery_beside_forget).

A raw-socket client, so that what is timed is the server's work on a message it has
whole: the body is sent, then the clock starts when the final "." has gone, and stops
at the reply. One recipient per transaction, as an MTA hands mail over; each
connection is a thread of its own; bounded in messages and in time.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

LMTP_PORT = 2424
REPLY_TIMEOUT = 30.0  # seconds for any one reply
SENDER = "load@example.test"


class LmtpError(RuntimeError):
    """The server did not answer as LMTP does, or closed the connection."""


class TimedLmtp:
    """One LMTP connection: `deliver` runs one transaction and times its DATA."""

    def __init__(self, address: str, port: int = LMTP_PORT) -> None:
        self.sock = socket.create_connection((address, port), timeout=REPLY_TIMEOUT)
        self.buffer = bytearray()
        self._expect(self._reply(), 220)
        self.sock.sendall(b"LHLO bench.example\r\n")
        self._expect(self._reply(), 250)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"QUIT\r\n")
        self.sock.close()

    def _reply(self) -> tuple[int, bytes]:
        """One whole reply, continuation lines included: its code and last line."""
        while True:
            while (end := self.buffer.find(b"\r\n")) < 0:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise LmtpError("the server closed the connection")
                self.buffer += chunk
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 2]
            if len(line) < 3 or not line[:3].isdigit():
                raise LmtpError(f"not an LMTP reply: {line[:200]!r}")
            if line[3:4] != b"-":
                return int(line[:3]), line

    @staticmethod
    def _expect(reply: tuple[int, bytes], code: int) -> None:
        if reply[0] != code:
            raise LmtpError(f"expected {code}, got {reply[1][:200]!r}")

    def deliver(self, recipient: str, content: bytes) -> tuple[int, float]:
        """The code after DATA (or the refusal before it) and the seconds from the
        end of DATA to that reply (0 when refused before DATA)."""
        self.sock.sendall(f"MAIL FROM:<{SENDER}>\r\n".encode())
        self._expect(self._reply(), 250)
        self.sock.sendall(f"RCPT TO:<{recipient}>\r\n".encode())
        code, _ = self._reply()
        if code != 250:
            self.sock.sendall(b"RSET\r\n")
            self._reply()
            return code, 0.0
        self.sock.sendall(b"DATA\r\n")
        self._expect(self._reply(), 354)
        body = content.replace(b"\r\n.", b"\r\n..")  # RFC 5321 4.5.2 dot-stuffing
        if body.startswith(b"."):
            body = b"." + body
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        self.sock.sendall(body)
        self.sock.sendall(b".\r\n")
        sent = time.perf_counter()
        code, _ = self._reply()  # one reply: one recipient
        return code, time.perf_counter() - sent


@dataclass
class Delivered:
    """What a load delivered: each 250's latency (seconds), refusals by code, and the
    wall-clock seconds from the first connection to the last reply."""

    latencies: list[float] = field(default_factory=list)
    refused: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


def deliver_load(
    address: str,
    message_for: Callable[[int], tuple[str, bytes]],
    *,
    connections: int,
    max_messages: int,
    seconds: float,
    port: int = LMTP_PORT,
) -> Delivered:
    """Messages 0, 1, ... (`message_for(n)` gives the recipient and content) on
    `connections` connections as fast as they go, until `max_messages` were sent or
    `seconds` have passed. A connection that fails is counted and not reopened."""
    delivered = Delivered()
    lock = threading.Lock()
    next_number = 0
    deadline = time.monotonic() + seconds

    def sender() -> None:
        nonlocal next_number
        try:
            client = TimedLmtp(address, port)
        except (OSError, LmtpError) as exc:
            with lock:
                delivered.failures.append(f"connect: {exc}")
            return
        try:
            while time.monotonic() < deadline:
                with lock:
                    number = next_number
                    if number >= max_messages:
                        return
                    next_number += 1
                recipient, content = message_for(number)
                code, latency = client.deliver(recipient, content)
                with lock:
                    if code == 250:
                        delivered.latencies.append(latency)
                    else:
                        delivered.refused[code] = delivered.refused.get(code, 0) + 1
        except (OSError, LmtpError) as exc:
            with lock:
                delivered.failures.append(str(exc))
        finally:
            client.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=sender, name=f"lmtp-{i}") for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    delivered.seconds = time.perf_counter() - started
    return delivered
