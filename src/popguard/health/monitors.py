"""Monitor kinds: rules over a probe's recent results, registered in one table.

A rule says whether the monitor is alerting now; the ladder then says how bad,
by how long ago the alert began: Degraded at once, Unhealthy and Unrecoverable
later. A monitor's AlertValue, as get-serverhealth shows it, is one of Healthy,
Degraded, Unhealthy (Unrecoverable shows as Unhealthy), Repairing, Disabled or
Unknown (no result yet).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from popguard.health.definitions import MonitorDefinition
from popguard.health.results import ProbeResult, ResultsStore

ALERT_VALUES = ("Healthy", "Degraded", "Unhealthy", "Repairing", "Disabled", "Unknown")
# How bad each value is, for "a health set is as bad as its worst monitor".
SEVERITY = {"Healthy": 0, "Disabled": 0, "Unknown": 1, "Repairing": 2, "Degraded": 3,
            "Unhealthy": 4}  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    is_alert: bool
    has_results: bool
    last: ProbeResult | None
    failing: list[ProbeResult]


Rule = Callable[[MonitorDefinition, ResultsStore, str, str, float], Verdict]


def consecutive_failures(
    monitor: MonitorDefinition, store: ResultsStore, probe: str, resource: str, now: float
) -> Verdict:
    """Alert when the last `threshold` results all failed."""
    needed = max(1, math.ceil(monitor.threshold))
    recent = store.recent(probe, resource, needed)
    failing = [r for r in recent if not r.succeeded]
    alert = len(recent) == needed and len(failing) == needed
    return Verdict(alert, bool(recent), recent[0] if recent else None, failing)


def failures_in_window(
    monitor: MonitorDefinition, store: ResultsStore, probe: str, resource: str, now: float
) -> Verdict:
    """Alert when at least `threshold` results in the last `window` seconds failed
    and the newest did too (one success ends the alert)."""
    assert monitor.window is not None
    recent = store.recent(probe, resource, 10_000, since=now - monitor.window)
    failing = [r for r in recent if not r.succeeded]
    alert = len(failing) >= monitor.threshold and bool(recent) and not recent[0].succeeded
    return Verdict(
        alert, bool(store.recent(probe, resource, 1)), recent[0] if recent else None, failing
    )


def sample_above(
    monitor: MonitorDefinition, store: ResultsStore, probe: str, resource: str, now: float
) -> Verdict:
    """Alert when the last `samples` readings are all above `threshold`."""
    recent = [r for r in store.recent(probe, resource, monitor.samples * 4) if r.succeeded]
    window = recent[: monitor.samples]
    above = [r for r in window if r.sample_value is not None and r.sample_value > monitor.threshold]
    alert = len(window) == monitor.samples and len(above) == monitor.samples
    return Verdict(alert, bool(recent), recent[0] if recent else None, above)


# Seconds of clock and polling slack around popguard's own restart of a service.
RESTART_TOLERANCE = 3.0


def exits_in_window(
    monitor: MonitorDefinition, store: ResultsStore, probe: str, resource: str, now: float
) -> Verdict:
    """Alert when the process exited without its supervisor asking (a crash: the sample is
    the supervisor's count of such exits) at least `threshold` times in the last `window`
    seconds: a crash loop the supervisor hides by starting it again. A stop and start an
    operator asked for is no such exit, so it never counts."""
    assert monitor.window is not None
    recent = store.recent(probe, resource, 10_000, since=now - monitor.window)
    readings = [r for r in reversed(recent) if r.succeeded and r.sample_value is not None]
    # popguard's own repair may kill a hung process (an exit the supervisor did not ask
    # for): that one is known, recorded and throttled, so it is not a crash either.
    restarted = [
        a.started for a in store.actions(since=now - monitor.window - 60)
        if a.kind in ("restart-service", "restart-server")
        and a.result in ("Succeeded", "Failed", "InProgress")
    ]  # fmt: skip
    crashes: list[ProbeResult] = []
    for earlier, later in itertools.pairwise(readings):
        assert earlier.sample_value is not None and later.sample_value is not None
        # A count that went down was kept by a supervisor that started afresh.
        new = int(later.sample_value - earlier.sample_value)
        if new > 0 and not any(
            earlier.started - RESTART_TOLERANCE <= at <= later.started for at in restarted
        ):
            crashes += [later] * new
    alert = len(crashes) >= monitor.threshold
    return Verdict(alert, bool(recent), recent[0] if recent else None, crashes)


def still_fails(
    monitor: MonitorDefinition, result: ProbeResult, store: ResultsStore, now: float
) -> bool:
    """Whether one fresh result, run to check that a problem still exists, shows it: a
    failure, or for a sample monitor a reading above the threshold. One reading says
    nothing of a crash loop: that rule is asked again over its window."""
    if monitor.kind == "exits-in-window":
        return exits_in_window(monitor, store, result.probe, result.resource, now).is_alert
    if not result.succeeded:
        return True
    if monitor.kind == "sample-above":
        return result.sample_value is not None and result.sample_value > monitor.threshold
    return False


MONITOR_KINDS: dict[str, Rule] = {
    "consecutive-failures": consecutive_failures,
    "failures-in-window": failures_in_window,
    "sample-above": sample_above,
    "exits-in-window": exits_in_window,
}


def ladder_state(monitor: MonitorDefinition, first_alert: float, now: float) -> str:
    state = monitor.ladder[0].state
    for step in monitor.ladder:
        if now - first_alert >= step.after:
            state = step.state
    return state


def alert_value(
    state: str, has_results: bool, disabled: bool = False, repairing: bool = False
) -> str:
    if disabled:
        return "Disabled"
    if repairing and state != "Healthy":
        return "Repairing"
    if not has_results:
        return "Unknown"
    return "Unhealthy" if state == "Unrecoverable" else state
