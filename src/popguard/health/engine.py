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
import logging
import sqlite3
import ssl
import traceback
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

from .. import paths, tls
from ..directory import Directory, MonitoringOverride, Server
from ..errors import UserError
from ..lmtp_client import deliver
from .clock import Clock
from .definitions import HealthSet, MonitorDefinition, ProbeDefinition, ResponderDefinition
from .external import ExternalPop3Server, load_external
from .health_mailboxes import ensure_health_mailboxes, read_credentials
from .monitors import MONITOR_KINDS, SEVERITY, Verdict, alert_value, ladder_state
from .overrides import effective_monitor, effective_probe
from .probes import NETWORKING, PROBE_KINDS, Credential, ProbeFailure, ProbeTarget, Transcript
from .responders import RESPONDER_KINDS, Incident
from .responders import Outcome as ResponderOutcome
from .results import RETENTION, Alert, MonitorState, ProbeResult, RecoveryAction, ResultsStore

log = logging.getLogger("popguard.health")

LADDER_ORDER = {"Healthy": 0, "Degraded": 1, "Unhealthy": 2, "Unrecoverable": 3}
SERVICE_OF_ROLE = {"mailbox": "pop3be", "frontend": "pop3"}
PROBE_MESSAGE = (
    b"From: popguard health <health@monitoring.popguard.local>\r\n"
    b"Subject: popguard probe message\r\n"
    b"\r\n"
    b"The customer touch point probe reads this message with RETR. Keep it.\r\n"
)


def results_file(data: Path, server: str) -> Path:
    return paths.server_dir(data, server) / "health" / "results.sqlite"


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
        self._context = tls.client_context(data)
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
        # (responder, resource, first alert): fired once per alert, across restarts too.
        self._fired = {
            (a.responder, a.resource, a.alert_started)
            for a in self.store.actions(since=self.clock.now() - 2 * 86_400)
        }
        self._responding: set[asyncio.Task[None]] = set()
        for monitor_key, resource in self._states:
            self._resources_of.setdefault(monitor_key, set()).add(resource)
        self._overrides: list[MonitoringOverride] = []
        self._repairing: set[str] = set()
        self._controls_read = -1e18
        self._external: list[ExternalPop3Server] = []
        self._external_contexts: dict[str, ssl.SSLContext] = {}

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
        if probe.kind == "counter":
            files = {
                SERVICE_OF_ROLE[role]: paths.counters_file(
                    self.data, self.server.name, SERVICE_OF_ROLE[role]
                )
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
                    # e.g. a database moved away: its monitor instance goes with it
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
                continue
            step = ladder_state(monitor, state.first_alert, now)
            if step != state.state:
                log.warning("%s on %s: %s -> %s", key, state.resource, state.state, step)
                self._save(replace(state, state=step, last_transition=now))

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
            identity = f"{health_set.name}\\{responder.name}"
            fired = (identity, state.resource, state.first_alert)
            if fired in self._fired:
                continue
            self._fired.add(fired)
            task = asyncio.create_task(self._respond(health_set, responder, state))
            self._responding.add(task)
            task.add_done_callback(self._responding.discard)

    def _throttled(self, responder: ResponderDefinition, now: float) -> str:
        """Why this responder may not act now on this server ('' if it may). Counted per
        kind and service, so two monitors cannot restart one service twice as often."""
        what = (responder.kind, responder.service)
        past = [
            a for a in self.store.actions(since=now - 86_400)
            if a.result in ("Succeeded", "Failed", "InProgress")
            and (a.kind, self._service_of.get(a.responder)) == what
        ]  # fmt: skip
        limit = responder.throttle
        if past and now - past[-1].started < limit.min_gap:
            ago = now - past[-1].started
            return f"the last {responder.kind} was {ago:.0f}s ago (gap {limit.min_gap:g}s)"
        if len([a for a in past if a.started >= now - 3600]) >= limit.per_hour:
            return f"{limit.per_hour} {responder.kind} actions in the last hour already"
        if len(past) >= limit.per_day:
            return f"{limit.per_day} {responder.kind} actions in the last day already"
        return ""

    async def _respond(
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

        latest = self.store.recent(f"{health_set.name}\\{monitor.probe}", state.resource, 1)
        component = latest[0].failure_component if latest else ""
        if component and component in responder.skip_components:
            record("Skipped", f"the failure is in {component}: {responder.kind} here would not "
                   "help; left to the responders of that part and to escalation", now)  # fmt: skip
            return
        if state.monitor.lower() in self._repairing:
            record("Skipped", "an operator marked the monitor Repairing", now)
            return
        throttled = self._throttled(responder, now)
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

    async def settle(self) -> None:
        """Wait for the responders under way to finish."""
        while self._responding:
            await asyncio.gather(*self._responding, return_exceptions=True)

    def escalated(self, incident: Incident, component: str, error: str, detail: str) -> None:
        log.error("%s", detail)
        self.store.add_alert(
            Alert(
                self.clock.now(),
                incident.health_set,
                incident.monitor,
                incident.probe,
                incident.resource,
                component,
                error,
                detail,
            )
        )

    def _recovered(self, previous: MonitorState) -> None:
        """A monitor back to Healthy: undo what its responders took out of service."""
        if previous.first_alert is None:
            return
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

    async def _walk_ladders(self, stop: asyncio.Event) -> None:
        """Ladders move with time even between probe results."""
        while not stop.is_set():
            self.refresh_controls()
            try:
                self._walk_alerting()
            except Exception:
                log.exception("walking the ladders failed")
            await self._sleep(1.0, stop)

    async def _prune(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                self.store.prune(self.clock.now() - RETENTION)
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
            await asyncio.gather(*self._responding, return_exceptions=True)
