"""The web page's event feed: one numbered log per web service, filled by a watcher
that looks at the organization every few seconds and records what changed.

Ids only increase, so a page that lost its stream asks for what came after the last id
it saw (Server-Sent Events' Last-Event-ID) and gets exactly that. A page whose id is
older than the log keeps, or from before this process started, is told to reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from popguard.errors import UserError

log = logging.getLogger("popguard.web")

MAX_EVENTS = 2000  # what the log keeps for replay and for the feed
WATCH_EVERY = 2.0  # seconds between two looks at the organization


@dataclass(frozen=True)
class Event:
    id: int
    at: float
    kind: str  # state | recovery | alert | move | operator | reset
    text: str
    data: dict[str, Any] = field(default_factory=dict)


class EventLog:
    def __init__(self, capacity: int = MAX_EVENTS) -> None:
        self._events: deque[Event] = deque(maxlen=capacity)
        self._last = 0
        self._changed = asyncio.Condition()

    @property
    def last_id(self) -> int:
        return self._last

    def add(self, kind: str, text: str, at: float | None = None, **data: Any) -> Event:
        self._last += 1
        event = Event(self._last, time.time() if at is None else at, kind, text, data)
        self._events.append(event)
        return event

    async def notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def after(self, last_seen: int) -> list[Event] | None:
        """The events after `last_seen`, or None when they cannot all be given (older
        than the log keeps, or an id from another run of the service)."""
        if last_seen > self._last:
            return None
        if self._events and last_seen < self._events[0].id - 1:
            return None
        return [e for e in self._events if e.id > last_seen]

    def newest_first(self, limit: int) -> list[Event]:
        return list(reversed(self._events))[:limit]

    async def wait(self, last_seen: int, seconds: float) -> None:
        """Until there is an event after `last_seen`, or `seconds` have passed."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._changed.wait_for(lambda: self._last > last_seen)


@dataclass
class Snapshot:
    cells: dict[tuple[str, str], str]
    actions: dict[tuple[str, int], dict[str, Any]]
    alerts: dict[tuple[str, int], dict[str, Any]]
    active: dict[str, str]
    operator: dict[int, dict[str, Any]]
    # The health sets' changes each server recorded since the watcher's last look
    # (GET /v1/healthsetchanges): every step, even one shorter than a look apart.
    set_changes: list[dict[str, Any]] = field(default_factory=list)
    # Servers whose health service answered this look (once compared: this look or an
    # earlier one), and those that did not answer this one: the rows of one that did
    # not are not gone, only unknown this time.
    answered: frozenset[str] = frozenset()
    unanswered: frozenset[str] = frozenset()


def _carry_forward(old: Snapshot, now: Snapshot) -> None:
    """Keep in `now` the actions and alerts of the servers that did not answer it, as
    `old` knew them: else their return would make their whole history look new."""
    for server in now.unanswered:
        for key, row in old.actions.items():
            if key[0] == server:
                now.actions.setdefault(key, row)
        for key, row in old.alerts.items():
            if key[0] == server:
                now.alerts.setdefault(key, row)
    now.answered = now.answered | old.answered


def changes(before: Snapshot | None, now: Snapshot, log: EventLog) -> int:
    """Record in `log` what differs from `before` (on the first look: what is stored
    already, so the feed starts with the organization's history); how many."""
    count = 0

    def add(kind: str, text: str, at: float | None = None, **data: Any) -> None:
        nonlocal count
        log.add(kind, text, at, **data)
        count += 1

    first = before is None
    old = before or Snapshot({}, {}, {}, {}, {})
    _carry_forward(old, now)
    # A server whose health service answers for the first time (it was down when the
    # watcher started) brings its stored history: recorded at its own times, like the
    # first look's, not as news.
    newcomers = now.answered - old.answered if not first else frozenset()
    history: list[tuple[str, str, float | None, dict[str, Any]]] = []
    backfill: list[tuple[str, str, float | None, dict[str, Any]]] = []
    for key, row in now.actions.items():
        if key not in old.actions or old.actions[key].get("Result") != row.get("Result"):
            text = (f"{row['Server']}: {row['ResponderName']} [{row['ActionId']}] on "
                    f"{row['TargetResource']}: {row['Result']}. {row['Context']}")  # fmt: skip
            into = backfill if key[0] in newcomers else history
            into.append(("recovery", text, _stamp(row.get("StartTime")), {"server": key[0]}))
    for key, row in now.alerts.items():
        was = old.alerts.get(key)
        if (
            was is None
            or was.get("ResolvedTime") != row.get("ResolvedTime")
            or was.get("AcknowledgedTime") != row.get("AcknowledgedTime")
        ):
            if row.get("ResolvedTime"):
                what = "resolved"
            elif row.get("AcknowledgedTime"):
                what = f"acknowledged by {row['AcknowledgedBy']}: {row['Acknowledgement']}"
            else:
                what = f"raised ({row.get('Notification') or 'not sent yet'})"
            text = (f"{row['Server']}: alert {row['HealthSetName']}\\{row['MonitorName']} on "
                    f"{row['TargetResource']} {what}")  # fmt: skip
            into = backfill if key[0] in newcomers else history
            into.append(("alert", text, _stamp(row.get("RaisedTime")), {"server": key[0]}))
    for number, entry in now.operator.items():
        if number not in old.operator:
            row = entry
            text = (f"{row['User']} ran {row['Action']} on {row['Target']}"
                    f" because {row['Reason']!r}: {row['Result']}")  # fmt: skip
            history.append(("operator", text, _stamp(row.get("Time")), {"user": row["User"]}))
    states = [
        ("state", f"{row['Server']} {row['HealthSet']}: {row['Was']} -> {row['AlertValue']}",
         _stamp(row.get("Time")), {"server": row["Server"], "health_set": row["HealthSet"],
                                   "value": row["AlertValue"], "was": row["Was"]})
        for row in now.set_changes
    ]  # fmt: skip
    if first:
        history.extend(states)
        history.sort(key=lambda h: h[2] or 0.0)
    for kind, text, at, data in history:
        add(kind, text, at if first else None, **data)
    if first:
        return count
    for kind, text, at, data in sorted(backfill + states, key=lambda h: h[2] or 0.0):
        add(kind, text, at, **data)
    for database, active in now.active.items():
        previous = old.active.get(database)
        if previous is not None and previous != active:
            add("move", f"{database}: active copy moved from {previous} to {active}",
                database=database, server=active)  # fmt: skip
    return count


def _stamp(text: Any) -> float | None:
    import datetime

    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None


class Watcher:
    """Looks at the organization every WATCH_EVERY seconds (in a thread: the health
    APIs and the directory block) and records the differences. `look` is given, per
    server, the Id of the last health-set change already seen."""

    def __init__(self, look: Callable[[dict[str, int]], Snapshot], log: EventLog) -> None:
        self._look = look
        self.log = log
        self.last: Snapshot | None = None
        self.seen_changes: dict[str, int] = {}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                snapshot = await asyncio.to_thread(self._look, dict(self.seen_changes))
            except UserError as exc:  # a health service not up yet, the directory away
                log.warning("looking at the organization: %s", exc)
            except Exception:  # the feed must outlive a failed look
                log.exception("looking at the organization failed")
            else:
                if changes(self.last, snapshot, self.log):
                    await self.log.notify()
                self.last = snapshot
                for row in snapshot.set_changes:
                    server, number = str(row["Server"]), int(row["Id"])
                    self.seen_changes[server] = max(self.seen_changes.get(server, 0), number)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WATCH_EVERY)
