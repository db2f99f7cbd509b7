"""Each change of a health set's AlertValue on this server, recorded when it happens.

The health report tells where each set stands now; whoever looks at it every few
seconds (the web page's watcher) misses a state shorter than that: a hang found
Unhealthy and mended by its restart two seconds later. The engine notes the sets'
values after every evaluation and every walk of the ladders, and stores each change
(results store), so the feed shows every step in its order and with its time.
"""

from __future__ import annotations

from collections.abc import Callable

from popguard.health.clock import Clock
from popguard.health.definitions import HealthSet
from popguard.health.monitor_evaluation import MonitorRow
from popguard.health.monitors import SEVERITY
from popguard.health.results import HealthSetChange, ResultsStore


def worst(values: list[str]) -> str:
    """A health set's AlertValue: the worst of its monitors' (Healthy without any)."""
    return max(values, key=lambda v: SEVERITY.get(v, 0), default="Healthy")


class HealthSetChanges:
    def __init__(
        self,
        store: ResultsStore,
        clock: Clock,
        health_sets: list[HealthSet],
        rows: Callable[[], list[MonitorRow]],
    ) -> None:
        self._store = store
        self._clock = clock
        self._health_sets = health_sets
        self._rows = rows
        # Where the last run left each set: a change while the service was down (an
        # alert resolved, an override ended) is one change at the next look.
        self._values = store.last_health_set_values()

    def note(self) -> list[HealthSetChange]:
        """Store and return the sets whose value differs from the last one noted. A set
        never noted before (a new server, a new set) starts where it is, unrecorded."""
        rows = self._rows()
        now = self._clock.now()
        changes = []
        for health_set in self._health_sets:
            value = worst([r.alert_value for r in rows if r.health_set is health_set])
            was = self._values.get(health_set.name)
            self._values[health_set.name] = value
            if was is not None and was != value:
                change = HealthSetChange(health_set.name, was, value, now)
                changes.append(change)
                self._store.add_health_set_change(change)
        return changes
