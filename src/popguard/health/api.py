"""The health service's HTTP API, which the `popguard` health commands talk to.

Rows come out with Exchange's property names, ready for the CLI's renderer. Every
request but /metrics carries the organization's API token (`DATA/health/api-token`,
mode 0600) as a bearer token.
"""

from __future__ import annotations

import datetime
import fcntl
import hmac
import os
import secrets
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from popguard import paths
from popguard.errors import UserError
from popguard.health.definitions import HealthSet, ProbeDefinition
from popguard.health.engine import HealthEngine
from popguard.health.monitors import SEVERITY
from popguard.health.results import ProbeResult, RecoveryAction

MAX_RESULTS = 20_000  # results one request may ask for (a week of a 60 s probe: 10,080)


def ensure_token(data: Path) -> str:
    path = paths.api_token_file(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".token.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists() or not path.read_text().strip():
            # Whole or not at all: an empty token must never be left to match anything.
            temporary = path.with_suffix(".tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32) + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
    return path.read_text().strip()


def when(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


def serverhealth_rows(engine: HealthEngine) -> list[dict[str, Any]]:
    rows = engine.monitor_rows()
    by_set: dict[str, list[str]] = {}
    for row in rows:
        by_set.setdefault(row.health_set.name, []).append(row.alert_value)
    return [
        {
            "Server": engine.server.name,
            "CurrentHealthSetState": engine.worst(by_set[row.health_set.name]),
            "Name": row.monitor.name,
            "TargetResource": row.state.resource if row.state else "",
            "HealthSetName": row.health_set.name,
            "HealthGroupName": row.health_set.health_group,
            "AlertValue": row.alert_value,
            "FirstAlertObservedTime": when(row.state.first_alert if row.state else None),
            "LastTransitionTime": when(row.state.last_transition if row.state else None),
            "LastExecutionTime": when(row.state.last_execution if row.state else None),
            "LastExecutionResult": row.state.last_result if row.state else "",
            "ServerComponentName": row.health_set.server_component or "None",
            "Error": row.state.error if row.state else "",
        }
        for row in rows
    ]


def healthreport_rows(engine: HealthEngine) -> list[dict[str, Any]]:
    rows = engine.monitor_rows()
    report = []
    for health_set in engine.health_sets:
        mine = [r for r in rows if r.health_set is health_set]
        values = [r.alert_value for r in mine]
        transitions = [r.state.last_transition for r in mine if r.state and r.state.last_transition]
        report.append(
            {
                "Server": engine.server.name,
                "State": "Online",
                "HealthSet": health_set.name,
                "HealthGroup": health_set.health_group,
                "AlertValue": engine.worst(values),
                "LastTransitionTime": when(max(transitions, default=None)),
                # The rows get-serverhealth shows for the set: one per monitor and target.
                "MonitorCount": len(mine),
            }
        )
    return report


def result_row(server: str, result: ProbeResult) -> dict[str, Any]:
    return {
        "Server": server,
        "MonitorIdentity": f"{result.probe}\\{result.resource}",
        "ExecutionStartTime": when(result.started),
        "ExecutionEndTime": when(result.ended),
        "ResultType": result.result_type,
        "Error": result.error,
        "Exception": result.exception,
        "SampleValue": result.sample_value,
        "ExecutionContext": result.execution_context,
        "FailureContext": result.failure_context,
        "FailureComponent": result.failure_component,
        "FailureReason": result.failure_reason,
    }


def action_row(server: str, action: RecoveryAction) -> dict[str, Any]:
    return {
        "Server": server,
        "Id": action.id,
        "ResponderName": action.responder,
        "MonitorName": action.monitor,
        "TargetResource": action.resource,
        "ActionId": action.kind,
        "AlertStartTime": when(action.alert_started),
        "StartTime": when(action.started),
        "EndTime": when(action.ended),
        "Result": action.result,
        "Context": action.detail,
    }


def item_rows(engine: HealthEngine) -> list[dict[str, Any]]:
    rows = []
    for health_set in engine.health_sets:
        for probe in health_set.probes:
            if probe.role is not None and probe.role not in engine.server.roles:
                continue
            targets = ", ".join(t.resource for t in engine.targets(probe))
            rows.append({"Server": engine.server.name, "HealthSetName": health_set.name,
                         "Name": probe.name, "ItemType": "Probe",
                         "TargetResource": targets})  # fmt: skip
        for monitor in engine.monitors(health_set):
            rows.append({"Server": engine.server.name, "HealthSetName": health_set.name,
                         "Name": monitor.name, "ItemType": "Monitor",
                         "TargetResource": monitor.probe})  # fmt: skip
    return rows


class HealthCollector(Collector):
    """Per probe instance: success and latency of its last run; per monitor: its state."""

    def __init__(self, engine: HealthEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        server = self.engine.server.name
        success = GaugeMetricFamily(
            "popguard_probe_success",
            "1 if the last run succeeded",
            labels=["server", "probe", "resource"],
        )
        latency = GaugeMetricFamily(
            "popguard_probe_sample_value", "SampleValue of the last run (latency in ms)",
            labels=["server", "probe", "resource"],
        )  # fmt: skip
        for result in self.engine.store.latest():
            labels = [server, result.probe, result.resource]
            success.add_metric(labels, 1.0 if result.succeeded else 0.0)
            latency.add_metric(labels, result.sample_value or 0.0)
        state = GaugeMetricFamily(
            "popguard_monitor_alert_value", "1 for the monitor's current AlertValue",
            labels=["server", "monitor", "resource", "alert_value"],
        )  # fmt: skip
        severity = GaugeMetricFamily(
            "popguard_monitor_severity", "0 Healthy/Disabled, 1 Unknown, 2 Repairing, 3 Degraded, "
            "4 Unhealthy", labels=["server", "monitor", "resource"],
        )  # fmt: skip
        for row in self.engine.monitor_rows():
            name = f"{row.health_set.name}\\{row.monitor.name}"
            resource = row.state.resource if row.state else ""
            state.add_metric([server, name, resource, row.alert_value], 1.0)
            severity.add_metric([server, name, resource], float(SEVERITY.get(row.alert_value, 0)))
        yield from (success, latency, state, severity)


def nothing_to_probe(
    engine: HealthEngine, health_set: HealthSet, probe: ProbeDefinition, resource: str | None
) -> str:
    """Why a probe had no target here, and what answers the runbook's question instead
    (after a restart with the databases away: is this server fit to take them back?)."""
    name = engine.server.name
    if resource is not None:
        return f"{health_set.name}\\{probe.name} has no target {resource} on {name}"
    if not probe.per_database:
        return f"{health_set.name}\\{probe.name} has no target on {name}"
    passive = sorted(
        c.database for c in engine.directory.database_copies()
        if c.server.lower() == name.lower() and not c.is_active
    )  # fmt: skip
    held = f" ({', '.join(passive)} have passive copies here)" if passive else ""
    whole = [p for s, p in engine.probes() if s.name == health_set.name and not p.per_database]
    checks = [
        f"popguard invoke-monitoringprobe '{health_set.name}\\{p.name}' --server {name}"
        for p in whole if p.kind != "process-starts"
    ]  # fmt: skip
    checks.append(f"popguard get-mailboxdatabasecopystatus --server {name}")
    return (
        f"nothing to probe: {probe.name} logs in to each database active on {name}, and "
        f"none is active there now{held}. Whether {name} is fit to take them back: "
        + "; ".join(checks)
    )


class HealthApi:
    def __init__(self, engine: HealthEngine, token: str) -> None:
        self.engine = engine
        self._token = token

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._authorize])
        app.add_routes(
            [
                web.get("/v1/serverhealth", self._serverhealth),
                web.get("/v1/healthreport", self._healthreport),
                web.get("/v1/items", self._items),
                web.post("/v1/invoke", self._invoke),
                web.get("/metrics", self._metrics),
                web.get("/v1/recoveryactions", self._recovery_actions),
                web.get("/v1/alerts", self._alerts),
                web.post("/v1/acknowledge", self._acknowledge),
                web.get("/v1/results", self._results),
                web.get("/v1/healthsetchanges", self._health_set_changes),
            ]
        )
        return app

    @web.middleware
    async def _authorize(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        # Prometheus scrapes without a token: /metrics tells states, never transcripts.
        authorized = bool(self._token) and hmac.compare_digest(given.encode(), self._token.encode())
        if request.path != "/metrics" and not authorized:
            return web.json_response({"error": "a valid API token is required"}, status=401)
        try:
            return await handler(request)
        except UserError as exc:
            return web.json_response({"error": str(exc)}, status=400)

    async def _serverhealth(self, request: web.Request) -> web.Response:
        return web.json_response(serverhealth_rows(self.engine))

    async def _healthreport(self, request: web.Request) -> web.Response:
        return web.json_response(healthreport_rows(self.engine))

    async def _items(self, request: web.Request) -> web.Response:
        return web.json_response(item_rows(self.engine))

    async def _recovery_actions(self, request: web.Request) -> web.Response:
        return web.json_response(
            [action_row(self.engine.server.name, a) for a in self.engine.store.actions()]
        )

    async def _alerts(self, request: web.Request) -> web.Response:
        server = self.engine.server.name
        return web.json_response(
            [
                {
                    "Server": server,
                    "RaisedTime": when(a.raised),
                    "HealthSetName": a.health_set,
                    "MonitorName": a.monitor,
                    "ProbeName": a.probe,
                    "TargetResource": a.resource,
                    "FailureComponent": a.failure_component,
                    "Error": a.error,
                    "Details": a.detail,
                    "FirstAlertObservedTime": when(a.alert_started),
                    "NotifiedTime": when(a.notified),
                    "Notification": a.notification,
                    "ResolvedTime": when(a.resolved),
                    "Id": a.id,
                    "AcknowledgedTime": when(a.acknowledged),
                    "AcknowledgedBy": a.acknowledged_by,
                    "Acknowledgement": a.acknowledgement,
                }
                for a in self.engine.store.alerts()
            ]
        )

    async def _acknowledge(self, request: web.Request) -> web.Response:
        """An operator takes an open alert in hand: its repeats stop; it is over when
        its monitor recovers, as any alert."""
        body = await request.json()
        if not isinstance(body, dict):
            raise UserError("acknowledge wants {id, by, reason}")
        reason = str(body.get("reason", "")).strip()
        by = str(body.get("by", "")).strip()
        if not reason or not by:
            raise UserError("an acknowledgement needs who (by) and why (reason)")
        try:
            alert_id = int(body.get("id", 0))
        except (TypeError, ValueError):
            raise UserError("an alert's id is a number") from None
        now = self.engine.clock.now()
        if not self.engine.store.acknowledge(alert_id, now, by, reason):
            raise UserError(f"no open alert {alert_id} on {self.engine.server.name}")
        row = {"Server": self.engine.server.name, "Id": alert_id, "AcknowledgedBy": by}
        return web.json_response([row | {"AcknowledgedTime": when(now)}])

    async def _results(self, request: web.Request) -> web.Response:
        """The newest results of one probe on one target (newest first): what the web
        page's probe screen draws."""
        probe = request.query.get("probe", "")
        resource = request.query.get("resource", "")
        try:
            limit = min(max(int(request.query.get("limit", "50")), 1), MAX_RESULTS)
        except ValueError:
            raise UserError("limit is a number") from None
        try:
            since = float(request.query.get("since", "0"))
        except ValueError:
            raise UserError("since is seconds since the epoch") from None
        results = self.engine.store.recent(probe, resource, limit, since)
        return web.json_response([result_row(self.engine.server.name, r) for r in results])

    async def _health_set_changes(self, request: web.Request) -> web.Response:
        """Each change of a health set's AlertValue whose Id is above ?after= (oldest
        first, at most 1000): what the web page's feed follows, so that no state is
        missed between two looks at the health report."""
        try:
            after = int(request.query.get("after", "0"))
        except ValueError:
            raise UserError("after is the Id of a change (a number)") from None
        server = self.engine.server.name
        return web.json_response(
            [
                {"Server": server, "Id": c.id, "HealthSet": c.health_set, "Was": c.was,
                 "AlertValue": c.now, "Time": when(c.at)}
                for c in self.engine.store.health_set_changes(after)
            ]
        )  # fmt: skip

    async def _metrics(self, request: web.Request) -> web.Response:
        registry = CollectorRegistry()
        registry.register(HealthCollector(self.engine))
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _invoke(self, request: web.Request) -> web.Response:
        body = await request.json()
        identity = str(body.get("identity", "")) if isinstance(body, dict) else ""
        health_set, probe, resource = self.engine.find_probe(identity)
        results = await self.engine.run_now(health_set, probe, resource)
        if not results:
            raise UserError(nothing_to_probe(self.engine, health_set, probe, resource))
        return web.json_response([result_row(self.engine.server.name, r) for r in results])
