"""Protocol logging for one failing probe run: the runbook's diagnosis step for PopCTP.

Logging is turned on for the server (the services apply settings within a second),
the probe runs again, the lines its session wrote are kept in the recovery action,
and logging is turned off again if it was off. Only what the log files gained
during the run is read, off the event loop.
"""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

from popguard.health.incidents import Incident, Outcome
from popguard.paths import ServerFolder

if TYPE_CHECKING:
    from popguard.health.definitions import ResponderDefinition
    from popguard.health.repair_context import RepairContext


def marker_file(folder: ServerFolder) -> Path:
    """Present while protocol logging is on for a diagnosis: a health service that
    stops meanwhile turns it off when it starts again."""
    return folder.health_dir() / "protocol-logging-on"


def undo_interrupted(context: RepairContext) -> bool:
    """Turn off protocol logging a stopped diagnosis left on; whether there was one."""
    marker = marker_file(context.folder)
    if not marker.exists():
        return False
    settings, _ = context.directory.pop_settings(context.server.name)
    context.directory.set_pop_settings(
        context.server.name, settings.with_changes({"ProtocolLogEnabled": False})
    )
    marker.unlink(missing_ok=True)
    return True


SETTINGS_APPLIED = 2.5  # seconds: the services read their settings every second
MAX_LINES = 40


def log_sizes(folder: Path) -> dict[Path, int]:
    sizes = {}
    for path in folder.glob("*.LOG"):
        try:
            sizes[path] = path.stat().st_size
        except OSError:
            continue
    return sizes


def lines_since(folder: Path, before: dict[Path, int], client_host: str) -> list[str]:
    """The lines added since `before` (file -> size) by sessions from `client_host` (a
    probe connects from its server's own address)."""
    lines = []
    for path in sorted(folder.glob("*.LOG")):
        try:
            with open(path, encoding="utf-8", errors="replace", newline="") as handle:
                handle.seek(before.get(path, 0))
                added = handle.read()
        except OSError:
            continue
        for row in csv.reader(io.StringIO(added)):
            if not row or row[0].startswith("#") or len(row) < 5:
                continue
            if row[4].rsplit(":", 1)[0].strip("[]") == client_host:
                lines.append(",".join(row))
    return lines


async def protocol_logging(
    context: RepairContext, responder: ResponderDefinition, incident: Incident
) -> Outcome:
    name = context.server.name
    directory = context.directory
    settings, _ = directory.pop_settings(name)
    was_on = settings.ProtocolLogEnabled
    folder = (
        Path(settings.LogFileLocation)
        if settings.LogFileLocation
        else context.folder.default_protocol_log_dir(responder.service or "pop3")
    )
    marker = marker_file(context.folder)
    if not was_on:
        marker.touch()
        directory.set_pop_settings(name, settings.with_changes({"ProtocolLogEnabled": True}))
    try:
        await asyncio.sleep(SETTINGS_APPLIED)
        before = await asyncio.to_thread(log_sizes, folder)
        again = await context.check_again(incident)
        await asyncio.sleep(0.2)  # each line is flushed as written; a margin all the same
        lines = await asyncio.to_thread(lines_since, folder, before, context.server.address)
    finally:
        if not was_on:
            current, _ = directory.pop_settings(name)
            directory.set_pop_settings(name, current.with_changes({"ProtocolLogEnabled": False}))
            marker.unlink(missing_ok=True)
    result = again.result
    ran = "not run (its target is not here)" if result is None else result.result_type
    error = f": {result.failure_component} {result.error}" if result and result.error else ""
    logging_note = "left on (it was on)" if was_on else "on for this probe, off again"
    detail = (
        f"protocol logging {logging_note}; probe {ran}{error}; {len(lines)} log line(s) of "
        f"its session in {folder}:\n" + "\n".join(lines[-MAX_LINES:])
    )
    return Outcome("Succeeded" if lines else "Failed", detail)
