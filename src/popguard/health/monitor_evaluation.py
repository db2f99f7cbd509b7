"""Monitor evaluation: each monitor's rule applied to its probe's latest results, per
target resource, and its ladder walked as time passes (Degraded, Unhealthy,
Unrecoverable), even between results. Every change of state is written through to
the store, which is what a restarted engine starts from, and handed on to the
responders; a monitor back to Healthy resolves its alerts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from popguard.health.definitions import HealthSet, MonitorDefinition, ProbeDefinition
from popguard.health.engine_state import EngineState
from popguard.health.monitors import MONITOR_KINDS, Verdict, alert_value, ladder_state
from popguard.health.notifier import Notifier
from popguard.health.overrides import effective_monitor
from popguard.health.results import MonitorState, RecoveryAction

log = logging.getLogger("popguard.health")


@dataclass(frozen=True)
class MonitorRow:
    health_set: HealthSet
    monitor: MonitorDefinition
    state: MonitorState | None
    alert_value: str


class MonitorEvaluation:
    def __init__(
        self,
        shared: EngineState,
        notifier: Notifier,
        consider_responders: Callable[[MonitorState], None],
    ) -> None:
        self.server, self.directory = shared.server, shared.directory
        self.clock, self.store, self.plan = shared.clock, shared.store, shared.plan
        self.controls, self.notifier = shared.controls, notifier
        self.states = states = shared.states
        self._resources = shared.resources
        self._consider_responders = consider_responders
        self._lock = asyncio.Lock()  # one monitor evaluation at a time
        self._resources_of: dict[str, set[str]] = {}  # monitor -> resources with a state
        for monitor_key, resource in states:
            self._resources_of.setdefault(monitor_key, set()).add(resource)

    async def evaluate(self, health_set: HealthSet, probe: ProbeDefinition | None = None) -> None:
        """Apply the monitors that read `probe` (all of the set's, without one) to the
        probe's latest results, per target resource."""
        async with self._lock:
            now = self.clock.now()
            monitors = (
                health_set.monitors
                if probe is None
                else self.plan.monitors_of_probe.get((health_set.name, probe.name), [])
            )
            for monitor in monitors:
                identity = f"{health_set.name}\\{monitor.probe}"
                resources = self._resources.get(identity)
                if resources is None:
                    continue  # the probe has not run yet
                key = f"{health_set.name}\\{monitor.name}"
                effective, enabled = effective_monitor(monitor, key, self.controls.overrides)
                for resource in resources:
                    previous = self.states.get((key, resource))
                    self._evaluate_one(effective, enabled, key, identity, resource, previous, now)
                for resource in self._resources_of.get(key, set()) - set(resources):
                    # A database moved away: its monitor instance goes with it, unless
                    # this alert's own repair moved it, whose ladder goes on.
                    gone = self.states[(key, resource)]
                    if gone.is_alert and resource.lower() in self._owed_here():
                        continue
                    self.store.forget_monitor_state(key, resource)
                    del self.states[(key, resource)]
                    self._resources_of[key].discard(resource)

    def _evaluate_one(
        self,
        monitor: MonitorDefinition,
        enabled: bool,
        key: str,
        probe_identity: str,
        resource: str,
        previous: MonitorState | None,
        now: float,
    ) -> None:
        verdict = MONITOR_KINDS[monitor.kind](monitor, self.store, probe_identity, resource, now)
        if not enabled:  # a disabled monitor raises no alert and forgets the one it had
            verdict = Verdict(False, verdict.has_results, verdict.last, [])
        first_alert = previous.first_alert if previous and previous.is_alert else None
        if verdict.is_alert:
            first_alert = now if first_alert is None else first_alert
            state = ladder_state(monitor, first_alert, now)
        else:
            state, first_alert = "Healthy", None
        changed = previous is None or previous.state != state
        last = verdict.last
        error = next((r.error for r in verdict.failing if r.error), "") if verdict.is_alert else ""
        new = MonitorState(
            monitor=key,
            resource=resource,
            is_alert=verdict.is_alert,
            state=state,
            first_alert=first_alert,
            last_transition=now if changed else (previous.last_transition if previous else now),
            last_execution=last.ended if last else None,
            last_result=last.result_type if last else "",
            error=error,
        )
        if new != previous:
            if changed:
                log.warning("%s on %s: %s -> %s %s", key, resource,
                            previous.state if previous else "none", state, error)  # fmt: skip
            self._save(new)
            if previous is not None and previous.is_alert and not new.is_alert:
                self._recovered(previous)

    def walk_alerting(self) -> None:
        """Move alerting monitors up their ladders as time passes (no new result needed)."""
        now = self.clock.now()
        for (key, _), state in list(self.states.items()):
            if not state.is_alert or state.first_alert is None:
                continue
            monitor = self.plan.monitor_by_key.get(key)
            if monitor is None:
                continue
            if not self.controls.enabled(key):  # disabled meanwhile: the alert ends, no step fires
                self._save(replace(state, is_alert=False, state="Healthy", first_alert=None,
                                   last_transition=now, error=""))  # fmt: skip
                self._recovered(state)
                continue
            step = ladder_state(monitor, state.first_alert, now)
            if step != state.state:
                log.warning("%s on %s: %s -> %s", key, state.resource, state.state, step)
                self._save(replace(state, state=step, last_transition=now))
            else:  # a responder whose `after` has come, within the same step
                self._consider_responders(state)

    def _save(self, state: MonitorState) -> None:
        self.store.save_monitor_state(state)
        self.states[(state.monitor, state.resource)] = state
        self._resources_of.setdefault(state.monitor, set()).add(state.resource)
        self._consider_responders(state)

    def _recovered(self, previous: MonitorState) -> None:
        """A monitor back to Healthy: its alerts are resolved, and a front end its
        responders took out of service comes back (databases come back through
        the owed databases' bookkeeping, once the whole server is healthy)."""
        if previous.first_alert is None:
            return
        self.notifier.resolved(previous.monitor, previous.resource)
        taken = [
            a for a in self.store.actions(since=previous.first_alert)
            if a.monitor == previous.monitor and a.resource == previous.resource
            and a.kind == "take-offline" and a.result == "Succeeded"
        ]  # fmt: skip
        if not taken:
            return
        now = self.clock.now()
        self.directory.set_component_state(self.server.name, "PopProxy", "Active", "HealthApi")
        self.store.add_action(
            RecoveryAction(
                taken[-1].responder,
                previous.monitor,
                previous.resource,
                "bring-online",
                previous.first_alert,
                now,
                now,
                "Succeeded",
                f"{previous.monitor} is Healthy again: PopProxy on "
                f"{self.server.name} Active (HealthApi)",
            )
        )
        log.warning("%s Healthy again: PopProxy on %s Active", previous.monitor, self.server.name)

    def rows(self) -> list[MonitorRow]:
        states = self.states
        rows = []
        for health_set in self.plan.health_sets:
            for monitor in self.plan.monitors(health_set):
                key = f"{health_set.name}\\{monitor.name}"
                found: list[MonitorState | None] = [
                    s for (name, _), s in states.items() if name == key
                ]
                _, enabled = effective_monitor(monitor, key, self.controls.overrides)
                repairing = key.lower() in self.controls.repairing
                for state in found or [None]:
                    value = alert_value(
                        state.state if state else "Healthy",
                        bool(state and state.last_result),
                        disabled=not enabled,
                        repairing=repairing,
                    )
                    rows.append(MonitorRow(health_set, monitor, state, value))
        return rows

    def _owed_here(self) -> set[str]:
        return {database.lower() for database in self.store.owed()}
