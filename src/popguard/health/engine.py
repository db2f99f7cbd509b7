"""The health engine of one server: runs its probes on their schedules, keeps every
result, evaluates the monitors that read them, and walks their ladders.

Each probe definition that applies to the server has one scheduling task; each
run resolves the probe's targets afresh (the databases active here change with
moves) and runs them side by side, each bounded by the definition's timeout from
outside the probe. Time comes from the injected clock only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import ssl
import traceback
import zlib
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from popguard import paths
from popguard.control.service_control import control_for, services_of
from popguard.directory.directory import Directory, MonitoringOverride, Server
from popguard.errors import UserError
from popguard.health.clock import Clock
from popguard.health.definitions import (
    HealthSet,
    MonitorDefinition,
    ProbeDefinition,
    ResponderDefinition,
)
from popguard.health.diagnosis import undo_interrupted
from popguard.health.external import ExternalPop3Server, load_external
from popguard.health.health_mailboxes import ensure_health_mailboxes, read_credentials
from popguard.health.monitors import (
    MONITOR_KINDS,
    SEVERITY,
    Verdict,
    alert_value,
    ladder_state,
    still_fails,
)
from popguard.health.notifier import Notifier
from popguard.health.overrides import effective_monitor, effective_probe
from popguard.health.probes import (
    NETWORKING,
    PROBE_KINDS,
    Credential,
    ProbeFailure,
    ProbeTarget,
    ProcessState,
    Transcript,
)
from popguard.health.responders import RESPONDER_KINDS, Incident, Recheck, return_databases
from popguard.health.responders import Outcome as ResponderOutcome
from popguard.health.results import (
    RETENTION,
    Alert,
    MonitorState,
    ProbeResult,
    RecoveryAction,
    ResultsStore,
    results_file,
)
from popguard.net import tls
from popguard.services.lmtp_client import deliver

log = logging.getLogger("popguard.health")

# Repairs counted across the servers of a role (restarting or emptying a server).
GROUP_COUNTED = ("restart-server", "move-databases-away")
REPAIR_SETTLE = 900.0  # a server repaired this recently is not counted as in service
OWED_CHECK = 30.0  # seconds between two looks at databases owed back to this server
LADDER_ORDER = {"Healthy": 0, "Degraded": 1, "Unhealthy": 2, "Unrecoverable": 3}
SERVICE_OF_ROLE = {"mailbox": "pop3be", "frontend": "pop3"}
PROBE_MESSAGE = (
    b"From: popguard health <health@monitoring.popguard.local>\r\n"
    b"Subject: popguard probe message\r\n"
    b"\r\n"
    b"The customer touch point probe reads this message with RETR. Keep it.\r\n"
)


@dataclass(frozen=True)
class MonitorRow:
    health_set: HealthSet
    monitor: MonitorDefinition
    state: MonitorState | None
    alert_value: str


class HealthEngine:
    def __init__(
        self, data: Path, server_name: str, clock: Clock, health_sets: list[HealthSet]
    ) -> None:
        self.data = data
        self.clock = clock
        self.directory = Directory(data)
        self.server: Server = self.directory.get_server(server_name)
        self.health_sets = [s for s in health_sets if s.applies_to(self.server.roles)]
        self.store = ResultsStore(results_file(data, self.server.name))
        self._context = tls.TlsMaterial.of(data).client_context()
        self._resources: dict[str, list[str]] = {}  # probe identity -> current targets
        self._lock = asyncio.Lock()  # one monitor evaluation at a time
        # Monitor states live here and are written through to the store, which is
        # what a restarted engine starts from.
        self._states = self.store.monitor_states()
        self._service_of = {
            f"{s.name}\\{r.name}": r.service for s in self.health_sets for r in s.responders
        }
        self._probe_by_key = {f"{s.name}\\{p.name}": p for s, p in self.probes()}
        self._monitor_by_key = {
            f"{s.name}\\{m.name}": m for s in self.health_sets for m in s.monitors
        }
        self._monitors_of_probe: dict[tuple[str, str], list[MonitorDefinition]] = {}
        for health_set in self.health_sets:
            for monitor in health_set.monitors:
                key = (health_set.name, monitor.probe)
                self._monitors_of_probe.setdefault(key, []).append(monitor)
        self._resources_of: dict[str, set[str]] = {}  # monitor -> resources with a state
        self._responders_of: dict[str, list[tuple[HealthSet, ResponderDefinition]]] = {}
        for health_set in self.health_sets:
            for responder in health_set.responders:
                if responder.role is None or responder.role in self.server.roles:
                    monitor_key = f"{health_set.name}\\{responder.monitor}"
                    self._responders_of.setdefault(monitor_key, []).append((health_set, responder))
        for steps in self._responders_of.values():  # the ladder's order
            steps.sort(key=lambda step: (LADDER_ORDER[step[1].state], step[1].after))
        # (responder, resource, first alert): fired once per alert, across restarts too,
        # however long ago the alert began.
        open_alerts = {s.first_alert for s in self._states.values() if s.is_alert}
        self._fired = {
            (a.responder, a.resource, a.alert_started)
            for a in self.store.actions(since=min(filter(None, open_alerts), default=0.0))
            if a.alert_started in open_alerts
        }
        self._responding: set[asyncio.Task[None]] = set()
        self._busy: set[tuple[str, str]] = set()  # (monitor, resource) with a step under way
        self._moving_back = False
        # Moves of this server's databases, by any monitor's step, one at a time.
        self.moves_lock = asyncio.Lock()
        self._owed_checked = -1e18
        self._finish_interrupted()
        self.notifier = Notifier(data, self.server.name, self.store, clock, self._runbook_of)
        for monitor_key, resource in self._states:
            self._resources_of.setdefault(monitor_key, set()).add(resource)
        self._overrides: list[MonitoringOverride] = []
        self._repairing: set[str] = set()
        self._controls_read = -1e18
        self._external: list[ExternalPop3Server] = []
        self._external_contexts: dict[str, ssl.SSLContext] = {}

    def _runbook_of(self, monitor_key: str) -> str:
        monitor = self._monitor_by_key.get(monitor_key)
        return monitor.help if monitor else ""

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
        """Overrides and repairing flags from the directory, at most once a second."""
        now = self.clock.now()
        if not force and now - self._controls_read < 1.0:
            return
        try:
            self._overrides = self.directory.monitoring_overrides(self.server.name, now)
            self._repairing = self.directory.monitors_repairing(self.server.name)
        except sqlite3.Error as exc:  # a busy directory: keep the last ones
            log.warning("reading overrides failed: %s", exc)
            return
        try:
            self._external = [
                e for e in load_external(self.data)
                if e.watched_by.lower() == self.server.name.lower()
            ]  # fmt: skip
        except (UserError, OSError, ValueError) as exc:  # a broken file: keep what was there
            log.error("reading %s failed: %s", "health/external.toml", exc)
        self._controls_read = now

    def _enabled(self, monitor_key: str) -> bool:
        """Neither the monitor nor the probe it reads is disabled by an override."""
        monitor = self._monitor_by_key.get(monitor_key)
        if monitor is None:
            return True
        health_set = monitor_key.split("\\", 1)[0]
        if not effective_monitor(monitor, monitor_key, self._overrides)[1]:
            return False
        probe = self._probe_by_key.get(f"{health_set}\\{monitor.probe}")
        if probe is None:
            return True
        return effective_probe(probe, f"{health_set}\\{probe.name}", self._overrides)[1]

    def close(self) -> None:
        self.store.close()
        self.directory.close()

    # What runs here ------------------------------------------------------------------

    def probes(self) -> list[tuple[HealthSet, ProbeDefinition]]:
        return [
            (health_set, probe)
            for health_set in self.health_sets
            for probe in health_set.probes
            if probe.role is None or probe.role in self.server.roles
        ]

    def monitors(self, health_set: HealthSet) -> list[MonitorDefinition]:
        """The monitors of a health set whose probe runs on this server."""
        here = {p.name for s, p in self.probes() if s is health_set}
        return [m for m in health_set.monitors if m.probe in here]

    def find_probe(self, identity: str) -> tuple[HealthSet, ProbeDefinition, str | None]:
        """'HealthSet\\Probe' or 'HealthSet\\Probe\\TargetResource'."""
        parts = identity.split("\\")
        if len(parts) not in (2, 3):
            raise UserError(f"a probe is named HEALTHSET\\PROBE[\\RESOURCE], got '{identity}'")
        for health_set, probe in self.probes():
            if (health_set.name.lower(), probe.name.lower()) == (
                parts[0].lower(),
                parts[1].lower(),
            ):
                return health_set, probe, parts[2] if len(parts) == 3 else None
        known = ", ".join(f"{s.name}\\{p.name}" for s, p in self.probes())
        raise UserError(f"no probe {identity} on {self.server.name} (probes here: {known})")

    def _databases(self) -> list[str]:
        if "mailbox" in self.server.roles:
            return [
                c.database
                for c in self.directory.database_copies()
                if c.is_active and c.server.lower() == self.server.name.lower()
            ]
        return self.directory.list_databases()

    def targets(self, probe: ProbeDefinition) -> list[ProbeTarget]:
        return self._own_targets(probe) + (self._external_targets(probe) if probe.external else [])

    def _external_targets(self, probe: ProbeDefinition) -> list[ProbeTarget]:
        targets = []
        for server in self._external:
            key = str(server.ca_file or "")
            context = self._external_contexts.get(key)
            if context is None:
                context = ssl.create_default_context(cafile=key or None)
                self._external_contexts[key] = context
            credential = server.credential() if probe.kind == "pop3-login" else None
            targets.append(
                ProbeTarget(server.name, server.host, server.port, server.tls, context, credential)
            )
        return targets

    def _own_targets(self, probe: ProbeDefinition) -> list[ProbeTarget]:
        host = self.server.address
        port = self.server.port(probe.endpoint) if probe.endpoint else 0
        if probe.kind == "process-starts":
            here = services_of(self.server.roles)
            return [
                ProbeTarget(
                    resource=service, read_process=functools.partial(self._process, service)
                )
                for service in probe.services
                if service in here
            ]
        if probe.kind == "counter":
            files = {
                SERVICE_OF_ROLE[role]: paths.server_folder(
                    self.data, self.server.name
                ).counters_file(SERVICE_OF_ROLE[role])
                for role in self.server.roles
            }
            return [
                ProbeTarget(resource=service, counters_files={service: f})
                for service, f in files.items()
            ]
        if not probe.per_database:
            service = "pop3" if probe.endpoint in ("pop3", "pop3-tls") else "pop3be"
            return [ProbeTarget(service, host, port, probe.tls, self._context, source=host)]
        credentials = read_credentials(self.data)
        return [
            ProbeTarget(
                resource=database,
                host=host,
                port=port,
                tls=probe.tls,
                context=self._context,
                credential=credentials.get(database.lower()),
                deliver_probe_message=self._deliver_probe_message,
                source=host,
            )
            for database in self._databases()
        ]

    async def _process(self, service: str) -> ProcessState:
        def read() -> ProcessState:
            (status,) = control_for(self.data).status(self.server.name, [service])
            return ProcessState(status.state, status.pid, status.uptime_seconds, status.detail)

        try:
            return await asyncio.to_thread(read)
        except UserError as exc:  # no supervisor runs this server's services
            return ProcessState("Unknown", None, None, str(exc))

    async def _deliver_probe_message(self, address: str) -> str | None:
        def send() -> str | None:
            with Directory(self.data) as directory:
                result = deliver(
                    directory, address, PROBE_MESSAGE, "health@monitoring.popguard.local"
                )
            return None if result.code == 250 else result.reply

        try:
            return await asyncio.to_thread(send)
        except UserError as exc:
            return str(exc)

    # Running probes ------------------------------------------------------------------------

    async def run_probe(
        self, health_set: HealthSet, probe: ProbeDefinition, target: ProbeTarget
    ) -> ProbeResult:
        """Run one probe instance within its timeout; never raises."""
        identity = f"{health_set.name}\\{probe.name}"
        transcript = Transcript()
        started = self.clock.now()
        watch = asyncio.get_running_loop().time()
        kind = PROBE_KINDS[probe.kind]
        result_type, sample = "Succeeded", None
        error = exception = component = reason = ""
        try:
            async with asyncio.timeout(probe.timeout):
                outcome = await kind(probe, target, transcript)
            sample = outcome.sample_value
        except TimeoutError:
            result_type = "TimedOut"
            # Silence is the probed service's, whatever step it fell in (a hung back
            # end stalls a TLS handshake too); only a connection that never opened is
            # the network's. The step is kept in the reason and the error.
            component = NETWORKING if transcript.step == "connect" else "POP3"
            reason = f"timeout at {transcript.step}"
            error = f"no answer within {probe.timeout:g}s at step '{transcript.step}'"
        except ProbeFailure as failure:
            result_type, component, reason, error = (
                "Failed",
                failure.component,
                failure.reason,
                str(failure),
            )
        except Exception as exc:  # a probe must never take the engine down
            result_type, component, reason = "Failed", "Probe", type(exc).__name__
            error, exception = f"probe crashed: {exc!r}", traceback.format_exc(limit=5)
        ended = self.clock.now()
        if sample is None:
            sample = round((asyncio.get_running_loop().time() - watch) * 1000, 1)
        if result_type != "Succeeded":
            transcript.note(f"failed: {error}")
        return ProbeResult(
            probe=identity,
            resource=target.resource,
            started=started,
            ended=ended,
            result_type=result_type,
            sample_value=sample,
            error=error,
            exception=exception,
            execution_context=transcript.text(),
            failure_context=f"{transcript.step}" if result_type != "Succeeded" else "",
            failure_component=component,
            failure_reason=reason,
        )

    async def run_now(
        self, health_set: HealthSet, probe: ProbeDefinition, resource: str | None = None
    ) -> list[ProbeResult]:
        """Run every target of a probe once, store the results, update its monitors."""
        targets = self.targets(probe)
        if resource is not None:
            targets = [t for t in targets if t.resource.lower() == resource.lower()]
            if not targets:
                raise UserError(f"{health_set.name}\\{probe.name} has no target {resource!r} here")
        results = await asyncio.gather(*(self.run_probe(health_set, probe, t) for t in targets))
        for result in results:
            self.store.add(result)
        identity = f"{health_set.name}\\{probe.name}"
        if resource is None:
            self._resources[identity] = [t.resource for t in targets]
        await self.evaluate(health_set, probe)
        return list(results)

    async def _schedule(
        self, health_set: HealthSet, probe: ProbeDefinition, stop: asyncio.Event
    ) -> None:
        identity = f"{health_set.name}\\{probe.name}"
        # Spread first runs over one recurrence (stable per probe and server), so that
        # many probes do not all start in the same instant, period after period.
        spread = zlib.crc32(f"{self.server.name}/{identity}".encode()) / 2**32
        await self._sleep(spread * probe.recurrence, stop)
        while not stop.is_set():
            began = self.clock.now()
            self.refresh_controls()
            effective, enabled = effective_probe(probe, identity, self._overrides)
            if enabled:
                try:
                    await self.run_now(health_set, effective)
                except Exception:
                    log.exception("running %s failed", identity)
            await self._sleep(max(0.0, effective.recurrence - (self.clock.now() - began)), stop)

    async def _sleep(self, seconds: float, stop: asyncio.Event) -> None:
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (sleeper, stopper):
            task.cancel()

    # Monitors ------------------------------------------------------------------------------

    async def evaluate(self, health_set: HealthSet, probe: ProbeDefinition | None = None) -> None:
        """Apply the monitors that read `probe` (all of the set's, without one) to the
        probe's latest results, per target resource."""
        async with self._lock:
            now = self.clock.now()
            monitors = (
                health_set.monitors
                if probe is None
                else self._monitors_of_probe.get((health_set.name, probe.name), [])
            )
            for monitor in monitors:
                identity = f"{health_set.name}\\{monitor.probe}"
                resources = self._resources.get(identity)
                if resources is None:
                    continue  # the probe has not run yet
                key = f"{health_set.name}\\{monitor.name}"
                effective, enabled = effective_monitor(monitor, key, self._overrides)
                for resource in resources:
                    previous = self._states.get((key, resource))
                    self._evaluate_one(effective, enabled, key, identity, resource, previous, now)
                for resource in self._resources_of.get(key, set()) - set(resources):
                    # A database moved away: its monitor instance goes with it, unless
                    # this alert's own repair moved it, whose ladder goes on.
                    gone = self._states[(key, resource)]
                    if gone.is_alert and resource.lower() in self._owed_here():
                        continue
                    self.store.forget_monitor_state(key, resource)
                    del self._states[(key, resource)]
                    self._resources_of[key].discard(resource)

    def _walk_alerting(self) -> None:
        """Move alerting monitors up their ladders as time passes (no new result needed)."""
        now = self.clock.now()
        for (key, _), state in list(self._states.items()):
            if not state.is_alert or state.first_alert is None:
                continue
            monitor = self._monitor_by_key.get(key)
            if monitor is None:
                continue
            if not self._enabled(key):  # disabled meanwhile: the alert ends, no step fires
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
        self._states[(state.monitor, state.resource)] = state
        self._resources_of.setdefault(state.monitor, set()).add(state.resource)
        self._consider_responders(state)

    # Responders ----------------------------------------------------------------------------

    def _consider_responders(self, state: MonitorState) -> None:
        """Start each responder whose ladder step this alert has reached, once per alert."""
        if not state.is_alert or state.first_alert is None or not self._enabled(state.monitor):
            return
        for health_set, responder in self._responders_of.get(state.monitor, []):
            if LADDER_ORDER[state.state] < LADDER_ORDER[responder.state]:
                continue
            if self.clock.now() - state.first_alert < responder.after:
                continue
            identity = f"{health_set.name}\\{responder.name}"
            fired = (identity, state.resource, state.first_alert)
            if fired in self._fired:
                continue
            # One step at a time, in the ladder's order: the next waits for this one
            # (a move of several databases may outlast the gap to the next step).
            busy = (state.monitor, state.resource)
            if busy in self._busy:
                return
            self._fired.add(fired)
            self._busy.add(busy)
            task = asyncio.create_task(self._respond(health_set, responder, state))
            self._responding.add(task)
            task.add_done_callback(self._responding.discard)
            task.add_done_callback(functools.partial(self._step_done, busy))
            return

    def _step_done(self, busy: tuple[str, str], task: asyncio.Task[None]) -> None:
        self._busy.discard(busy)

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
            return (a.kind, self._service_of.get(a.responder)) == (
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
        except sqlite3.Error as exc:  # cannot count: do not act blind
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
        monitor = self._monitor_by_key[state.monitor]
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
            outcome = await RESPONDER_KINDS[responder.kind](self, responder, incident)
        except Exception as exc:
            log.exception("%s failed", identity)
            outcome = ResponderOutcome("Failed", f"{responder.kind} crashed: {exc!r}")
        self.store.finish_action(action, self.clock.now(), outcome.result, outcome.detail)
        log.warning("%s: %s: %s", identity, outcome.result, outcome.detail)
        if responder.kind in GROUP_COUNTED and outcome.result in ("Succeeded", "Failed"):
            try:
                role = self._role_of(responder)
                service = responder.service or ""
                self.directory.record_repair(self.server.name, role, responder.kind, service, now)
            except sqlite3.Error as exc:
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
        if state.monitor.lower() in self._repairing:
            return "an operator marked the monitor Repairing"
        probe = self._probe_by_key.get(probe_identity)
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

    async def settle(self) -> None:
        """Wait for the responders and the sends under way to finish."""
        while self._responding:
            await asyncio.gather(*self._responding, return_exceptions=True)
        await self.notifier.settle()

    def escalated(self, incident: Incident, component: str, error: str, detail: str) -> str:
        """Store the alert and hand it to the notifier; says what became of it."""
        log.error("%s", detail)
        alert = Alert(
            self.clock.now(), incident.health_set, incident.monitor, incident.probe,
            incident.resource, component, error, detail, incident.first_alert,
        )  # fmt: skip
        return self.notifier.raised(alert)

    # What the responders ask -----------------------------------------------------------------

    async def check_again(self, incident: Incident) -> Recheck:
        """Run the incident's probe once more against its resource (stored, monitors
        updated) and judge it by the monitor's rule (a counter read fine but still above
        its threshold still fails). Without a target here now (a database moved away),
        nothing runs."""
        health_set, probe, _ = self.find_probe(f"{incident.health_set}\\{incident.probe}")
        if not any(t.resource.lower() == incident.resource.lower() for t in self.targets(probe)):
            return Recheck(None, None)
        (result,) = await self.run_now(health_set, probe, incident.resource)
        monitor = self._monitor_by_key[f"{incident.health_set}\\{incident.monitor}"]
        return Recheck(result, still_fails(monitor, result, self.store, self.clock.now()))

    def latest_result(self, incident: Incident) -> ProbeResult | None:
        found = self.store.recent(f"{incident.health_set}\\{incident.probe}", incident.resource, 1)
        return found[0] if found else None

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
        for health_set, probe in self.probes():
            if probe.kind == "counter" or probe.per_database:
                continue
            for target in self._own_targets(probe):
                result = await self.run_probe(health_set, probe, target)
                self.store.add(result)
                if not result.succeeded:
                    problems.append(f"{result.probe} {result.failure_component}: {result.error}")
        return problems

    async def databases_fail_here(self, databases: list[str]) -> list[str]:
        """Run every per-database probe of this server for these databases now: what
        fails (a database moved back onto a server that cannot serve it)."""
        failures = []
        for health_set, probe in self.probes():
            if not probe.per_database:
                continue
            for target in self._own_targets(probe):
                if target.resource.lower() in {d.lower() for d in databases}:
                    result = await self.run_probe(health_set, probe, target)
                    self.store.add(result)
                    if not result.succeeded:
                        failures.append(
                            f"{target.resource}: {result.probe} {result.failure_component} "
                            f"{result.error}"
                        )
        return failures

    def _settle_debts(self) -> None:
        """Databases a responder moved away go back once this server is healthy: checked
        every OWED_CHECK seconds, one move back at a time, not before a failed try's hold
        ends. An operator who allowed activation again took the matter over."""
        now = self.clock.now()
        if self._moving_back or now - self._owed_checked < OWED_CHECK:
            return
        self._owed_checked = now
        owed = self.store.owed()
        if not owed or all(until > now for until in owed.values()):
            return
        self._moving_back = True
        self._spawn(self._move_back_owed())

    async def _move_back_owed(self) -> None:
        try:
            outcome = await return_databases(self, ladder_step=False)
        finally:
            self._moving_back = False
        # Moves of this server's databases, by any monitor's step, one at a time.
        self.moves_lock = asyncio.Lock()
        if outcome is None:
            return
        now = self.clock.now()
        self.store.add_action(
            RecoveryAction("popguard\\MoveBackWhenHealthy", "", "", "move-back", now, now, now,
                           outcome.result, outcome.detail)
        )  # fmt: skip
        log.warning("moving back: %s: %s", outcome.result, outcome.detail)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:  # logged; the engine goes on
                log.exception("a background repair failed")

        task = asyncio.create_task(run())
        self._responding.add(task)
        task.add_done_callback(self._responding.discard)

    def _recovered(self, previous: MonitorState) -> None:
        """A monitor back to Healthy: its alerts are resolved, and a front end its
        responders took out of service comes back (databases come back through
        _settle_debts, once the whole server is healthy)."""
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

    def walk(self) -> None:
        """What passing time does: ladders step up, responders whose time came start,
        open alerts are sent again or resolved."""
        self.refresh_controls()
        self._walk_alerting()
        self.notifier.check(self._states)
        if "mailbox" in self.server.roles:
            self._settle_debts()

    async def _walk_ladders(self, stop: asyncio.Event) -> None:
        """Ladders move with time even between probe results."""
        while not stop.is_set():
            try:
                self.walk()
            except Exception:
                log.exception("walking the ladders failed")
            await self._sleep(1.0, stop)

    async def _prune(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                self.store.prune(self.clock.now() - RETENTION)
            with contextlib.suppress(Exception):  # group throttles look one day back
                self.directory.prune_repairs(self.server.name, self.clock.now() - 2 * 86_400)
            await self._sleep(3600.0, stop)

    def monitor_rows(self) -> list[MonitorRow]:
        self.refresh_controls(force=True)  # an override just added shows at once
        states = self._states
        rows = []
        for health_set in self.health_sets:
            for monitor in self.monitors(health_set):
                key = f"{health_set.name}\\{monitor.name}"
                found: list[MonitorState | None] = [
                    s for (name, _), s in states.items() if name == key
                ]
                _, enabled = effective_monitor(monitor, key, self._overrides)
                repairing = key.lower() in self._repairing
                for state in found or [None]:
                    value = alert_value(
                        state.state if state else "Healthy",
                        bool(state and state.last_result),
                        disabled=not enabled,
                        repairing=repairing,
                    )
                    rows.append(MonitorRow(health_set, monitor, state, value))
        return rows

    @staticmethod
    def worst(values: list[str]) -> str:
        return max(values, key=lambda v: SEVERITY.get(v, 0), default="Healthy")

    # Running -------------------------------------------------------------------------------

    def ensure_health_mailboxes(self) -> dict[str, Credential]:
        return ensure_health_mailboxes(self.directory)

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self._schedule(s, p, stop)) for s, p in self.probes()]
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
            for task in list(self._responding):
                task.cancel()
            self.notifier.cancel()
            await asyncio.gather(*self._responding, return_exceptions=True)
