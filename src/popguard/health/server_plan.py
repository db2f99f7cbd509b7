"""What of the health sets runs on one server: the probes its roles call for, the
monitors that read them, and each monitor's responders in ladder order, found by
their 'HealthSet\\Name' keys. Plain data, fixed when the engine starts."""

from __future__ import annotations

from popguard.directory.directory import Server
from popguard.errors import UserError
from popguard.health.definitions import (
    HealthSet,
    MonitorDefinition,
    ProbeDefinition,
    ResponderDefinition,
)

LADDER_ORDER = {"Healthy": 0, "Degraded": 1, "Unhealthy": 2, "Unrecoverable": 3}


class ServerPlan:
    def __init__(self, server: Server, health_sets: list[HealthSet]) -> None:
        self.server = server
        self.health_sets = [s for s in health_sets if s.applies_to(server.roles)]
        self.service_of = {
            f"{s.name}\\{r.name}": r.service for s in self.health_sets for r in s.responders
        }
        self.probe_by_key = {f"{s.name}\\{p.name}": p for s, p in self.probes()}
        self.monitor_by_key = {
            f"{s.name}\\{m.name}": m for s in self.health_sets for m in s.monitors
        }
        self.monitors_of_probe: dict[tuple[str, str], list[MonitorDefinition]] = {}
        for health_set in self.health_sets:
            for monitor in health_set.monitors:
                key = (health_set.name, monitor.probe)
                self.monitors_of_probe.setdefault(key, []).append(monitor)
        self.responders_of: dict[str, list[tuple[HealthSet, ResponderDefinition]]] = {}
        for health_set in self.health_sets:
            for responder in health_set.responders:
                if responder.role is None or responder.role in server.roles:
                    monitor_key = f"{health_set.name}\\{responder.monitor}"
                    self.responders_of.setdefault(monitor_key, []).append((health_set, responder))
        for steps in self.responders_of.values():  # the ladder's order
            steps.sort(key=lambda step: (LADDER_ORDER[step[1].state], step[1].after))

    def runbook_of(self, monitor_key: str) -> str:
        monitor = self.monitor_by_key.get(monitor_key)
        return monitor.help if monitor else ""

    def probes(self) -> list[tuple[HealthSet, ProbeDefinition]]:
        return [
            (health_set, probe)
            for health_set in self.health_sets
            for probe in health_set.probes
            if probe.role is None or probe.role in self.server.roles
        ]

    def monitors(self, health_set: HealthSet) -> list[MonitorDefinition]:
        """The monitors of a health set whose probe runs on this server."""
        here = {p.name for s, p in self.probes() if s is health_set}
        return [m for m in health_set.monitors if m.probe in here]

    def find_probe(self, identity: str) -> tuple[HealthSet, ProbeDefinition, str | None]:
        """'HealthSet\\Probe' or 'HealthSet\\Probe\\TargetResource'."""
        parts = identity.split("\\")
        if len(parts) not in (2, 3):
            raise UserError(f"a probe is named HEALTHSET\\PROBE[\\RESOURCE], got '{identity}'")
        for health_set, probe in self.probes():
            if (health_set.name.lower(), probe.name.lower()) == (
                parts[0].lower(),
                parts[1].lower(),
            ):
                return health_set, probe, parts[2] if len(parts) == 3 else None
        known = ", ".join(f"{s.name}\\{p.name}" for s, p in self.probes())
        raise UserError(f"no probe {identity} on {self.server.name} (probes here: {known})")
