"""Performance counters that other processes can read.

Each worker of a service keeps its counters in memory and reports them to its
master every second (`report`); the master sums them (`SummedCounters`) and
publishes the sum as a small JSON file (written to a temporary name, then
renamed, so a reader never sees half a file). The health engine's
AverageCommandProcessingTime monitor reads `AverageCommandProcessingTimeMs`
from it: the average over every worker's commands, weighted by their number,
not an average of averages. What a worker that died had counted stays in the
totals.
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
        self.kdf_runs = 0  # argon2id verifications run: logins the positive cache missed
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

    def window(self) -> tuple[int, int, float]:
        """The rolling window's commands, timed commands and their total milliseconds."""
        self._expire(int(self._clock()))
        return (
            sum(b.commands for b in self._buckets),
            sum(b.timed for b in self._buckets),
            sum(b.total_ms for b in self._buckets),
        )

    def report(self) -> dict[str, Any]:
        """What a worker sends its master every PUBLISH_INTERVAL."""
        return {"op": "report", "counters": self.snapshot(), "window": self.window()}

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        commands, timed, total_ms = self.window()
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
            "KdfRuns": self.kdf_runs,
            "LoginsQueuedBehindFailing": self.logins_queued_behind_failing,
        }

    def publish(self, path: Path) -> None:
        write_counters(path, self.snapshot())


# What a worker's counters say now rather than in total: a worker that is gone has none.
GAUGES = frozenset(
    {
        "CurrentConnections",
        "OpenTasks",
        "VerificationsInFlight",
        "VerificationsWaiting",
        "CommandsPerSecond",
    }
)
# Not summed: who and when, and the averages made again from their parts.
_NOT_SUMMED = frozenset(
    {"Service", "ProcessId", "Updated", "SettingsRevision", "AverageCommandProcessingTimeMs"}
)


def _summable(key: str, value: object) -> bool:
    return (
        key not in _NOT_SUMMED
        and not key.startswith("Peak")
        and not key.endswith("LatencyMs")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    )


class SummedCounters:
    """The master's sum of its workers' reports."""

    def __init__(self, service: str, clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self._clock = clock
        self._reports: dict[int, dict[str, Any]] = {}  # worker ident -> its last report
        self._retired: dict[str, float] = {}  # the totals of workers that are gone
        self._retired_peaks: dict[str, float] = {}
        self.worker_deaths = 0  # workers that died unasked (the master replaced them)
        self.hung_workers = 0  # of them, those the master killed for their silence

    def take(self, worker: int, report: dict[str, Any]) -> None:
        self._reports[worker] = report

    def forget(self, worker: int) -> None:
        """The worker is gone: its totals stay, its gauges go."""
        report = self._reports.pop(worker, None)
        if report is None:
            return
        for key, value in report["counters"].items():
            if _summable(key, value) and key not in GAUGES:
                self._retired[key] = self._retired.get(key, 0) + value
            elif key.startswith("Peak"):
                self._retired_peaks[key] = max(self._retired_peaks.get(key, 0), value)

    def snapshot(self, worker_pids: list[int]) -> dict[str, Any]:
        reports = list(self._reports.values())
        merged: dict[str, Any] = {"Service": self.service}
        for key, value in self._retired.items():
            merged[key] = value
        merged.update(self._retired_peaks)
        revisions: list[int] = []
        latencies: dict[str, list[float]] = {}  # a mean of the workers that saw any
        for report in reports:
            for key, value in report["counters"].items():
                if _summable(key, value):
                    merged[key] = merged.get(key, 0) + value
                elif key.startswith("Peak"):
                    merged[key] = max(merged.get(key, 0), value)
                elif key.endswith("LatencyMs"):
                    samples = latencies.setdefault(key, [])
                    if value:
                        samples.append(float(value))
                elif key == "SettingsRevision":
                    revisions.append(int(value))
        timed = sum(int(r["window"][1]) for r in reports)
        total_ms = sum(float(r["window"][2]) for r in reports)
        if "CommandsPerSecond" in merged:
            merged["CommandsPerSecond"] = round(merged["CommandsPerSecond"], 3)
        for key, samples in latencies.items():
            merged[key] = round(sum(samples) / len(samples), 3) if samples else 0.0
        merged |= {
            "ProcessId": os.getpid(),
            "Updated": self._clock(),
            "AverageCommandProcessingTimeMs": round(total_ms / timed, 3) if timed else 0.0,
            # The revision every worker has applied: a change is in force once it shows.
            "SettingsRevision": min(revisions) if revisions else 0,
            "Workers": len(worker_pids),
            "WorkerDeaths": self.worker_deaths,
            "HungWorkersKilled": self.hung_workers,
            "WorkerProcessIds": sorted(worker_pids),
            # Which worker took how many connections: how evenly the kernel spreads them.
            "WorkerConnections": {
                str(r["counters"]["ProcessId"]): r["counters"].get("TotalConnections", 0)
                for r in reports
            },
        }
        return merged

    def publish(self, path: Path, worker_pids: list[int]) -> None:
        write_counters(path, self.snapshot(worker_pids))


def write_counters(path: Path, counters: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(counters))
    os.replace(temporary, path)


def read_counters(path: Path) -> dict[str, Any] | None:
    """The last published counters, or None when the service never published."""
    try:
        loaded = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return loaded if isinstance(loaded, dict) else None
