"""The connection limits of a whole POP3 server, kept by its master for every worker.

MaxConnections, MaxConnectionFromSingleIP and MaxConnectionsPerUser are promises
of the server, not of a process: a flood spread over the workers counts once. Each
worker asks before it greets a connection (`admit`) and before a front end logs a
user in on a back end (`take_user`), and says when a connection ends; the master
answers from one table, so the limits are exact. A worker that dies gives back all
it held when its channel closes (`worker_gone`).

At MaxConnections a newcomer takes the place of the oldest connection that has not
logged in yet, whichever worker holds it (that worker is told to close it), as
Dovecot does when its login processes are full; logged-in sessions are never closed
for a newcomer, and the server's own probes have a reserve of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from popguard.directory.settings import PopSettings

# Connections from the server's own address (its monitoring probes) admitted even
# at MaxConnections and never evicted, so that a flood does not blind the health
# engine into restarting the service; this many at most, so the exemption is bounded.
LOCAL_CONNECTION_RESERVE = 16

FROM_ONE_ADDRESS = "too many connections from your address, try again later"
SERVER_FULL = "too many connections to this server, try again later"

Key = tuple[int, str]  # (worker ident, session id)


@dataclass
class _Held:
    client_ip: str
    reserved: bool
    user: str = ""


class ConnectionTable:
    def __init__(self, settings: Callable[[], PopSettings], evict: Callable[[Key], None]) -> None:
        self._settings = settings
        self._evict = evict  # tells a worker to close one of its connections
        self._held: dict[Key, _Held] = {}
        self._per_ip: dict[str, int] = {}
        self._per_user: dict[str, int] = {}
        # The connections that have not logged in, oldest first: who makes room at
        # MaxConnections. Reserved (local) connections are not in it.
        self._pre_login: dict[Key, None] = {}
        self._reserved = 0
        self.evicted = 0

    @property
    def connections(self) -> int:
        return len(self._held)

    def admit(self, key: Key, client_ip: str, local: bool) -> str | None:
        """None when the connection may be greeted (it is counted from now), else why not."""
        reserved = local and self._reserved < LOCAL_CONNECTION_RESERVE
        if not reserved:
            refusal = self._make_room(client_ip)
            if refusal is not None:
                return refusal
            self._pre_login[key] = None
        else:
            self._reserved += 1
        self._held[key] = _Held(client_ip, reserved)
        self._per_ip[client_ip] = self._per_ip.get(client_ip, 0) + 1
        return None

    def _make_room(self, client_ip: str) -> str | None:
        settings = self._settings()
        if self._per_ip.get(client_ip, 0) >= settings.MaxConnectionFromSingleIP:
            return FROM_ONE_ADDRESS
        if len(self._held) < settings.MaxConnections:
            return None
        if not self._pre_login:
            return SERVER_FULL
        oldest = next(iter(self._pre_login))
        del self._pre_login[oldest]
        self.evicted += 1
        # It is counted until its worker says it has closed it.
        self._evict(oldest)
        return None

    def logged_in(self, key: Key) -> None:
        """No newcomer may take this connection's place any more."""
        self._pre_login.pop(key, None)

    def take_user(self, key: Key, user: str) -> bool:
        """Count one more connection for `user`, unless it has MaxConnectionsPerUser."""
        held = self._held.get(key)
        if held is None:
            return False
        self.give_back_user(key)
        if self._per_user.get(user, 0) >= self._settings().MaxConnectionsPerUser:
            return False
        self._per_user[user] = self._per_user.get(user, 0) + 1
        held.user = user
        return True

    def give_back_user(self, key: Key) -> None:
        held = self._held.get(key)
        if held is None or not held.user:
            return
        _decrement(self._per_user, held.user)
        held.user = ""

    def closed(self, key: Key) -> None:
        held = self._held.pop(key, None)
        if held is None:
            return
        self._pre_login.pop(key, None)
        if held.reserved:
            self._reserved -= 1
        _decrement(self._per_ip, held.client_ip)
        if held.user:
            _decrement(self._per_user, held.user)

    def worker_gone(self, worker: int) -> None:
        for key in [k for k in self._held if k[0] == worker]:
            self.closed(key)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 1) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
