"""Loopback addresses and ports for private servers, and waiting for them to answer."""

from __future__ import annotations

import secrets
import socket
import subprocess
import time

# The ports a popguard server binds on its own address: pop3be, pop3be-tls, LMTP,
# LMTP from the other mailbox servers, replication, health API, web page (front ends).
SERVER_PORTS = (1110, 1995, 2424, 2425, 64327, 8480, 8088)
START_TIMEOUT = 20.0  # seconds for a freshly started server to answer


def free_port(address: str) -> int:
    """A TCP port that is free on `address` right now."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


def free_loopback_address(ports: tuple[int, ...] = SERVER_PORTS) -> str:
    """A random 127.x.y.z on which every one of `ports` is free: a host of its own for
    each test or benchmark server, so that runs side by side never meet."""
    for _ in range(100):
        octets = (
            secrets.randbelow(200) + 20,
            secrets.randbelow(254) + 1,
            secrets.randbelow(253) + 2,
        )
        address = "127.{}.{}.{}".format(*octets)
        try:
            for port in ports:
                with socket.socket() as probe:
                    probe.bind((address, port))
        except OSError:
            continue
        return address
    raise RuntimeError("no free loopback address found")


def wait_port(
    address: str,
    port: int,
    timeout: float = START_TIMEOUT,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until something accepts TCP connections on address:port; RuntimeError as
    soon as `process`, the server that should listen there, has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"service exited with status {process.returncode}")
        try:
            socket.create_connection((address, port), timeout=2.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def wait_for_greeting(address: str, port: int, timeout: float = 15.0) -> None:
    """Wait until a POP3 server answers +OK on address:port."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=2.0) as sock:
                greeting = sock.recv(512)
                if greeting.startswith(b"+OK"):
                    return
                last = f"unexpected greeting {greeting!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"no POP3 greeting on {address}:{port} after {timeout}s: {last}")
