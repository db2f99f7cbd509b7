"""Performance counters that other processes can read.

A service keeps its counters in memory and publishes them every second as a
small JSON file (written to a temporary name, then renamed, so a reader never
sees half a file). The health engine's AverageCommandProcessingTime monitor
reads `AverageCommandProcessingTimeMs` from it.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The rolling window of the average command processing time and of the rate.
WINDOW_SECONDS = 60
PUBLISH_INTERVAL = 1.0


@dataclass
class _Bucket:
    second: int
    commands: int = 0  # every command, for the rate
    timed: int = 0  # the commands whose processing time is known, for the average
    total_ms: float = 0.0


class ServiceCounters:
    def __init__(self, service: str, clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self._clock = clock
        self.current_connections = 0
        self.total_connections = 0
        self.rejected_connections = 0
        # Closed before logging in to make room for a newcomer at MaxConnections.
        self.evicted_connections = 0
        self.total_commands = 0
        self.failed_logins = 0
        self.successful_logins = 0
        self.messages_retrieved = 0
        self.messages_deleted = 0
        self.open_tasks = 0  # connection tasks alive: a leak shows here
        self.settings_revision = 0  # the POP settings revision in force
        # Password checks (services/authentication.py): argon2id runs now and at
        # most at once, in all and for any one address or user; logins queued for
        # a turn; logins that waited for an earlier failure's delay first; and
        # logins from a clean address for a clean user that, while queued, saw an
        # attempt from a failing address or user served first (the lanes keep it 0).
        self.verifications_in_flight = 0
        self.peak_verifications_in_flight = 0
        self.peak_verifications_per_address = 0
        self.peak_verifications_per_user = 0
        self.verifications_waiting = 0
        self.peak_verifications_waiting = 0
        self.delayed_before_verification = 0
        self.logins_queued_behind_failing = 0
        self._buckets: deque[_Bucket] = deque()
        self.started = clock()

    def _bucket(self) -> _Bucket:
        second = int(self._clock())
        if not self._buckets or self._buckets[-1].second != second:
            self._buckets.append(_Bucket(second))
            self._expire(second)
        return self._buckets[-1]

    def command_done(self, elapsed_ms: float) -> None:
        self.total_commands += 1
        bucket = self._bucket()
        bucket.commands += 1
        bucket.timed += 1
        bucket.total_ms += elapsed_ms

    def commands_relayed(self, count: int) -> None:
        """Commands passed through unparsed: they count for the rate, not the average."""
        if count:
            self.total_commands += count
            self._bucket().commands += count

    def _expire(self, now: int) -> None:
        while self._buckets and self._buckets[0].second <= now - WINDOW_SECONDS:
            self._buckets.popleft()

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        self._expire(int(now))
        commands = sum(b.commands for b in self._buckets)
        timed = sum(b.timed for b in self._buckets)
        total_ms = sum(b.total_ms for b in self._buckets)
        window = min(WINDOW_SECONDS, max(now - self.started, 1.0))
        return {
            "Service": self.service,
            "ProcessId": os.getpid(),
            "Updated": now,
            "CurrentConnections": self.current_connections,
            "TotalConnections": self.total_connections,
            "RejectedConnections": self.rejected_connections,
            "EvictedConnections": self.evicted_connections,
            "TotalCommands": self.total_commands,
            "CommandsPerSecond": round(commands / window, 3),
            "AverageCommandProcessingTimeMs": round(total_ms / timed, 3) if timed else 0.0,
            "SuccessfulLogins": self.successful_logins,
            "FailedLogins": self.failed_logins,
            "MessagesRetrieved": self.messages_retrieved,
            "MessagesDeleted": self.messages_deleted,
            "OpenTasks": self.open_tasks,
            "SettingsRevision": self.settings_revision,
            "VerificationsInFlight": self.verifications_in_flight,
            "PeakVerificationsInFlight": self.peak_verifications_in_flight,
            "PeakVerificationsPerAddress": self.peak_verifications_per_address,
            "PeakVerificationsPerUser": self.peak_verifications_per_user,
            "VerificationsWaiting": self.verifications_waiting,
            "PeakVerificationsWaiting": self.peak_verifications_waiting,
            "DelayedBeforeVerification": self.delayed_before_verification,
            "LoginsQueuedBehindFailing": self.logins_queued_behind_failing,
        }

    def publish(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.snapshot()))
        os.replace(temporary, path)


def read_counters(path: Path) -> dict[str, Any] | None:
    """The last published counters, or None when the service never published."""
    try:
        loaded = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return loaded if isinstance(loaded, dict) else None
