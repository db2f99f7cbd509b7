"""The databases owed back: those a responder moved away from this mailbox server go
back once it is healthy, looked at every OWED_CHECK seconds, one move back at a
time, not before a failed try's hold ends. Healthy here means every service runs,
no monitor alerts about what is still here, and the server's own probes succeed;
each database back is checked at once by its probes (the moves themselves are
server_repairs.return_databases')."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from popguard.control.service_control import control_for, services_of
from popguard.errors import UserError
from popguard.health.engine_state import EngineState
from popguard.health.probe_runs import ProbeRuns
from popguard.health.repair_context import RepairContext
from popguard.health.results import RecoveryAction
from popguard.health.server_repairs import return_databases

log = logging.getLogger("popguard.health")

OWED_CHECK = 30.0  # seconds between two looks at databases owed back to this server


class OwedDatabases:
    def __init__(
        self,
        shared: EngineState,
        runs: ProbeRuns,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        context: RepairContext,
    ) -> None:
        self.data, self.server, self.clock = shared.data, shared.server, shared.clock
        self.store, self.plan, self.runs, self.context = shared.store, shared.plan, runs, context
        self._states = shared.states
        self._spawn = spawn
        # Moves of this server's databases, by any monitor's step, one at a time.
        self.moves_lock = asyncio.Lock()
        self._moving_back = False
        self._checked = -1e18

    def settle(self) -> None:
        """Databases a responder moved away go back once this server is healthy: checked
        every OWED_CHECK seconds, one move back at a time, not before a failed try's hold
        ends. An operator who allowed activation again took the matter over."""
        now = self.clock.now()
        if self._moving_back or now - self._checked < OWED_CHECK:
            return
        self._checked = now
        owed = self.store.owed()
        if not owed or all(until > now for until in owed.values()):
            return
        self._moving_back = True
        self._spawn(self._move_back())

    async def _move_back(self) -> None:
        try:
            outcome = await return_databases(self.context, ladder_step=False)
        finally:
            self._moving_back = False
        if outcome is None:
            return
        now = self.clock.now()
        self.store.add_action(
            RecoveryAction("popguard\\MoveBackWhenHealthy", "", "", "move-back", now, now, now,
                           outcome.result, outcome.detail)
        )  # fmt: skip
        log.warning("moving back: %s: %s", outcome.result, outcome.detail)

    def _owed_here(self) -> set[str]:
        return {database.lower() for database in self.store.owed()}

    async def server_problems(self, ladder_step: bool = True) -> list[str]:
        """Why this server is not healthy now: a service not running, a monitor alerting
        about something still here, or one of its own probes (not per database, not the
        watched external servers) failing when run now. Outside a ladder's own step, a
        ladder still climbing for a database moved away counts too: it owns the move."""
        problems: list[str] = []
        try:
            control = control_for(self.data)
            statuses = await asyncio.to_thread(
                control.status, self.server.name, services_of(self.server.roles)
            )
            problems += [f"{s.service} is {s.state}" for s in statuses if s.state != "Running"]
        except UserError as exc:
            problems.append(str(exc))
        owed = self._owed_here()
        problems += [
            f"{state.monitor} on {state.resource} is {state.state}"
            for state in self._states.values()
            if state.is_alert
            and (
                state.resource.lower() not in owed
                or (not ladder_step and state.state != "Unrecoverable")
            )
        ]
        for health_set, probe in self.plan.probes():
            if probe.kind == "counter" or probe.per_database:
                continue
            for target in self.runs.own_targets(probe):
                result = await self.runs.run_probe(health_set, probe, target)
                self.store.add(result)
                if not result.succeeded:
                    problems.append(f"{result.probe} {result.failure_component}: {result.error}")
        return problems

    async def databases_fail_here(self, databases: list[str]) -> list[str]:
        """Run every per-database probe of this server for these databases now: what
        fails (a database moved back onto a server that cannot serve it)."""
        failures = []
        for health_set, probe in self.plan.probes():
            if not probe.per_database:
                continue
            for target in self.runs.own_targets(probe):
                if target.resource.lower() in {d.lower() for d in databases}:
                    result = await self.runs.run_probe(health_set, probe, target)
                    self.store.add(result)
                    if not result.succeeded:
                        failures.append(
                            f"{target.resource}: {result.probe} {result.failure_component} "
                            f"{result.error}"
                        )
        return failures
