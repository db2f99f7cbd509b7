"""The runbook's actions an operator takes from the web page, each through the code
path of its command, each recorded in the directory with who did it and why.

Blocking (the health APIs, supervisord, a move): the web service runs them in a thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from popguard.control.service_control import SupervisorControl, control_for, services_of
from popguard.directory.directory import COMPONENT_STATES, Directory
from popguard.directory.web_users import MAX_REASON_LENGTH, record_action
from popguard.errors import UserError
from popguard.health import api_client
from popguard.health.overrides import new_override
from popguard.net.tls import TlsMaterial
from popguard.replication.switchover import Mover

MAINTENANCE_COMPONENT = "PopProxy"
MAINTENANCE_REQUESTER = "Maintenance"


@dataclass(frozen=True)
class Done:
    id: int  # the recorded action
    result: str


def _field(form: Mapping[str, str], name: str) -> str:
    value = form.get(name, "").strip()
    if not value:
        raise UserError(f"{name} is required")
    return value


def _reason(form: Mapping[str, str]) -> str:
    reason = form.get("reason", "").strip()
    if not reason:
        raise UserError("say why (reason): every action is recorded with who and why")
    if len(reason) > MAX_REASON_LENGTH:
        raise UserError(f"a reason has at most {MAX_REASON_LENGTH} characters")
    return reason


def invoke_probe(data: Path, directory: Directory, form: Mapping[str, str]) -> tuple[str, str]:
    """invoke-monitoringprobe IDENTITY --server SERVER."""
    server, identity = _field(form, "server"), _field(form, "identity")
    rows = api_client.ask(data, directory, server, "POST", "invoke", {"identity": identity})
    results = ", ".join(
        f"{r['MonitorIdentity']}: {r['ResultType']}"
        + (f" ({r['FailureComponent']}: {r['Error']})" if r["ResultType"] != "Succeeded" else "")
        for r in rows
    )
    return f"{identity} on {server}", results


def restart_service(data: Path, directory: Directory, form: Mapping[str, str]) -> tuple[str, str]:
    """restart-service SERVICE --server SERVER, on this host's supervisor."""
    host = directory.get_server(_field(form, "server"))
    service = _field(form, "service")
    if service not in services_of(host.roles):
        raise UserError(f"{host.name} runs {', '.join(services_of(host.roles))}; not {service}")
    control = control_for(data)
    if isinstance(control, SupervisorControl) and not control.runs(host.name):
        raise UserError(f"{host.name} runs on no supervisor of this host")
    status = control.restart(host.name, service)
    # A master's restart is new workers under the same master: name them, since the
    # master's process id does not change.
    workers = f", workers {' '.join(map(str, status.workers))}" if status.workers else ""
    return f"{service} on {host.name}", f"{status.state}, process id {status.pid}{workers}"


def move_database(data: Path, directory: Directory, form: Mapping[str, str]) -> tuple[str, str]:
    """move-activemailboxdatabase DATABASE --activate-on-server SERVER, once confirmed."""
    database, target = _field(form, "database"), _field(form, "server")
    if form.get("confirm") != "yes":
        raise UserError(f"moving {database} to {target} needs its confirmation box ticked")
    active = next((c for c in directory.database_copies(database) if c.is_active), None)
    if active is not None and active.server.lower() == target.lower():
        return f"{database} to {target}", f"NotMoved: already active on {active.server}"
    mover = Mover(TlsMaterial.of(data), directory)
    result = asyncio.run(mover.move(database, target, False))
    text = result.status + (f": {result.error}" if result.error else "")
    return f"{database} to {target}", text


def maintenance(data: Path, directory: Directory, form: Mapping[str, str]) -> tuple[str, str]:
    """set-servercomponentstate SERVER --component PopProxy --requester Maintenance, and
    optionally add-servermonitoringoverride MONITOR --property-name Enabled false for a
    duration."""
    server = directory.get_server(_field(form, "server")).name
    state = _field(form, "state")
    if state not in COMPONENT_STATES:
        raise UserError(f"a component state is one of {', '.join(COMPONENT_STATES)}")
    parts = []
    monitor = form.get("monitor", "").strip()
    if monitor:
        duration = _field(form, "duration")
        override = new_override(
            server, monitor, "Monitor", "Enabled", "false", duration, time.time()
        )
        directory.add_monitoring_override(override)
        parts.append(f"{override.identity} disabled on {server} for {duration}")
    directory.set_component_state(server, MAINTENANCE_COMPONENT, state, MAINTENANCE_REQUESTER)
    effective = directory.component_state(server, MAINTENANCE_COMPONENT)
    parts.insert(0, f"{MAINTENANCE_COMPONENT}: Maintenance says {state}; now {effective}")
    return server, "; ".join(parts)


def acknowledge(
    data: Path, directory: Directory, form: Mapping[str, str], user: str
) -> tuple[str, str]:
    server, alert = _field(form, "server"), _field(form, "alert")
    body = {"id": alert, "by": user, "reason": _reason(form)}
    api_client.ask(data, directory, server, "POST", "acknowledge", body)
    return f"alert {alert} on {server}", "acknowledged: its repeats stop until it is over"


Action = Callable[[Path, Directory, Mapping[str, str]], tuple[str, str]]
ACTIONS: dict[str, Action] = {
    "invoke-monitoringprobe": invoke_probe,
    "restart-service": restart_service,
    "move-activemailboxdatabase": move_database,
    "maintenance": maintenance,
}
ACKNOWLEDGE = "acknowledge-alert"


def run(data: Path, name: str, form: Mapping[str, str], user: str) -> Done:
    """Run one action and record it, done or refused: the feed shows both."""
    reason = _reason(form)
    with Directory(data) as directory:
        try:
            if name == ACKNOWLEDGE:
                target, result = acknowledge(data, directory, form, user)
            elif name in ACTIONS:
                target, result = ACTIONS[name](data, directory, form)
            else:
                raise UserError(f"no action {name!r}")
        except UserError as exc:
            record_action(directory, user, name, form.get("server", ""), reason, f"refused: {exc}")
            raise
        action_id = record_action(directory, user, name, target, reason, result)
    return Done(action_id, result)
