"""Firing responders: each step of an alerting monitor's ladder starts once per alert
when the alert reaches it, one step at a time per monitor and resource, unless it
would not help here or its throttle (per server, and across the servers of its role)
forbids; every decision is stored as a recovery action. What a step does is its
kind's business (responders.py); this decides whether and when it runs."""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
from collections.abc import Coroutine
from typing import Any

from popguard.directory.sql.engine import DIRECTORY_ERRORS
from popguard.errors import UserError
from popguard.health.definitions import HealthSet, MonitorDefinition, ResponderDefinition
from popguard.health.engine_state import EngineState
from popguard.health.incidents import Incident, Outcome
from popguard.health.repair_context import RepairContext
from popguard.health.responders import RESPONDER_KINDS
from popguard.health.results import MonitorState, RecoveryAction
from popguard.health.server_plan import LADDER_ORDER

log = logging.getLogger("popguard.health")

# Repairs counted across the servers of a role (restarting or emptying a server).
GROUP_COUNTED = ("restart-server", "move-databases-away")
REPAIR_SETTLE = 900.0  # a server repaired this recently is not counted as in service


class ResponderFiring:
    def __init__(self, shared: EngineState, context: RepairContext) -> None:
        self.server, self.directory = shared.server, shared.directory
        self.clock, self.store, self.plan = shared.clock, shared.store, shared.plan
        self.controls, self.context = shared.controls, context
        self._resources = shared.resources
        self._states = states = shared.states
        store = shared.store
        # (responder, resource, first alert): fired once per alert, across restarts too,
        # however long ago the alert began.
        open_alerts = {s.first_alert for s in states.values() if s.is_alert}
        self._fired = {
            (a.responder, a.resource, a.alert_started)
            for a in store.actions(since=min(filter(None, open_alerts), default=0.0))
            if a.alert_started in open_alerts
        }
        self.tasks: set[asyncio.Task[None]] = set()  # the steps and repairs under way
        self._busy: set[tuple[str, str]] = set()  # (monitor, resource) with a step under way
        # (monitor, resource, first alert) whose last step did not help: the next step
        # that may hurry fires without waiting for its time.
        self._not_helped: set[tuple[str, str, float]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a repair in the background, among the tasks the engine waits for."""

        async def run() -> None:
            try:
                await work
            except Exception:  # logged; the engine goes on
                log.exception("a background repair failed")

        task = asyncio.create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def consider(self, state: MonitorState) -> None:
        """Start each responder whose ladder step this alert has reached, once per alert."""
        if (
            not state.is_alert
            or state.first_alert is None
            or not self.controls.enabled(state.monitor)
        ):
            return
        for health_set, responder in self.plan.responders_of.get(state.monitor, []):
            if LADDER_ORDER[state.state] < LADDER_ORDER[responder.state]:
                continue
            identity = f"{health_set.name}\\{responder.name}"
            fired = (identity, state.resource, state.first_alert)
            if fired in self._fired:
                continue
            alert = (state.monitor, state.resource, state.first_alert)
            hurried = responder.hurry and alert in self._not_helped
            if self.clock.now() - state.first_alert < responder.after and not hurried:
                continue
            # One step at a time, in the ladder's order: the next waits for this one
            # (a move of several databases may outlast the gap to the next step).
            busy = (state.monitor, state.resource)
            if busy in self._busy:
                return
            self._fired.add(fired)
            self._not_helped.discard(alert)
            self._busy.add(busy)
            task = asyncio.create_task(self._respond(health_set, responder, state))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            task.add_done_callback(functools.partial(self._step_done, busy))
            return

    def _step_done(self, busy: tuple[str, str], task: asyncio.Task[None]) -> None:
        self._busy.discard(busy)
        # A step that did not help lets the next one hurry: look again now, not at
        # the monitor's next result.
        for state in [s for s in self._states.values() if (s.monitor, s.resource) == busy]:
            self.consider(state)

    def _handed_to(self, resource: str) -> str:
        """Who repairs a failure that lies beyond this server: for a database seen
        through a front end, the mailbox server holding its active copy."""
        try:
            holder = self.directory.active_server(resource)
        except (UserError, sqlite3.Error):
            return "left to the responders of that part and to escalation"
        if holder.lower() == self.server.name.lower():
            return "left to the responders of that part and to escalation"
        return (
            f"{resource} is active on {holder}: left to {holder}'s POP.Protocol responders "
            "and to escalation"
        )

    def _throttled(self, responder: ResponderDefinition, state: MonitorState, now: float) -> str:
        """Why this responder may not act now on this server ('' if it may). A repair is
        counted per kind and service, so two monitors cannot restart one service twice
        as often; an escalation per problem, so one does not silence another."""

        def same(a: RecoveryAction) -> bool:
            if responder.kind == "escalate":
                return (a.kind, a.monitor, a.resource) == ("escalate", state.monitor,
                                                             state.resource)  # fmt: skip
            return (a.kind, self.plan.service_of.get(a.responder)) == (
                responder.kind, responder.service
            )  # fmt: skip

        past = [
            a for a in self.store.actions(since=now - 86_400)
            if a.result in ("Succeeded", "Failed", "InProgress") and same(a)
        ]  # fmt: skip
        limit = responder.throttle
        if past and now - past[-1].started < limit.min_gap:
            ago = now - past[-1].started
            return f"the last {responder.kind} was {ago:.0f}s ago (gap {limit.min_gap:g}s)"
        if len([a for a in past if a.started >= now - 3600]) >= limit.per_hour:
            return f"{limit.per_hour} {responder.kind} actions in the last hour already"
        if len(past) >= limit.per_day:
            return f"{limit.per_day} {responder.kind} actions in the last day already"
        return self._group_throttled(responder, now)

    def _group_throttled(self, responder: ResponderDefinition, now: float) -> str:
        limit = responder.throttle
        if limit.group_per_day is None and not limit.min_in_service:
            return ""
        role = self._role_of(responder)
        try:
            repairs = self.directory.repairs_since(role, now - 86_400)
            servers = self.directory.list_servers()
        except DIRECTORY_ERRORS as exc:  # cannot count: do not act blind
            return f"the group's repairs cannot be read: {exc}"
        service = responder.service or ""
        same = [r for r in repairs if (r[1], r[2]) == (responder.kind, service)]
        if limit.group_per_day is not None and len(same) >= limit.group_per_day:
            return (
                f"{len(same)} {responder.kind} actions on {role} servers in the last day "
                f"already (group limit {limit.group_per_day})"
            )
        if limit.min_in_service:
            others = {
                s.name for s in servers
                if role in s.roles and s.name.lower() != self.server.name.lower()
                and not (role == "mailbox" and s.activation_disabled)
            }  # fmt: skip
            busy = {r[0] for r in repairs if r[3] >= now - REPAIR_SETTLE}
            in_service = sorted(others - busy)
            if len(in_service) < limit.min_in_service:
                return (
                    f"only {len(in_service)} other {role} server(s) in service "
                    f"({', '.join(in_service) or 'none'}); {limit.min_in_service} must be"
                )
        return ""

    def _role_of(self, responder: ResponderDefinition) -> str:
        if responder.role is not None:
            return responder.role
        return "mailbox" if "mailbox" in self.server.roles else "frontend"

    async def _respond(
        self, health_set: HealthSet, responder: ResponderDefinition, state: MonitorState
    ) -> None:
        try:
            await self._respond_once(health_set, responder, state)
        except Exception:  # a step must never take the engine down; it is logged
            log.exception("%s\\%s on %s failed", health_set.name, responder.name, state.resource)

    async def _respond_once(
        self, health_set: HealthSet, responder: ResponderDefinition, state: MonitorState
    ) -> None:
        identity = f"{health_set.name}\\{responder.name}"
        monitor_name = state.monitor.split("\\", 1)[1]
        monitor = self.plan.monitor_by_key[state.monitor]
        incident = Incident(health_set.name, monitor_name, monitor.probe, state.resource,
                            state.first_alert or self.clock.now(), state.error)  # fmt: skip
        now = self.clock.now()

        def record(result: str, detail: str, ended: float | None) -> int:
            return self.store.add_action(
                RecoveryAction(
                    identity,
                    state.monitor,
                    state.resource,
                    responder.kind,
                    incident.first_alert,
                    now,
                    ended,
                    result,
                    detail,
                )
            )

        why_not = self._not_here(health_set, responder, monitor, state)
        if why_not:
            record("Skipped", why_not, now)
            return
        throttled = self._throttled(responder, state, now)
        if throttled:
            log.warning("%s throttled on %s: %s", identity, state.resource, throttled)
            record("Throttled", throttled, now)
            return
        log.warning("%s: %s on %s (%s)", identity, responder.kind, state.resource, state.error)
        action = record("InProgress", "", None)
        try:
            outcome = await RESPONDER_KINDS[responder.kind](self.context, responder, incident)
        except Exception as exc:
            log.exception("%s failed", identity)
            outcome = Outcome("Failed", f"{responder.kind} crashed: {exc!r}")
        self.store.finish_action(action, self.clock.now(), outcome.result, outcome.detail)
        log.warning("%s: %s: %s", identity, outcome.result, outcome.detail)
        if outcome.still_fails:
            self._not_helped.add((state.monitor, state.resource, incident.first_alert))
        if responder.kind in GROUP_COUNTED and outcome.result in ("Succeeded", "Failed"):
            try:
                role = self._role_of(responder)
                service = responder.service or ""
                self.directory.record_repair(self.server.name, role, responder.kind, service, now)
            except DIRECTORY_ERRORS as exc:
                log.warning("recording the repair in the directory failed: %s", exc)

    def _not_here(
        self,
        health_set: HealthSet,
        responder: ResponderDefinition,
        monitor: MonitorDefinition,
        state: MonitorState,
    ) -> str:
        """Why this step would not help here ('' if it may): the failure lies elsewhere,
        an operator is on it, or (on a front end) other databases work through it."""
        probe_identity = f"{health_set.name}\\{monitor.probe}"
        latest = self.store.recent(probe_identity, state.resource, 1)
        component = latest[0].failure_component if latest else ""
        if component and component in responder.skip_components:
            return (
                f"the failure is in {component}: {responder.kind} here would not help; "
                f"{self._handed_to(state.resource)}"
            )
        if state.monitor.lower() in self.controls.repairing:
            return "an operator marked the monitor Repairing"
        probe = self.plan.probe_by_key.get(probe_identity)
        if (
            "frontend" in self.server.roles
            and probe is not None
            and probe.per_database
            and responder.kind in ("restart-service", "restart-server")
        ):
            working = sorted(
                resource
                for resource in self._resources.get(probe_identity, [])
                if resource != state.resource
                and (found := self.store.recent(probe_identity, resource, 1))
                and found[0].succeeded
            )
            if working:
                return (
                    f"{', '.join(working)} work(s) through {self.server.name}: the front end is "
                    f"fine; {self._handed_to(state.resource)}"
                )
        return ""
