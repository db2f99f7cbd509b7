"""What operators set that changes the engine's work, read from the directory at most
once a second: monitoring overrides, monitors marked Repairing, and the external
POP3 servers this server watches. A busy directory or a broken file keeps the last
ones read."""

from __future__ import annotations

import logging
from pathlib import Path

from popguard.directory.directory import Directory, MonitoringOverride, Server
from popguard.directory.sql.engine import DIRECTORY_ERRORS, DirectoryUnavailable
from popguard.errors import UserError
from popguard.health.clock import Clock
from popguard.health.external import ExternalPop3Server, load_external
from popguard.health.overrides import effective_monitor, effective_probe
from popguard.health.server_plan import ServerPlan

log = logging.getLogger("popguard.health")


class Controls:
    def __init__(
        self, data: Path, server: Server, directory: Directory, clock: Clock, plan: ServerPlan
    ) -> None:
        self.data, self.server, self.directory, self.clock = data, server, directory, clock
        self.plan = plan
        self.overrides: list[MonitoringOverride] = []
        self.repairing: set[str] = set()
        self.external: list[ExternalPop3Server] = []
        self._read = -1e18

    def refresh(self, force: bool = False) -> None:
        """Overrides and repairing flags from the directory, at most once a second."""
        now = self.clock.now()
        if not force and now - self._read < 1.0:
            return
        try:
            self.overrides = self.directory.monitoring_overrides(self.server.name, now)
            self.repairing = self.directory.monitors_repairing(self.server.name)
        except DIRECTORY_ERRORS as exc:  # a busy or unreachable directory: keep the last ones
            if not isinstance(exc, DirectoryUnavailable):  # an outage is logged once, there
                log.warning("reading overrides failed: %s", exc)
            return
        try:
            self.external = [
                e for e in load_external(self.data)
                if e.watched_by.lower() == self.server.name.lower()
            ]  # fmt: skip
        except (UserError, OSError, ValueError) as exc:  # a broken file: keep what was there
            log.error("reading %s failed: %s", "health/external.toml", exc)
        self._read = now

    def enabled(self, monitor_key: str) -> bool:
        """Neither the monitor nor the probe it reads is disabled by an override."""
        monitor = self.plan.monitor_by_key.get(monitor_key)
        if monitor is None:
            return True
        health_set = monitor_key.split("\\", 1)[0]
        if not effective_monitor(monitor, monitor_key, self.overrides)[1]:
            return False
        probe = self.plan.probe_by_key.get(f"{health_set}\\{monitor.probe}")
        if probe is None:
            return True
        return effective_probe(probe, f"{health_set}\\{probe.name}", self.overrides)[1]
