"""A service's row as get-service shows it (and the web page's server screen)."""

from __future__ import annotations

import datetime
from typing import Any

from popguard.control.service_control import ServiceStatus


def status_row(status: ServiceStatus, supervisor: str) -> dict[str, Any]:
    uptime = status.uptime_seconds
    return {
        "Server": status.server,
        "Name": status.service,
        "Status": status.state,
        "ProcessId": status.pid,
        # A master's worker processes (pop3, pop3be, delivery), each serving its ports.
        "Workers": " ".join(str(pid) for pid in status.workers),
        "Uptime": str(datetime.timedelta(seconds=int(uptime))) if uptime is not None else "",
        "Supervisor": supervisor,
        "Detail": status.detail,
    }
