"""The health engine of one server: the wiring of its parts, and what the API, the
command line and the tests ask of it.

What runs here (server_plan) is fixed at start; probe runs (probe_runs) store
results and have the monitors evaluated (monitor_evaluation), whose changes of
state go to the responders (responder_firing); databases moved away come back
through owed_databases. The engine owns the state those parts share (the monitor
states, each probe's current targets) and is the RepairContext the responders get.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3

from popguard.directory.directory import Server
from popguard.errors import UserError
from popguard.health.clock import Clock, sleep_unless_stopped
from popguard.health.controls import Controls
from popguard.health.definitions import HealthSet, MonitorDefinition, ProbeDefinition
from popguard.health.diagnosis import undo_interrupted
from popguard.health.engine_state import EngineState
from popguard.health.failover_decisions import FailoverDecisions
from popguard.health.health_mailboxes import ensure_health_mailboxes
from popguard.health.health_set_changes import HealthSetChanges, worst
from popguard.health.incidents import Incident, Recheck
from popguard.health.monitor_evaluation import MonitorEvaluation, MonitorRow
from popguard.health.monitors import still_fails
from popguard.health.notifier import Notifier
from popguard.health.owed_databases import OwedDatabases
from popguard.health.probe_runs import ProbeRuns
from popguard.health.probes import Credential, ProbeTarget
from popguard.health.responder_firing import ResponderFiring
from popguard.health.results import RETENTION, Alert, ProbeResult, ResultsStore
from popguard.health.server_plan import ServerPlan
from popguard.health.worker_repairs import WorkerRepairs
from popguard.services.context import ServerContext

log = logging.getLogger("popguard.health")


class HealthEngine:
    def __init__(self, context: ServerContext, clock: Clock, health_sets: list[HealthSet]) -> None:
        """The engine owns `context` from here on and closes it."""
        self.context = context
        self.data = data = context.data
        self.folder = context.folder
        self.tls = context.tls
        self.clock = clock
        self.directory = context.directory
        self.server: Server = context.server
        self.plan = ServerPlan(self.server, health_sets)
        self.health_sets = self.plan.health_sets
        self.store = ResultsStore(context.folder.results_file())
        tls_context = context.tls.client_context()
        self.controls = Controls(data, self.server, self.directory, clock, self.plan)
        self.shared = EngineState(
            context, clock, self.store, self.plan, self.controls, self.store.monitor_states()
        )
        self._states = self.shared.states
        self.firing = ResponderFiring(self.shared, self)
        self._finish_interrupted()
        self.notifier = Notifier(
            data, self.server.name, self.directory, self.store, clock, self.plan.runbook_of
        )
        self.failovers = FailoverDecisions(context.folder, self.store, self.notifier)
        self.hung_workers = WorkerRepairs(context.folder, self.store)
        self.monitoring = MonitorEvaluation(self.shared, self.notifier, self.firing.consider)
        self.set_changes = HealthSetChanges(
            self.store, clock, self.health_sets, self.monitoring.rows
        )
        self.runs = ProbeRuns(self.shared, tls_context, self.evaluate)
        self.owed = OwedDatabases(self.shared, self.runs, self.firing.spawn, self)

    def _finish_interrupted(self) -> None:
        """Actions a stopped health service left InProgress (a restart-server stops it on
        purpose) end now, so that the history and the throttles are right."""
        now = self.clock.now()
        undone = ""
        with contextlib.suppress(UserError, sqlite3.Error, OSError):
            if undo_interrupted(self):
                undone = "; protocol logging it had turned on is off again"
        for action in self.store.actions(since=now - 86_400):
            if action.result == "InProgress":
                self.store.finish_action(
                    action.id, now, "Failed",
                    f"interrupted: the health service stopped meanwhile{undone}",
                )  # fmt: skip

    def refresh_controls(self, force: bool = False) -> None:
        self.controls.refresh(force)

    def close(self) -> None:
        self.store.close()
        self.context.close()

    # What runs here ------------------------------------------------------------------

    def probes(self) -> list[tuple[HealthSet, ProbeDefinition]]:
        return self.plan.probes()

    def monitors(self, health_set: HealthSet) -> list[MonitorDefinition]:
        return self.plan.monitors(health_set)

    def find_probe(self, identity: str) -> tuple[HealthSet, ProbeDefinition, str | None]:
        return self.plan.find_probe(identity)

    def targets(self, probe: ProbeDefinition) -> list[ProbeTarget]:
        return self.runs.targets(probe)

    # Probes and monitors ---------------------------------------------------------------

    async def run_now(
        self, health_set: HealthSet, probe: ProbeDefinition, resource: str | None = None
    ) -> list[ProbeResult]:
        return await self.runs.run_now(health_set, probe, resource)

    async def evaluate(self, health_set: HealthSet, probe: ProbeDefinition | None = None) -> None:
        await self.monitoring.evaluate(health_set, probe)
        self.set_changes.note()

    def _walk_alerting(self) -> None:
        self.monitoring.walk_alerting()

    def monitor_rows(self) -> list[MonitorRow]:
        self.refresh_controls(force=True)  # an override just added shows at once
        return self.monitoring.rows()

    @staticmethod
    def worst(values: list[str]) -> str:
        return worst(values)

    async def settle(self) -> None:
        """Wait for the responders and the sends under way to finish."""
        while self.firing.tasks:
            await asyncio.gather(*self.firing.tasks, return_exceptions=True)
        await self.notifier.settle()

    # What the responders ask (RepairContext) -------------------------------------------

    @property
    def moves_lock(self) -> asyncio.Lock:
        return self.owed.moves_lock

    def escalated(self, incident: Incident, component: str, error: str, detail: str) -> str:
        """Store the alert and hand it to the notifier; says what became of it."""
        log.error("%s", detail)
        alert = Alert(
            self.clock.now(), incident.health_set, incident.monitor, incident.probe,
            incident.resource, component, error, detail, incident.first_alert,
        )  # fmt: skip
        return self.notifier.raised(alert)

    async def check_again(self, incident: Incident) -> Recheck:
        """Run the incident's probe once more against its resource (stored, monitors
        updated) and judge it by the monitor's rule (a counter read fine but still above
        its threshold still fails). Without a target here now (a database moved away),
        nothing runs."""
        health_set, probe, _ = self.find_probe(f"{incident.health_set}\\{incident.probe}")
        if not any(t.resource.lower() == incident.resource.lower() for t in self.targets(probe)):
            return Recheck(None, None)
        (result,) = await self.run_now(health_set, probe, incident.resource)
        monitor = self.plan.monitor_by_key[f"{incident.health_set}\\{incident.monitor}"]
        return Recheck(result, still_fails(monitor, result, self.store, self.clock.now()))

    def latest_result(self, incident: Incident) -> ProbeResult | None:
        found = self.store.recent(f"{incident.health_set}\\{incident.probe}", incident.resource, 1)
        return found[0] if found else None

    async def server_problems(self, ladder_step: bool = True) -> list[str]:
        return await self.owed.server_problems(ladder_step)

    async def databases_fail_here(self, databases: list[str]) -> list[str]:
        return await self.owed.databases_fail_here(databases)

    # Running -------------------------------------------------------------------------------

    def walk(self) -> None:
        """What passing time does: ladders step up, responders whose time came start,
        open alerts are sent again or resolved."""
        self.refresh_controls()
        self.monitoring.walk_alerting()
        self.set_changes.note()
        self.notifier.check(self._states)
        self.hung_workers.take_new()
        if "mailbox" in self.server.roles:
            self.owed.settle()
            self.failovers.take_new()

    async def _walk_ladders(self, stop: asyncio.Event) -> None:
        """Ladders move with time even between probe results."""
        while not stop.is_set():
            try:
                self.walk()
            except Exception:
                log.exception("walking the ladders failed")
            await sleep_unless_stopped(self.clock, 1.0, stop)

    async def _prune(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                self.store.prune(self.clock.now() - RETENTION)
            with contextlib.suppress(Exception):  # group throttles look one day back
                self.directory.prune_repairs(self.server.name, self.clock.now() - 2 * 86_400)
            await sleep_unless_stopped(self.clock, 3600.0, stop)

    def ensure_health_mailboxes(self) -> dict[str, Credential]:
        return ensure_health_mailboxes(self.directory, self.data)

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self.runs.schedule(s, p, stop)) for s, p in self.probes()]
        tasks.append(asyncio.create_task(self._walk_ladders(stop)))
        tasks.append(asyncio.create_task(self._prune(stop)))
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            dead = [t for t in done if t is not stopper]
            if dead:
                # Exit (the supervisor starts a fresh engine) rather than serve stale states.
                error = dead[0].exception() if not dead[0].cancelled() else None
                raise RuntimeError(f"a health engine task ended: {error!r}")
        finally:
            stopper.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in list(self.firing.tasks):
                task.cancel()
            self.notifier.cancel()
            await asyncio.gather(*self.firing.tasks, return_exceptions=True)
