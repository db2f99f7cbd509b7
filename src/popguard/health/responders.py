"""Responder kinds: the repairs bound to a step of a monitor's ladder.

Each kind is one function with one signature, registered in RESPONDER_KINDS. The
engine decides *whether* to act (once per alert, within the throttle) and stores
every decision; a kind only acts and says what it did.
"""

from __future__ import annotations

import asyncio
import csv
import datetime
import io
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import paths
from ..errors import UserError
from ..service_control import control_for
from ..switchover import Mover
from .results import results_file

if TYPE_CHECKING:
    from .definitions import ResponderDefinition
    from .engine import HealthEngine


@dataclass(frozen=True)
class Outcome:
    result: str  # Succeeded | Failed | Skipped
    detail: str


@dataclass(frozen=True)
class Incident:
    """What a responder answers: which monitor, on what, since when."""

    health_set: str
    monitor: str
    probe: str
    resource: str
    first_alert: float
    error: str


async def restart_service(
    engine: HealthEngine, responder: ResponderDefinition, incident: Incident
) -> Outcome:
    """Restart one service of this server (a new process; a hung one is killed)."""
    service = responder.service or ""

    def restart() -> Outcome:
        control = control_for(engine.data)
        (before,) = control.status(engine.server.name, [service])
        after = control.restart(engine.server.name, service)
        if after.state != "Running":
            return Outcome(
                "Failed", f"{service} is {after.state} after the restart: {after.detail}"
            )
        return Outcome(
            "Succeeded",
            f"restarted {service} through {control.name}: pid {before.pid} -> {after.pid}",
        )

    try:
        return await asyncio.to_thread(restart)
    except UserError as exc:
        return Outcome("Failed", str(exc))


async def escalate(
    engine: HealthEngine, responder: ResponderDefinition, incident: Incident
) -> Outcome:
    """Tell a person, once the probe, run again now, still fails (the runbook's check
    that the problem still exists). The alert is stored, then sent (e-mail, webhook)."""
    result = await engine.recheck(incident)
    if result is not None and result.succeeded:
        return Outcome("Skipped", "the probe succeeded when run again: the problem was transient")
    if result is None:  # the resource is not here now (a database moved away)
        latest = engine.latest_result(incident)
        component = latest.failure_component if latest else ""
        error = (latest.error if latest else "") or incident.error
        checked = "not run again: its target is not on this server now"
    else:
        component, error, checked = result.failure_component, result.error, "still fails"
    history = "; ".join(
        f"{a.responder} {a.result}: {a.detail}"
        for a in engine.store.actions(since=incident.first_alert)
        if a.resource == incident.resource and a.result != "InProgress"
    )
    detail = (
        f"ESCALATION {engine.server.name} {incident.health_set}\\{incident.monitor} on "
        f"{incident.resource}: {component} {error} (probe {checked}). "
        f"Done so far: {history or 'nothing'}"
    )
    notification = await engine.escalated(incident, component, error, detail)
    return Outcome("Succeeded", f"{detail}; {notification}")


async def take_offline(
    engine: HealthEngine, responder: ResponderDefinition, incident: Incident
) -> Outcome:
    """Set this front end's PopProxy Inactive (requester HealthApi), so that clients go
    to the others, but never the last front ends online: `keep_online` must remain."""
    directory = engine.directory
    others = [
        s.name
        for s in directory.list_servers()
        if "frontend" in s.roles
        and s.name.lower() != engine.server.name.lower()
        and directory.component_state(s.name, "PopProxy") == "Active"
    ]
    if len(others) < responder.keep_online:
        return Outcome(
            "Skipped",
            f"only {len(others)} other front end(s) online ({', '.join(others) or 'none'}); "
            f"{responder.keep_online} must stay, so {engine.server.name} stays in service",
        )
    directory.set_component_state(engine.server.name, "PopProxy", "Inactive", "HealthApi")
    return Outcome(
        "Succeeded",
        f"PopProxy on {engine.server.name} Inactive (HealthApi); online: {', '.join(others)}",
    )


def _active_here(engine: HealthEngine) -> list[str]:
    return [
        c.database
        for c in engine.directory.database_copies()
        if c.is_active and c.server.lower() == engine.server.name.lower()
    ]


async def _still_failing(engine: HealthEngine, incident: Incident) -> str:
    """'' when the probe, run again now, still fails (or cannot run here); else why not to act."""
    result = await engine.recheck(incident)
    if result is not None and result.succeeded:
        return "the probe succeeded when run again: nothing to repair"
    return ""


async def move_databases_away(
    engine: HealthEngine, responder: ResponderDefinition, incident: Incident
) -> Outcome:
    """Activate every database active here on its best healthy copy elsewhere, and allow
    no activation here until the server is healthy again. A database with no healthy
    copy elsewhere stays where it is: never without an active copy."""
    name = engine.server.name
    if "mailbox" not in engine.server.roles:
        return Outcome("Skipped", f"{name} is not a mailbox server: it holds no database")
    server = engine.directory.get_server(name)
    if server.activation_disabled:
        return Outcome(
            "Skipped",
            f"activation on {name} is already disabled (an operator's maintenance?): "
            "left as it is, and nothing will be moved back by popguard",
        )
    active = _active_here(engine)
    if not active:
        return Outcome("Skipped", f"{name} holds no active database copy")
    why = await _still_failing(engine, incident)
    if why:
        return Outcome("Skipped", why)
    engine.directory.set_mailbox_server(name, activation_disabled=True)
    results = await Mover(engine.data, engine.directory).move_all_away(name)
    moved = [f"{r.database} -> {r.target} ({r.seconds:.1f}s)" for r in results
             if r.status == "Succeeded"]  # fmt: skip
    stuck = [f"{r.database}: {r.error}" for r in results if r.status != "Succeeded"]
    detail = (
        f"moved {', '.join(moved) or 'nothing'}; activation on {name} disabled until it is "
        "healthy again"
    )
    if stuck and not moved:  # nothing changed: activation here is allowed again
        engine.directory.set_mailbox_server(name, activation_disabled=False)
        return Outcome("Failed", f"nothing moved, activation left allowed: {'; '.join(stuck)}")
    if stuck:
        return Outcome("Failed", f"{detail}; still active here: {'; '.join(stuck)}")
    return Outcome("Succeeded", detail)


def _restart_command(engine: HealthEngine) -> list[str]:
    # A second's pause lets this action be stored before this health service, one of
    # the services restarted, stops.
    return [
        "/bin/sh", "-c", 'sleep 1 && exec "$0" "$@"', sys.executable, "-m", "popguard",
        "--data", str(engine.data), "restart-server", engine.server.name,
    ]  # fmt: skip


def _start_detached(command: list[str], log_file: Path) -> int:
    with open(log_file, "ab") as output:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this process and its process group
        )
    return process.pid


async def restart_server(
    engine: HealthEngine, responder: ResponderDefinition, incident: Incident
) -> Outcome:
    """Restart every service of this server (its health service too), but never while it
    holds an active database copy. It runs as its own process, since this one stops."""
    active = _active_here(engine)
    if active:
        return Outcome(
            "Skipped",
            f"{engine.server.name} holds the active copy of {', '.join(active)}: a server is "
            "never restarted while it does",
        )
    why = await _still_failing(engine, incident)
    if why:
        return Outcome("Skipped", why)
    log_file = results_file(engine.data, engine.server.name).parent / "restart-server.log"
    pid = await asyncio.to_thread(_start_detached, _restart_command(engine), log_file)
    return Outcome(
        "Succeeded",
        f"restarting every service of {engine.server.name} (pid {pid}, output in "
        f"{log_file}); this health service restarts too and resumes the alert",
    )


async def move_back(
    engine: HealthEngine, responder: ResponderDefinition, incident: Incident
) -> Outcome:
    """Once this server is healthy again (every service running, its own probes
    succeed), allow activation here again and move back the databases that prefer it."""
    if not engine.moved_away(incident):
        return Outcome("Skipped", "no database was moved away during this alert")
    problems = await engine.server_problems()
    if problems:
        return Outcome(
            "Skipped",
            f"{engine.server.name} is not healthy yet ({'; '.join(problems)}): the databases "
            "stay on their other copies",
        )
    name = engine.server.name
    engine.directory.set_mailbox_server(name, activation_disabled=False)
    results = await Mover(engine.data, engine.directory).move_preferred_back(name)
    moved = [f"{r.database} -> {r.target}" for r in results if r.status == "Succeeded"]
    stuck = [f"{r.database}: {r.error}" for r in results if r.status != "Succeeded"]
    detail = f"activation on {name} allowed again; moved back {', '.join(moved) or 'nothing'}"
    if stuck:
        return Outcome("Failed", f"{detail}; not moved: {'; '.join(stuck)}")
    return Outcome("Succeeded", detail)


PROTOCOL_LOG_APPLIED = 2.5  # seconds: the services read their settings every second


async def protocol_logging(
    engine: HealthEngine, responder: ResponderDefinition, incident: Incident
) -> Outcome:
    """Turn protocol logging on for this server, run the probe again, keep the log lines
    of its session in this action, and turn logging off again (if it was off)."""
    name = engine.server.name
    directory = engine.directory
    settings, _ = directory.pop_settings(name)
    was_on = settings.ProtocolLogEnabled
    if not was_on:
        directory.set_pop_settings(name, settings.with_changes({"ProtocolLogEnabled": True}))
    try:
        await asyncio.sleep(PROTOCOL_LOG_APPLIED)
        began = time.time()
        result = await engine.recheck(incident)
        await asyncio.sleep(0.2)  # the last lines are flushed per line; be generous
        folder = (
            Path(settings.LogFileLocation)
            if settings.LogFileLocation
            else paths.default_protocol_log_dir(engine.data, name, responder.service or "pop3")
        )
        lines = session_lines(folder, began - 0.5, engine.server.address)
    finally:
        if not was_on:
            current, _ = directory.pop_settings(name)
            directory.set_pop_settings(name, current.with_changes({"ProtocolLogEnabled": False}))
    outcome = "not run (its target is not here)" if result is None else result.result_type
    error = f": {result.failure_component} {result.error}" if result and result.error else ""
    logging_note = "left on (it was on)" if was_on else "on for this probe, off again"
    detail = (
        f"protocol logging {logging_note}; probe {outcome}{error}; "
        f"{len(lines)} log line(s) of its session:\n" + "\n".join(lines[-MAX_LOG_LINES:])
    )
    return Outcome("Succeeded" if lines else "Failed", detail)


MAX_LOG_LINES = 40


def session_lines(folder: Path, since: float, client_host: str) -> list[str]:
    """Protocol log lines written since `since` for sessions from `client_host` (the
    probe connects from the server's own address)."""
    lines = []
    for path in sorted(folder.glob("*.LOG")):
        try:
            if path.stat().st_mtime < since:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for row in csv.reader(io.StringIO(text)):
            if not row or row[0].startswith("#") or len(row) < 5:
                continue
            try:
                moment = datetime.datetime.fromisoformat(row[0].replace("Z", "+00:00"))
            except ValueError:
                continue
            if moment.timestamp() >= since and row[4].rsplit(":", 1)[0].strip("[]") == client_host:
                lines.append(",".join(row))
    return lines


ResponderKind = Callable[["HealthEngine", "ResponderDefinition", Incident], Awaitable[Outcome]]

RESPONDER_KINDS: dict[str, ResponderKind] = {
    "restart-service": restart_service,
    "escalate": escalate,
    "take-offline": take_offline,
    "move-databases-away": move_databases_away,
    "restart-server": restart_server,
    "move-back": move_back,
    "protocol-logging": protocol_logging,
}
