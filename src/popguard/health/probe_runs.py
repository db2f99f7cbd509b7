"""Probe runs: each probe of this server on its schedule, its targets resolved afresh
at each run (the databases active here change with moves), every target run side by
side within the definition's timeout, enforced from outside the probe, and every
result stored before the probe's monitors are evaluated. A target that has just
begun to fail runs again within seconds, as often as its definition's `retries` say,
before the next recurrence. Time comes from the injected clock only."""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import traceback
import zlib
from collections.abc import Awaitable, Callable

from popguard.control.service_control import control_for, services_of
from popguard.directory.sql.engine import DirectoryUnavailable
from popguard.errors import UserError
from popguard.health.clock import sleep_unless_stopped
from popguard.health.definitions import HealthSet, ProbeDefinition
from popguard.health.engine_state import EngineState
from popguard.health.health_mailboxes import read_credentials
from popguard.health.overrides import effective_probe
from popguard.health.probes import (
    NETWORKING,
    PROBE_KINDS,
    ProbeFailure,
    ProbeTarget,
    ProcessState,
    Transcript,
)
from popguard.health.results import ProbeResult
from popguard.services.lmtp_client import deliver

log = logging.getLogger("popguard.health")

SERVICE_OF_ROLE = {"mailbox": "pop3be", "frontend": "pop3"}
PROBE_MESSAGE = (
    b"From: popguard health <health@monitoring.popguard.local>\r\n"
    b"Subject: popguard probe message\r\n"
    b"\r\n"
    b"The customer touch point probe reads this message with RETR. Keep it.\r\n"
)

Evaluate = Callable[[HealthSet, ProbeDefinition], Awaitable[None]]


class ProbeRuns:
    def __init__(
        self,
        shared: EngineState,
        tls_context: ssl.SSLContext,
        evaluate: Evaluate,
    ) -> None:
        self.server_context = shared.context
        self.data, self.server, self.directory = shared.data, shared.server, shared.directory
        self.clock, self.store, self.controls = shared.clock, shared.store, shared.controls
        self._resources = shared.resources
        self._evaluate = evaluate
        self._context = tls_context  # for this server's own endpoints
        self._external_contexts: dict[str, ssl.SSLContext] = {}

    # Targets -------------------------------------------------------------------------------

    def targets(self, probe: ProbeDefinition) -> list[ProbeTarget]:
        return self.own_targets(probe) + (self._external_targets(probe) if probe.external else [])

    def _external_targets(self, probe: ProbeDefinition) -> list[ProbeTarget]:
        targets = []
        for server in self.controls.external:
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

    def own_targets(self, probe: ProbeDefinition) -> list[ProbeTarget]:
        """The targets on this server itself, not the watched external servers."""
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
                SERVICE_OF_ROLE[role]: self.server_context.folder.counters_file(
                    SERVICE_OF_ROLE[role]
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

    def _databases(self) -> list[str]:
        if "mailbox" in self.server.roles:
            return [
                c.database
                for c in self.directory.database_copies()
                if c.is_active and c.server.lower() == self.server.name.lower()
            ]
        return self.directory.list_databases()

    async def _process(self, service: str) -> ProcessState:
        def read() -> ProcessState:
            (status,) = control_for(self.data).status(self.server.name, [service])
            return ProcessState(
                status.state, status.pid, status.uptime_seconds, status.detail,
                status.unexpected_exits,
            )  # fmt: skip

        try:
            return await asyncio.to_thread(read)
        except UserError as exc:  # no supervisor runs this server's services
            return ProcessState("Unknown", None, None, str(exc))

    async def _deliver_probe_message(self, address: str) -> str | None:
        def send() -> str | None:
            with self.server_context.open_directory() as directory:
                result = deliver(
                    directory, address, PROBE_MESSAGE, "health@monitoring.popguard.local"
                )
            return None if result.code == 250 else result.reply

        try:
            return await asyncio.to_thread(send)
        except UserError as exc:
            return str(exc)

    # Running -------------------------------------------------------------------------------

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
        return await self._run_targets(health_set, probe, targets, every=resource is None)

    async def _run_targets(
        self,
        health_set: HealthSet,
        probe: ProbeDefinition,
        targets: list[ProbeTarget],
        every: bool = False,
    ) -> list[ProbeResult]:
        """Run these targets side by side, store the results, update the probe's
        monitors; `every`: these are all its targets now (its current resources)."""
        results = await asyncio.gather(*(self.run_probe(health_set, probe, t) for t in targets))
        for result in results:
            self.store.add(result)
        if every:
            self._resources[f"{health_set.name}\\{probe.name}"] = [t.resource for t in targets]
        await self._evaluate(health_set, probe)
        return list(results)

    def _new_failures(self, identity: str, results: list[ProbeResult]) -> set[str]:
        """The targets whose failure just now follows a success (or nothing): a new
        failure streak, which earns the probe's quick re-runs."""
        fresh = set()
        for result in results:
            if result.succeeded:
                continue
            before = self.store.recent(identity, result.resource, 2)
            if len(before) < 2 or before[1].succeeded:
                fresh.add(result.resource.lower())
        return fresh

    async def _retry(
        self,
        health_set: HealthSet,
        probe: ProbeDefinition,
        results: list[ProbeResult],
        stop: asyncio.Event,
    ) -> float:
        """Run the targets of a new failure again, `retries` times at most, each
        `retry_interval` after the failed run ended, until they succeed. The retry
        interval never exceeds the recurrence (an override may shorten that). Returns
        the least pause before the next scheduled run: the retry interval after a
        re-run (re-runs that outlasted the recurrence must not be followed at once by a
        run that samples the same instant), else 0."""
        if not probe.retries or probe.retry_interval is None:
            return 0.0
        identity = f"{health_set.name}\\{probe.name}"
        failing = self._new_failures(identity, results)
        interval = min(probe.retry_interval, probe.recurrence)
        least = 0.0
        for _ in range(probe.retries):
            if not failing:
                return least
            await sleep_unless_stopped(self.clock, interval, stop)
            if stop.is_set():
                return least
            # Targets are resolved afresh: a database moved away meanwhile is not run.
            targets = [t for t in self.targets(probe) if t.resource.lower() in failing]
            again = await self._run_targets(health_set, probe, targets) if targets else []
            failing = {r.resource.lower() for r in again if not r.succeeded}
            least = interval
        return least

    async def schedule(
        self, health_set: HealthSet, probe: ProbeDefinition, stop: asyncio.Event
    ) -> None:
        identity = f"{health_set.name}\\{probe.name}"
        # Spread first runs over one recurrence (stable per probe and server), so that
        # many probes do not all start in the same instant, period after period.
        spread = zlib.crc32(f"{self.server.name}/{identity}".encode()) / 2**32
        await sleep_unless_stopped(self.clock, spread * probe.recurrence, stop)
        while not stop.is_set():
            began = self.clock.now()
            self.controls.refresh()
            effective, enabled = effective_probe(probe, identity, self.controls.overrides)
            least = 0.0
            if enabled:
                try:
                    results = await self.run_now(health_set, effective)
                    least = await self._retry(health_set, effective, results, stop)
                except DirectoryUnavailable as exc:  # its targets are not known here yet
                    log.warning("%s not run: %s", identity, exc)
                except Exception:
                    log.exception("running %s failed", identity)
            pause = max(least, effective.recurrence - (self.clock.now() - began))
            await sleep_unless_stopped(self.clock, pause, stop)
