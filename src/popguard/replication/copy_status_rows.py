"""The rows of get-mailboxdatabasecopystatus: each copy's status, queue lengths and
error, as the command and the web page's copies screen both show them."""

from __future__ import annotations

import datetime
from typing import Any

from popguard.directory.directory import Directory
from popguard.errors import UserError
from popguard.replication.switchover import copy_status


def copy_identity(value: str) -> tuple[str, str]:
    database, sep, server = value.partition("\\")
    if not sep or not database or not server:
        raise UserError(f"a copy is named DATABASE\\SERVER, got '{value}'")
    return database, server


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


def status_rows(
    directory: Directory, server: str | None, identity: str | None
) -> list[dict[str, Any]]:
    if server is not None:
        server = directory.get_server(server).name
    wanted = copy_identity(identity) if identity else None
    copies = directory.database_copies(wanted[0] if wanted else None)
    reports = directory.copy_status_reports()
    now = datetime.datetime.now(datetime.UTC).timestamp()
    rows = []
    for copy in copies:
        if server is not None and copy.server.lower() != server.lower():
            continue
        if wanted is not None and copy.server.lower() != wanted[1].lower():
            continue
        report = reports.get((copy.database, copy.server))
        status = copy_status(copy, reports, now)
        fresh = status != "ServiceDown"
        active = next(c.server for c in copies if c.database == copy.database and c.is_active)
        rows.append(
            {
                "Name": f"{copy.database}\\{copy.server}",
                "Status": status,
                "CopyQueueLength": report.copy_queue_length if report and fresh else None,
                "ReplayQueueLength": report.replay_queue_length if report and fresh else None,
                "LastInspectedLogTime": _when(report.last_inspected_log_time if report else None),
                "ActivationPreference": copy.activation_preference,
                "ActiveDatabaseCopy": active,
                "LogSequenceNumber": report.applied_lsn if report else None,
                # Octets, as last measured by the copy's replication service.
                "DatabaseSize": report.database_size if report else None,
                "MessageBytes": report.message_bytes if report else None,
                "LogBytes": report.log_bytes if report else None,
                # Acknowledgements wait for this copy; Active Manager may activate it.
                "Synchronous": copy.synchronous,
                "ErrorMessage": (report.error or "")
                if report and fresh
                else (
                    f"no report from the replication service of {copy.server} "
                    f"for {int(now - report.reported)}s"
                    if report
                    else f"no report yet from the replication service of {copy.server}"
                ),
            }
        )
    if wanted is not None and not rows:
        raise UserError(f"no copy {identity}")
    return rows
