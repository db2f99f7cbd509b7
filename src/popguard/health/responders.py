"""Responder kinds: the repairs bound to a step of a monitor's ladder.

Each kind is one function with one signature, registered in RESPONDER_KINDS. The
engine decides *whether* to act (once per alert, within the throttle) and stores
every decision; a kind only acts and says what it did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from popguard.control.service_control import control_for
from popguard.errors import UserError
from popguard.health.diagnosis import protocol_logging
from popguard.health.incidents import Incident, Outcome, Recheck
from popguard.health.probes import NETWORKING
from popguard.health.server_repairs import (
    move_back,
    move_databases_away,
    restart_server,
    return_databases,
)

RESTARTED_SETTLE = 1.0  # seconds for a new process to listen before its probe runs again
# A new process may take longer than that to listen on a loaded machine: while the probe
# run again cannot even connect, it runs again every RESTARTED_SETTLE, this long at most.
RESTARTED_LISTEN = 15.0

if TYPE_CHECKING:
    from popguard.health.definitions import ResponderDefinition
    from popguard.health.repair_context import RepairContext


async def restart_service(
    context: RepairContext, responder: ResponderDefinition, incident: Incident
) -> Outcome:
    """Restart one service of this server: a new process. One that stopped answering
    (its probe timed out) is killed at once, not stopped gracefully: its sessions are
    lost anyway, and a hung process would only wait out the grace. Then the probe runs
    again at once, so that the monitor sees the repair without waiting for its turn."""
    service = responder.service or ""
    latest = context.latest_result(incident)
    hung = latest is not None and latest.result_type == "TimedOut"

    def restart() -> Outcome:
        control = control_for(context.data)
        (before,) = control.status(context.server.name, [service])
        if hung:
            after = control.kill(context.server.name, service)
        else:
            after = control.restart(context.server.name, service)
        if after.state != "Running":
            return Outcome(
                "Failed", f"{service} is {after.state} after the restart: {after.detail}"
            )
        how = "killed (it did not answer) and started" if hung else "restarted"
        return Outcome(
            "Succeeded",
            f"{how} {service} through {control.name}: pid {before.pid} -> {after.pid}",
        )

    try:
        outcome = await asyncio.to_thread(restart)
    except UserError as exc:
        return Outcome("Failed", str(exc))
    if outcome.result == "Succeeded":
        again = await check_restarted(context, incident)
        if again.fails is not None:
            seen = "still fails" if again.fails else "succeeds"
            outcome = Outcome(
                outcome.result, f"{outcome.detail}; the probe run again {seen}", again.fails
            )
    return outcome


async def check_restarted(context: RepairContext, incident: Incident) -> Recheck:
    """The probe run again after a restart, judged once the new process can answer. A
    connection that does not open (Networking) right after a restart says only that the
    new process does not listen yet, not that the restart did not help: judged so, the
    next step would hurry (move the databases away) from a repaired server. Any answer,
    even -ERR, is judged at once, and so is a process still not listening after
    RESTARTED_LISTEN seconds."""
    waited = 0.0
    while True:
        await context.clock.sleep(RESTARTED_SETTLE)
        waited += RESTARTED_SETTLE
        again = await context.check_again(incident)
        silent = again.result is not None and again.result.failure_component == NETWORKING
        if not (again.fails and silent) or waited >= RESTARTED_LISTEN:
            return again


async def escalate(
    context: RepairContext, responder: ResponderDefinition, incident: Incident
) -> Outcome:
    """Tell a person, once the probe, run again now, still fails (the runbook's check
    that the problem still exists). The alert is stored, then sent (e-mail, webhook)."""
    again = await context.check_again(incident)
    result = again.result
    if again.fails is False:
        return Outcome("Skipped", "the probe succeeded when run again: the problem was transient")
    if result is None:  # the resource is not here now (a database moved away)
        latest = context.latest_result(incident)
        component = latest.failure_component if latest else ""
        error = (latest.error if latest else "") or incident.error
        checked = "not run again: its target is not on this server now"
    else:
        component, error, checked = result.failure_component, result.error, "still fails"
    history = "; ".join(
        f"{a.responder} {a.result}: {a.detail}"
        for a in context.store.actions(since=incident.first_alert)
        if a.resource == incident.resource and a.result != "InProgress"
    )
    summary = (
        f"ESCALATION {context.server.name} {incident.health_set}\\{incident.monitor} on "
        f"{incident.resource}: {component} {error} (probe {checked})"
    )
    # The alert keeps the history; this action, one of that history, does not repeat it.
    detail = f"{summary}. Done so far: {history or 'nothing'}"
    notification = context.escalated(incident, component, error, detail)
    return Outcome("Succeeded", f"{summary}; alert {notification}")


async def take_offline(
    context: RepairContext, responder: ResponderDefinition, incident: Incident
) -> Outcome:
    """Set this front end's PopProxy Inactive (requester HealthApi), so that clients go
    to the others, but never the last front ends online: `keep_online` must remain."""
    directory = context.directory
    others = [
        s.name
        for s in directory.list_servers()
        if "frontend" in s.roles
        and s.name.lower() != context.server.name.lower()
        and directory.component_state(s.name, "PopProxy") == "Active"
    ]
    if len(others) < responder.keep_online:
        return Outcome(
            "Skipped",
            f"only {len(others)} other front end(s) online ({', '.join(others) or 'none'}); "
            f"{responder.keep_online} must stay, so {context.server.name} stays in service",
        )
    directory.set_component_state(context.server.name, "PopProxy", "Inactive", "HealthApi")
    return Outcome(
        "Succeeded",
        f"PopProxy on {context.server.name} Inactive (HealthApi); online: {', '.join(others)}",
    )


ResponderKind = Callable[["RepairContext", "ResponderDefinition", Incident], Awaitable[Outcome]]

RESPONDER_KINDS: dict[str, ResponderKind] = {
    "restart-service": restart_service,
    "escalate": escalate,
    "take-offline": take_offline,
    "move-databases-away": move_databases_away,
    "restart-server": restart_server,
    "move-back": move_back,
    "protocol-logging": protocol_logging,
}

__all__ = ["RESPONDER_KINDS", "Incident", "Outcome", "Recheck", "return_databases"]
