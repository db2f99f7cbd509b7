"""The health sets' changes the engine records (health/health_set_changes.py): every
step, in order, kept across a restart of the health service, in a real results store."""

from __future__ import annotations

from pathlib import Path

from popguard.health.definitions import HealthSet
from popguard.health.health_set_changes import HealthSetChanges, worst
from popguard.health.loader import shipped_health_sets
from popguard.health.monitor_evaluation import MonitorRow
from popguard.health.results import ResultsStore


class SteppedClock:
    """A second passes at each look: the changes' times must follow their order."""

    def __init__(self) -> None:
        self.at = 1_000.0

    def now(self) -> float:
        self.at += 1.0
        return self.at

    async def sleep(self, seconds: float) -> None:
        self.at += seconds


def rows_saying(health_set: HealthSet, values: dict[str, str]) -> list[MonitorRow]:
    return [
        MonitorRow(health_set, monitor, None, values.get(monitor.name, "Healthy"))
        for monitor in health_set.monitors
    ]


def test_each_step_is_recorded_once_and_survives_a_restart(tmp_path: Path) -> None:
    (protocol,) = [s for s in shipped_health_sets() if s.name == "POP.Protocol"]
    store = ResultsStore(tmp_path / "results.sqlite")
    now: dict[str, str] = {}
    changes = HealthSetChanges(store, SteppedClock(), [protocol],
                               lambda: rows_saying(protocol, now))  # fmt: skip
    assert changes.note() == []  # where it starts is no change
    for step in ("Degraded", "Unhealthy", "Unhealthy", "Healthy"):
        now["PopSelfTestMonitor"] = step
        changes.note()
    recorded = store.health_set_changes()
    assert [(c.was, c.now) for c in recorded] == [
        ("Healthy", "Degraded"),
        ("Degraded", "Unhealthy"),
        ("Unhealthy", "Healthy"),
    ]
    assert [c.at for c in recorded] == sorted(c.at for c in recorded)
    assert store.health_set_changes(after=recorded[1].id) == recorded[2:]
    # Another monitor of the set alerting makes the set's value the worse of the two.
    now["PopDeepTestMonitor"] = "Degraded"
    now["PopSelfTestMonitor"] = "Unhealthy"
    changes.note()
    assert store.health_set_changes()[-1].now == "Unhealthy"
    store.close()
    # A new run of the health service goes on from the last recorded value: a state
    # reached while it was down is one change, not a silent new start.
    store = ResultsStore(tmp_path / "results.sqlite")
    now.clear()
    restarted = HealthSetChanges(store, SteppedClock(), [protocol],
                                 lambda: rows_saying(protocol, now))  # fmt: skip
    (change,) = restarted.note()
    assert (change.was, change.now) == ("Unhealthy", "Healthy")
    store.close()


def test_the_worst_value_wins() -> None:
    assert worst([]) == "Healthy"
    assert worst(["Healthy", "Disabled", "Degraded", "Repairing"]) == "Degraded"
    assert worst(["Degraded", "Unhealthy"]) == "Unhealthy"
