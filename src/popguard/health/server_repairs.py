"""The repairs that take a whole mailbox server out of service and back: move its
active databases away, restart it, move them back once it is healthy.

Safety rules, each checked where it acts: a database moves only to a healthy copy
(never left without an active copy); a server is restarted only while it holds no
active copy and no move into it is under way; databases come back only when every
service runs, no monitor alerts about what is still here, and the server's own
probes succeed, and each is checked there at once: one that fails goes away again
and waits HOLD seconds before another try.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from popguard.control.service_control import SystemdControl, control_for
from popguard.health.incidents import Incident, Outcome
from popguard.replication.switchover import Mover

if TYPE_CHECKING:
    from popguard.health.definitions import ResponderDefinition
    from popguard.health.repair_context import RepairContext

HOLD = 3600.0  # seconds a database that failed its check after a move back stays away


def active_here(context: RepairContext) -> list[str]:
    return [
        c.database
        for c in context.directory.database_copies()
        if c.is_active and c.server.lower() == context.server.name.lower()
    ]


async def why_not_act(context: RepairContext, incident: Incident, needs_target: bool) -> str:
    """'' when the probe, run again now, still fails; else why this step does nothing.
    Without a target here (a database moved away) a step that needs one does nothing."""
    again = await context.check_again(incident)
    if again.fails is False:
        return "the probe succeeded when run again: nothing to repair"
    if again.result is None and needs_target:
        return f"{incident.resource} is not on {context.server.name} now: nothing to act on here"
    return ""


async def move_databases_away(
    context: RepairContext, responder: ResponderDefinition, incident: Incident
) -> Outcome:
    """Activate every database active here on its best healthy copy elsewhere, and allow
    no activation here until the databases come back. A database with no healthy copy
    elsewhere stays where it is: never without an active copy."""
    async with context.moves_lock:
        return await _move_databases_away(context, incident)


async def _move_databases_away(context: RepairContext, incident: Incident) -> Outcome:
    name = context.server.name
    if "mailbox" not in context.server.roles:
        return Outcome("Skipped", f"{name} is not a mailbox server: it holds no database")
    if context.directory.get_server(name).activation_disabled:
        return Outcome(
            "Skipped",
            f"activation on {name} is already disabled (an operator's maintenance?): left as it is",
        )
    if not active_here(context):
        return Outcome("Skipped", f"{name} holds no active database copy")
    why = await why_not_act(context, incident, needs_target=True)
    if why:
        return Outcome("Skipped", why)
    context.directory.set_mailbox_server(name, activation_disabled=True)
    results = await Mover(context.tls, context.directory).move_all_away(name)
    moved = [r for r in results if r.status == "Succeeded"]
    for result in moved:  # owed back once this server is healthy
        context.store.owe(result.database, result.target, context.clock.now())
    stuck = [f"{r.database}: {r.error}" for r in results if r.status != "Succeeded"]
    if stuck and not moved:  # nothing changed: activation here is allowed again
        context.directory.set_mailbox_server(name, activation_disabled=False)
        return Outcome("Failed", f"nothing moved, activation left allowed: {'; '.join(stuck)}")
    detail = (
        f"moved {', '.join(f'{r.database} -> {r.target} ({r.seconds:.1f}s)' for r in moved)}; "
        f"activation on {name} disabled until they come back"
    )
    if stuck:
        return Outcome("Failed", f"{detail}; still active here: {'; '.join(stuck)}")
    return Outcome("Succeeded", detail)


def _restart_command(context: RepairContext) -> list[str]:
    # A second's pause lets this action be stored before this health service, one of
    # the services restarted, stops.
    return [
        "/bin/sh", "-c", 'sleep 1 && exec "$0" "$@"', sys.executable, "-m", "popguard",
        "--data", str(context.data), "restart-server", context.server.name,
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


def _restart_through_systemd(server: str) -> str:
    """systemd restarts the target itself (--no-block): a child of this service would
    be killed with its cgroup when this service stops."""
    unit = f"popguard@{server}.target"
    done = subprocess.run(
        ["systemctl", "--no-block", "restart", unit], capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0:
        return f"systemctl restart {unit} failed: {done.stderr.strip()}"
    return ""


async def restart_server(
    context: RepairContext, responder: ResponderDefinition, incident: Incident
) -> Outcome:
    """Restart every service of this server (its health service too), but never while it
    holds an active database copy or one is moving to it."""
    why = await why_not_act(context, incident, needs_target=False)
    if why:
        return Outcome("Skipped", why)
    # Checked after the probe ran (an await): a move may have landed meanwhile.
    active = active_here(context)
    if active:
        return Outcome(
            "Skipped",
            f"{context.server.name} holds the active copy of {', '.join(active)}: a server is "
            "never restarted while it does",
        )
    moving = [
        c.database
        for c in context.directory.database_copies()
        if c.server.lower() == context.server.name.lower()
        and context.directory.move_in_progress(c.database)
    ]
    if moving:
        return Outcome("Skipped", f"a move of {', '.join(moving)} is under way")
    control = await asyncio.to_thread(control_for, context.data)
    if isinstance(control, SystemdControl):
        failed = await asyncio.to_thread(_restart_through_systemd, context.server.name)
        if failed:
            return Outcome("Failed", failed)
        return Outcome("Succeeded", f"systemd restarts popguard@{context.server.name}.target")
    log_file = context.folder.health_dir() / "restart-server.log"
    pid = await asyncio.to_thread(_start_detached, _restart_command(context), log_file)
    return Outcome(
        "Succeeded",
        f"restarting every service of {context.server.name} (pid {pid}, output in "
        f"{log_file}); this health service restarts too and resumes the alert",
    )


async def move_back(
    context: RepairContext, responder: ResponderDefinition, incident: Incident
) -> Outcome:
    """The ladder's step: bring back what was moved away, if the server is healthy."""
    outcome = await return_databases(context, ladder_step=True)
    assert outcome is not None
    return outcome


async def return_databases(context: RepairContext, ladder_step: bool) -> Outcome | None:
    """Move back the databases owed to this server, once it is healthy; check each at
    once and send one that fails away again. None: nothing to do and nothing worth
    recording (outside a ladder's step, which records why it did nothing)."""
    async with context.moves_lock:
        return await _return_databases(context, ladder_step)


async def _return_databases(context: RepairContext, ladder_step: bool) -> Outcome | None:
    name = context.server.name
    now = context.clock.now()
    owed = context.store.owed()
    here = {d.lower() for d in active_here(context)}
    for database in [d for d in owed if d.lower() in here]:  # already back
        context.store.paid(database)
        del owed[database]
    if not owed:
        return _skipped("no database is owed back to this server", ladder_step)
    if not context.directory.get_server(name).activation_disabled:
        context.store.paid()  # an operator allowed activation again: theirs now
        return Outcome(
            "Skipped",
            f"an operator allowed activation on {name} again: {', '.join(owed)} stay where "
            "they are",
        )
    ready = [d for d, until in owed.items() if until <= now]
    if not ready:
        return _skipped("every owed database waits after a failed try", ladder_step)
    problems = await context.server_problems(ladder_step)
    if problems:
        return _skipped(
            f"{name} is not healthy yet ({'; '.join(problems)}): the databases stay on "
            "their other copies",
            ladder_step,
        )
    mover = Mover(context.tls, context.directory)
    context.directory.set_mailbox_server(name, activation_disabled=False)
    back, notes = [], []
    for database in ready:
        source = context.directory.active_server(database)
        result = await mover.try_move(database, source, name, "")
        if result.status == "Succeeded":
            back.append(database)
        else:
            notes.append(f"{database} not moved back: {result.error}")
    failing = await context.databases_fail_here(back)
    sent_away = []
    # One database may fail more than one probe: each goes away once.
    for database in dict.fromkeys(f.split(":", 1)[0] for f in failing):
        target, why = mover.best_copy_elsewhere(database, name)
        if target is None:
            notes.append(f"{database} fails here but has no healthy copy elsewhere: {why}")
            continue
        again = await mover.try_move(database, name, target, "")
        sent_away.append(f"{database} -> {target}" if again.status == "Succeeded" else
                         f"{database} (could not move: {again.error})")  # fmt: skip
        context.store.hold(database, context.clock.now() + HOLD)
    for database in back:
        if not any(f.startswith(f"{database}:") for f in failing):
            context.store.paid(database)
    if failing:
        context.directory.set_mailbox_server(name, activation_disabled=True)
        return Outcome(
            "Failed",
            f"moved back {', '.join(back) or 'nothing'}, but on {name} {'; '.join(failing)}: "
            f"sent away again ({', '.join(sent_away) or 'none'}), next try in {HOLD:.0f}s"
            + (f"; {'; '.join(notes)}" if notes else ""),
        )
    if context.store.owed():  # some could not move: activation stays disabled for them
        context.directory.set_mailbox_server(name, activation_disabled=True)
    detail = f"{name} is healthy: moved back {', '.join(back) or 'nothing'}"
    return Outcome("Failed" if notes else "Succeeded", "; ".join([detail, *notes]))


def _skipped(why: str, record: bool) -> Outcome | None:
    return Outcome("Skipped", why) if record else None
