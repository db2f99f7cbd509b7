"""Check, before measuring, that a server does what the figures assume.

A fast login is worthless if a wrong password also gets in, and RETR throughput
means nothing if the server sends something other than the mail it was given. So,
with a plain poplib client (speed does not matter here), for one user:

- a wrong password must be refused;
- the right one accepted; STAT must count the messages that were put in;
- RETR of a 1 MiB message must return that message's body intact (a server that
  received it over LMTP may have added trace headers, so only the body is compared).
"""

from __future__ import annotations

import poplib
import ssl
from collections.abc import Sequence

from bench.mail import Message


def _connect(host: str, port: int, ca_file: str | None) -> poplib.POP3:
    if ca_file is None:
        return poplib.POP3(host, port, timeout=15)
    ctx = ssl.create_default_context(cafile=ca_file)
    return poplib.POP3_SSL(host, port, timeout=15, context=ctx)


def _quit(conn: poplib.POP3) -> None:
    try:
        conn.quit()
    except (poplib.error_proto, OSError):
        conn.close()


def check_server(
    host: str,
    port: int,
    user: str,
    password: str,
    messages: Sequence[Message],
    ca_file: str | None = None,
) -> list[str]:
    """Return the problems found (an empty list when the server behaves)."""
    problems: list[str] = []
    conn = _connect(host, port, ca_file)
    try:
        conn.user(user)
        conn.pass_(password + "-wrong")
        problems.append(f"a wrong password for {user} was accepted")
    except poplib.error_proto:
        pass  # refused, as it must be
    finally:
        _quit(conn)

    conn = _connect(host, port, ca_file)
    try:
        conn.user(user)
        conn.pass_(password)
        count, _size = conn.stat()
        if count != len(messages):
            problems.append(
                f"STAT counts {count} messages for {user}, {len(messages)} were delivered"
            )
        sizes = {int(n): int(s) for n, s in (line.split() for line in conn.list()[1])}
        big = max(messages, key=lambda m: len(m.data))
        candidates = [n for n, s in sizes.items() if s >= len(big.data)]
        if not candidates:
            problems.append(f"no message of {len(big.data)} bytes or more in LIST: {sizes}")
        else:
            _resp, lines, _octets = conn.retr(candidates[0])
            got = b"\r\n".join(lines) + b"\r\n"  # poplib strips CRLFs and dot-stuffing
            bodies = [
                m.data.split(b"\r\n\r\n", 1)[1] for m in messages if len(m.data) == len(big.data)
            ]
            if not any(got.endswith(body) for body in bodies):
                problems.append(
                    f"RETR {candidates[0]} returned {len(got)} bytes that do not "
                    "end with the body of any delivered message"
                )
    except poplib.error_proto as exc:
        problems.append(f"login/STAT/LIST/RETR as {user} failed: {exc!r}")
    finally:
        _quit(conn)
    return problems


def prime_logins(
    host: str, port: int, users: Sequence[str], password: str, ca_file: str | None = None
) -> list[str]:
    """Log every user in once, so the figures show the steady state.

    A mail service's users poll every few minutes; popguard remembers a verified
    password for 5 minutes (keyed by the stored hash), so in steady state most
    logins skip the KDF. Every server gets the same priming; the cost of a cold
    login is reported separately (`cold_login_cost`).
    """
    problems: list[str] = []
    for user in users:
        conn = _connect(host, port, ca_file)
        try:
            conn.user(user)
            conn.pass_(password)
        except poplib.error_proto as exc:
            problems.append(f"priming login as {user} failed: {exc!r}")
        finally:
            _quit(conn)
    return problems


def cold_login_cost(samples: int = 5) -> float:
    """Milliseconds of one argon2id verification with popguard's parameters."""
    import time

    from popguard.directory.passwords import hash_password, verify_password

    stored = hash_password("benchmark password")
    started = time.perf_counter()
    for _ in range(samples):
        verify_password(stored, "benchmark password")
    return (time.perf_counter() - started) / samples * 1000.0
