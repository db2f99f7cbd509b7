"""Synchronous copies: a change is acknowledged only once a passive copy holds it.

The active copy's replication service knows how far each passive copy has got: a
passive copy pulls the log with the LSN and checksum of the last entry it applied
(and committed), so every pull confirms that much. Delivery (before its `250`) and
the back end (before a QUIT's `+OK`) ask the replication service of their own
server to wait until a *synchronous* copy has confirmed the change's LSN.

Which copies are synchronous is Patroni's synchronous mode, per database:
- a passive copy joins when a pull shows it has everything the active copy has; it
  joins here first (from then on acknowledgements wait for it) and in the directory
  next (from then on Active Manager may fail over to it by itself);
- an acknowledgement waits for any one synchronous copy; when none confirms within
  SYNC_TIMEOUT, every synchronous copy is dropped, in the directory first, and only
  then does the acknowledgement go out without one. Service goes on, and the
  database waits for a person before it fails over (`--skip-lag-checks`);
- with no synchronous copy (none yet, or all dropped) nothing waits.

So at every moment every acknowledged change is on the synchronous copy that holds
the most of the log, and the directory never names a synchronous copy that lacks an
acknowledged change: only a copy named there may be activated without a person.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger("popguard.replication")

# How long an acknowledgement waits for a synchronous copy before going out without
# one. A healthy passive copy confirms within a pull (tens of milliseconds); one that
# does not in 3 s is gone or badly slow, and a delivery should not wait longer for it.
SYNC_TIMEOUT = 3.0


class NotRecorded(Exception):
    """The directory could not be told that the database has no synchronous copy any
    more, so the change may not be acknowledged without one."""


@dataclass
class _DatabaseState:
    members: set[str] = field(default_factory=set)  # server names, as the directory spells
    confirmed: dict[str, int] = field(default_factory=dict)  # server -> LSN it holds
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    recorded: dict[str, bool] = field(default_factory=dict)  # what the directory says


@dataclass(frozen=True)
class Acknowledgement:
    copy: str | None  # the synchronous copy that holds the change; None: no copy waited for
    reason: str


class SynchronousCopies:
    """The synchronous copies of the databases active on this server.

    `record(database, server, synchronous)` writes the directory; it may raise."""

    def __init__(
        self,
        record: Callable[[str, str, bool], Awaitable[None]],
        recorded: Callable[[str], Awaitable[dict[str, bool]]],
        timeout: float = SYNC_TIMEOUT,
    ) -> None:
        self._record = record
        self._recorded = recorded
        self._timeout = timeout
        self._databases: dict[str, _DatabaseState] = {}

    async def _state(self, database: str) -> _DatabaseState:
        state = self._databases.get(database)
        if state is None:
            # After a restart of this service: the directory's synchronous copies are
            # waited for until they confirm or are dropped.
            recorded = await self._recorded(database)
            state = self._databases.get(database)  # another call may have read it first
            if state is None:
                state = self._databases[database] = _DatabaseState()
                state.recorded = recorded
                state.members = {server for server, on in recorded.items() if on}
        return state

    def forget(self, database: str) -> None:
        """This server no longer holds the active copy (an activation cleared the
        directory's marks)."""
        self._databases.pop(database, None)

    async def confirmed(
        self, database: str, server: str, lsn: int, head: Callable[[], Awaitable[int]]
    ) -> None:
        """A pull of `server`'s copy shows it holds the log through `lsn`; `head` reads
        where the active copy's log ends."""
        state = await self._state(database)
        async with state.changed:
            state.confirmed[server] = max(lsn, state.confirmed.get(server, 0))
            if server not in state.members:
                # Joined first, the head read next: every change acknowledged without
                # waiting was committed before the join, so it is within the head read
                # after it, and the copy joins only if it holds all of that.
                state.members.add(server)
                if lsn < await head():
                    state.members.discard(server)
                else:
                    log.warning(
                        "%s\\%s is a synchronous copy now (at LSN %d)", database, server, lsn
                    )
            state.changed.notify_all()
        if server in state.members and not state.recorded.get(server):
            try:
                await self._record(database, server, True)
                state.recorded[server] = True
            except Exception as exc:  # the next pull tries again; waits include it meanwhile
                log.warning("%s\\%s: cannot mark it synchronous yet: %s", database, server, exc)

    async def acknowledge(self, database: str, lsn: int) -> Acknowledgement:
        """Wait until a synchronous copy of `database` holds `lsn`. Raises NotRecorded
        when none does in time and the directory cannot be told so."""
        state = await self._state(database)
        started = time.monotonic()

        def holder() -> str | None:
            return next((s for s in state.members if state.confirmed.get(s, 0) >= lsn), None)

        async with state.changed:
            if not state.members:
                return Acknowledgement(None, f"{database} has no synchronous copy now")
            try:
                async with asyncio.timeout(self._timeout):
                    await state.changed.wait_for(lambda: holder() is not None or not state.members)
            except TimeoutError:
                pass
            copy = holder()
            if copy is not None:
                return Acknowledgement(copy, f"held by {copy}")
            if not state.members:  # dropped by another acknowledgement meanwhile
                return Acknowledgement(None, f"{database} has no synchronous copy now")
            dropped = sorted(state.members)
            for server in dropped:
                try:
                    await self._record(database, server, False)
                except Exception as exc:
                    raise NotRecorded(
                        f"{', '.join(dropped)} did not confirm LSN {lsn} of {database} within "
                        f"{self._timeout:g} s, and the directory cannot be told: {exc}"
                    ) from None
                state.recorded[server] = False
            state.members.clear()
            state.changed.notify_all()
        waited = time.monotonic() - started
        log.error(
            "%s: %s did not confirm LSN %d within %.1f s: no synchronous copy now; a failover "
            "of %s waits for a person until a copy catches up",
            database, ", ".join(dropped), lsn, waited, database,
        )  # fmt: skip
        return Acknowledgement(None, f"{', '.join(dropped)} dropped: no confirmation in time")
