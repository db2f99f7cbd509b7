"""Responder kinds: the repairs bound to a step of a monitor's ladder.

Each kind is one function with one signature, registered in RESPONDER_KINDS. The
engine decides *whether* to act (once per alert, within the throttle) and stores
every decision; a kind only acts and says what it did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UserError
from ..service_control import control_for

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
    that the problem still exists)."""
    health_set, probe, resource = engine.find_probe(
        f"{incident.health_set}\\{incident.probe}\\{incident.resource}"
    )
    (result,) = await engine.run_now(health_set, probe, resource)
    if result.succeeded:
        return Outcome("Skipped", "the probe succeeded when run again: the problem was transient")
    actions = engine.store.actions(since=incident.first_alert)
    history = "; ".join(
        f"{a.responder} {a.result}: {a.detail}" for a in actions if a.resource == incident.resource
    )
    detail = (
        f"ESCALATION {engine.server.name} {incident.health_set}\\{incident.monitor} on "
        f"{incident.resource}: {result.failure_component} {result.error}. "
        f"Done so far: {history or 'nothing'}"
    )
    engine.escalated(incident, result.failure_component, result.error, detail)
    return Outcome("Succeeded", detail)


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


ResponderKind = Callable[["HealthEngine", "ResponderDefinition", Incident], Awaitable[Outcome]]

RESPONDER_KINDS: dict[str, ResponderKind] = {
    "restart-service": restart_service,
    "escalate": escalate,
    "take-offline": take_offline,
}
