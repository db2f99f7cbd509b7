"""Who holds an address and port: checked before `popguard up` starts anything, and
after, to know that what listens is its own service and not a stranger's.

psutil reads the kernel's socket tables (/proc/net/tcp*) and each process's open
sockets, which is what naming the holder of a port needs.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Endpoint:
    server: str
    service: str
    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.address}:{self.port} ({self.service} of {self.server})"


def _covers(bound: str, address: str) -> bool:
    """A socket bound to `bound` takes connections for `address` (0.0.0.0 and :: take all)."""
    if bound == address:
        return True
    try:
        return ipaddress.ip_address(bound).is_unspecified
    except ValueError:
        return False


def listener_pids(address: str, port: int) -> set[int]:
    """The processes with a socket listening on address:port (or on every address)."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error:  # not allowed to read other users' sockets: nothing known
        return set()
    return {
        c.pid
        for c in connections
        if c.status == psutil.CONN_LISTEN
        and c.pid is not None
        and c.laddr
        and c.laddr.port == port
        and _covers(c.laddr.ip, address)
    }


def held_by(pid: int | None, holders: set[int]) -> bool:
    """Whether the listeners `holders` are the process `pid` or its workers (a master's
    workers share its socket, and the kernel's tables name one of them)."""
    if pid is None:
        return False
    if pid in holders:
        return True
    for holder in holders:
        try:
            if psutil.Process(holder).ppid() == pid:
                return True
        except psutil.Error:
            continue
    return False


def _holder(address: str, port: int) -> str:
    named = []
    for pid in sorted(listener_pids(address, port)):
        try:
            command = " ".join(psutil.Process(pid).cmdline()) or psutil.Process(pid).name()
        except psutil.Error:
            command = "?"
        named.append(f"pid {pid} ({command[:120]})")
    return ", ".join(named) or "another process (its owner is not visible to this user)"


def in_use(endpoint: Endpoint) -> str | None:
    """Why `endpoint` cannot be listened on (its holder named), or None when it is free."""
    family = socket.AF_INET6 if ":" in endpoint.address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the services themselves bind: SO_REUSEADDR, so a port in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((endpoint.address, endpoint.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"{endpoint} is in use by {_holder(endpoint.address, endpoint.port)}"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{endpoint}: no interface of this machine has {endpoint.address}"
            return f"{endpoint}: {exc.strerror or exc}"
    return None
