"""What each screen of the web page shows, gathered by the same functions as the
command it matches (get-healthreport, get-serverhealth, get-service,
get-servercomponentstate, get-recoveryactions, get-alerts,
get-mailboxdatabasecopystatus): the page never says anything the commands would not.

Every function here is blocking (the health APIs, the directory, supervisord): the
web service runs them in a thread.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from popguard.control.service_control import control_for, services_of
from popguard.control.service_rows import status_row
from popguard.directory.directory import Directory
from popguard.directory.web_users import recent_actions
from popguard.errors import UserError
from popguard.health import api_client
from popguard.health.definitions import MonitorDefinition
from popguard.health.loader import find_item
from popguard.health.monitors import SEVERITY
from popguard.health.probes import STEP_MARK
from popguard.replication.copy_status_rows import status_rows

# The health sets a POP3 operator reads first, in this order; others (watched external
# servers, the operator's own sets) follow by name.
FIRST_SETS = ("POP", "POP.Protocol", "POP.Proxy")
UNANSWERED = "Unknown"  # a health service that did not answer: nothing is known
SQUARES = 60  # the probe screen's bar: its newest results
UPTIME_WINDOWS = (("1 h", 3600.0), ("24 h", 86_400.0), ("7 d", 7 * 86_400.0))
MAX_RESULTS = 20_000  # the health API's bound: a week of a 60 s probe fits


def worst(values: list[str]) -> str:
    return max(values, key=lambda v: SEVERITY.get(v, 0), default="Healthy")


def _set_order(name: str) -> tuple[int, str]:
    return (FIRST_SETS.index(name) if name in FIRST_SETS else len(FIRST_SETS), name.lower())


def open_alerts(alert_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in alert_rows if "RaisedTime" in r and not r.get("ResolvedTime")]


@dataclass
class Organization:
    servers: list[str]
    health_sets: list[str]
    cells: dict[tuple[str, str], str]  # (server, health set) -> AlertValue
    errors: dict[str, str]  # server -> why its health service did not answer
    databases: list[dict[str, Any]]
    alerts: list[dict[str, Any]]


def organization(data: Path, directory: Directory) -> Organization:
    """get-healthreport of every server, where each database is active, the open alerts."""
    report = api_client.ask_each(data, directory, None, "healthreport")
    servers = [s.name for s in directory.list_servers()]
    cells: dict[tuple[str, str], str] = {}
    errors: dict[str, str] = {}
    for row in report:
        if "Error" in row and "HealthSet" not in row:
            errors[row["Server"]] = row["Error"]
        else:
            cells[(row["Server"], row["HealthSet"])] = row["AlertValue"]
    sets = sorted({health_set for _, health_set in cells}, key=_set_order)
    copies = directory.database_copies()
    databases = [
        {
            "Name": name,
            "ActiveServer": next((c.server for c in copies if c.database == name and c.is_active),
                                 ""),
            "Copies": [c.server for c in copies if c.database == name],
        }
        for name in directory.list_databases()
    ]  # fmt: skip
    alerts = open_alerts(api_client.ask_each(data, directory, None, "alerts"))
    return Organization(servers, sets, cells, errors, databases, alerts)


@dataclass
class LadderStep:
    responder: str
    kind: str
    state: str
    after: float
    status: str  # done (its result) | ahead (in N s) | not reached


@dataclass
class MonitorView:
    row: dict[str, Any]
    ladder: list[LadderStep] = field(default_factory=list)

    @property
    def probe(self) -> str:
        return str(self.row.get("Probe", ""))


def _parse_time(text: str) -> float | None:
    if not text:
        return None
    return datetime.datetime.fromisoformat(text).timestamp()


def ladder_of(
    monitor_row: dict[str, Any], actions: list[dict[str, Any]], now: float
) -> tuple[str, list[LadderStep]]:
    """The monitor's probe, and its responders in ladder order with what each did on
    this alert, or how far ahead it is."""
    identity = f"{monitor_row['HealthSetName']}\\{monitor_row['Name']}"
    found = find_item(identity)
    if found is None or not isinstance(found[1], MonitorDefinition):
        return "", []
    health_set, monitor = found[0], found[1]
    first_alert = _parse_time(monitor_row.get("FirstAlertObservedTime") or "")
    steps = []
    responders = [r for r in health_set.responders if r.monitor == monitor.name]
    for responder in sorted(responders, key=lambda r: r.after):
        name = f"{health_set.name}\\{responder.name}"
        status = "not reached: the monitor is not alerting"
        if first_alert is not None:
            since = first_alert - 1
            mine = [a for a in actions if a.get("ResponderName") == name
                    and (_parse_time(a.get("StartTime") or "") or 0) >= since]  # fmt: skip
            if mine:
                last = mine[0]
                status = f"{last['Result']}: {last['Context']}".strip(": ")
            else:
                wait = first_alert + responder.after - now
                status = f"ahead, due in {wait:.0f}s" if wait > 0 else "due now"
        steps.append(LadderStep(name, responder.kind, responder.state, responder.after, status))
    return f"{health_set.name}\\{monitor.probe}", steps


@dataclass
class ServerView:
    name: str
    roles: tuple[str, ...]
    monitors: list[MonitorView]
    services: list[dict[str, Any]]
    components: list[dict[str, Any]]
    error: str = ""


def server(data: Path, directory: Directory, name: str) -> ServerView:
    """get-serverhealth, get-service and get-servercomponentstate of one server."""
    host = directory.get_server(name)
    error = ""
    try:
        rows: list[dict[str, Any]] = api_client.ask(data, directory, host.name, "GET",
                                                    "serverhealth")  # fmt: skip
        actions: list[dict[str, Any]] = api_client.ask(data, directory, host.name, "GET",
                                                       "recoveryactions")  # fmt: skip
    except UserError as exc:
        rows, actions, error = [], [], str(exc)
    actions.sort(key=lambda a: a.get("StartTime") or "", reverse=True)
    now = time.time()
    monitors = []
    for row in rows:
        probe, steps = ladder_of(row, actions, now)
        monitors.append(MonitorView(row | {"Probe": probe}, steps))
    control = control_for(data)
    try:
        statuses = control.status(host.name, services_of(host.roles))
        services = [
            status_row(s, control.name) | {"Restarts": s.unexpected_exits} for s in statuses
        ]
    except UserError as exc:
        services = [{"Server": host.name, "Name": "", "Status": "Unknown", "Detail": str(exc)}]
    components = [
        {"Component": s.component, "State": s.state, "Requesters": s.requesters}
        for s in directory.component_states(host.name)
    ]
    return ServerView(host.name, host.roles, monitors, services, components, error)


@dataclass
class Step:
    name: str
    component: str
    latency_ms: float | None
    lines: list[str]


@dataclass
class ProbeRun:
    started: str
    result_type: str
    latency_ms: float | None
    error: str
    failure_component: str
    failure_reason: str
    steps: list[Step]

    @property
    def colour(self) -> str:
        return {"Succeeded": "ok", "Failed": "bad", "TimedOut": "bad"}.get(self.result_type,
                                                                             "none")  # fmt: skip


def transcript_steps(text: str, total_ms: float | None) -> list[Step]:
    """A probe's transcript cut at its step marks ("@ 12.3 ms login [Auth]"), each step
    with the time to the next one (the last: to the end of the run)."""
    steps: list[Step] = [Step("start", "", None, [])]
    starts: list[float] = [0.0]
    for line in text.splitlines():
        if line.startswith(STEP_MARK):
            at, _, rest = line.removeprefix(STEP_MARK).partition(" ms ")
            name, _, component = rest.rpartition(" [")
            try:
                starts.append(float(at))
            except ValueError:
                steps[-1].lines.append(line)
                continue
            steps.append(Step(name or rest, component.rstrip("]"), None, []))
        else:
            steps[-1].lines.append(line)
    ends = [*starts[1:], total_ms]
    for step, start, end in zip(steps, starts, ends, strict=True):
        step.latency_ms = None if end is None else round(max(end - start, 0.0), 1)
    return [s for s in steps if s.lines or s.name != "start"]


@dataclass
class ProbeView:
    server: str
    identity: str
    resource: str
    runs: list[ProbeRun]  # the newest SQUARES, oldest first
    uptime: list[tuple[str, str]]  # (window, "99.5 %" or "no results")
    chart: str  # an inline SVG polyline's points
    chart_max: float


def probe(data: Path, directory: Directory, server_name: str, identity: str,
          resource: str) -> ProbeView:  # fmt: skip
    """The probe's results as invoke-monitoringprobe shows one, for a week."""
    week = UPTIME_WINDOWS[-1][1]
    now = time.time()
    query = (f"results?probe={_quote(identity)}&resource={_quote(resource)}"
             f"&limit={MAX_RESULTS}&since={now - week:.0f}")  # fmt: skip
    rows: list[dict[str, Any]] = api_client.ask(data, directory, server_name, "GET", query)
    runs = []
    for row in reversed(rows[:SQUARES]):
        # The times are whole seconds: the run's latency (SampleValue, in ms) ends its
        # last step, or that step's latency is not known.
        total = row["SampleValue"] if isinstance(row["SampleValue"], int | float) else None
        runs.append(
            ProbeRun(row["ExecutionStartTime"], row["ResultType"], row["SampleValue"],
                     row["Error"], row["FailureComponent"], row["FailureReason"],
                     transcript_steps(row["ExecutionContext"] or "", total))
        )  # fmt: skip
    uptime = []
    for label, seconds in UPTIME_WINDOWS:
        inside = [r for r in rows if (_parse_time(r["ExecutionStartTime"]) or 0) >= now - seconds]
        good = sum(1 for r in inside if r["ResultType"] == "Succeeded")
        uptime.append((label, f"{100 * good / len(inside):.1f} %" if inside else "no results"))
    latencies = [r.latency_ms or 0.0 for r in runs]
    top = max(latencies, default=0.0) or 1.0
    step = 100.0 / max(len(latencies) - 1, 1)
    points = " ".join(f"{i * step:.1f},{40 - 38 * v / top:.1f}" for i, v in enumerate(latencies))
    return ProbeView(server_name, identity, resource, runs, uptime, points, round(top, 1))


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


@dataclass
class RecoveryView:
    actions: list[dict[str, Any]]
    alerts: list[dict[str, Any]]
    ladders: list[tuple[dict[str, Any], list[LadderStep]]]  # alerting monitors, their ladder


def recovery(data: Path, directory: Directory) -> RecoveryView:
    """get-recoveryactions and get-alerts of every server, and the ladder still ahead
    of each monitor that is alerting."""
    actions = api_client.ask_each(data, directory, None, "recoveryactions")
    actions.sort(key=lambda a: a.get("StartTime") or "", reverse=True)
    alerts = api_client.ask_each(data, directory, None, "alerts")
    alerts.sort(key=lambda a: a.get("RaisedTime") or "", reverse=True)
    health = api_client.ask_each(data, directory, None, "serverhealth")
    now = time.time()
    ladders = []
    for row in health:
        if row.get("AlertValue") in ("Degraded", "Unhealthy", "Repairing"):
            mine = [a for a in actions if a.get("Server") == row["Server"]]
            _, steps = ladder_of(row, mine, now)
            ladders.append((row, steps))
    return RecoveryView(actions, alerts, ladders)


def copies(directory: Directory) -> list[dict[str, Any]]:
    """get-mailboxdatabasecopystatus, every copy."""
    return status_rows(directory, None, None)


def operator_actions(directory: Directory) -> list[dict[str, Any]]:
    return [
        {"Id": a.id, "Time": api_time(a.at), "User": a.user, "Action": a.action,
         "Target": a.target, "Reason": a.reason, "Result": a.result}
        for a in recent_actions(directory)
    ]  # fmt: skip


def api_time(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).isoformat(timespec="seconds")
