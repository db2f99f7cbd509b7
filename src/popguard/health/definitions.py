"""Health sets as data: one TOML file per health set, loaded into typed models.

A file names its probes and monitors; each names a *kind*, and the kinds are
registered in one table each (PROBE_KINDS in probes.py, MONITOR_KINDS in
monitors.py). An unknown key or kind is refused with a message that names it and
the file. A profile (`[profiles.NAME]`) overrides numbers for a whole deployment
style: `exchange2013` reproduces Exchange 2013's.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from popguard.errors import UserError

STATES = ("Degraded", "Unhealthy", "Unrecoverable")
ROLES = ("mailbox", "frontend")
DEFAULT_PROFILE = "default"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProbeDefinition(Strict):
    name: str
    kind: str
    # Only on servers with this role (default: the health set's role).
    role: Literal["mailbox", "frontend"] | None = None
    # Which endpoint of this server the probe connects to (see Server.ports).
    endpoint: str | None = None
    # "tls": implicit TLS; "stls": plain, then STLS; "plain": no TLS.
    tls: Literal["tls", "stls", "plain"] = "tls"
    # One instance per database whose active copy is on this server (back end), or
    # per database of the organization (front end); else one per server.
    per_database: bool = False
    recurrence: float = Field(gt=0)
    timeout: float = Field(gt=0)
    # What the probe reads, for the counter kind: service -> counter name.
    counters: dict[str, str] = Field(default_factory=dict)
    # What the probe watches, for the process-starts kind: services of this server.
    services: tuple[str, ...] = ()
    retrieve: bool = False  # log in, and RETR the probe message too
    # Also run against the POP3 servers listed in DATA/health/external.toml.
    external: bool = False
    description: str = ""

    @model_validator(mode="after")
    def _timeout_fits(self) -> ProbeDefinition:
        if self.timeout > self.recurrence:
            raise ValueError(
                f"timeout {self.timeout}s is longer than recurrence {self.recurrence}s"
            )
        return self


class LadderStep(Strict):
    state: Literal["Degraded", "Unhealthy", "Unrecoverable"]
    after: float = Field(ge=0)  # seconds after the first alert


class MonitorDefinition(Strict):
    name: str
    kind: str
    probe: str
    threshold: float = Field(gt=0)  # failures, or a sample value, per the kind
    samples: int = Field(default=1, ge=1)  # for sample-above: how many in a row
    window: float | None = Field(default=None, gt=0)  # for failures-in-window
    ladder: tuple[LadderStep, ...]
    help: str = ""  # what it watches and the runbook's steps when it alerts

    @model_validator(mode="after")
    def _ladder_in_order(self) -> MonitorDefinition:
        if not self.ladder:
            raise ValueError("a monitor needs at least one ladder step")
        times = [step.after for step in self.ladder]
        if times != sorted(times) or times[0] != 0:
            raise ValueError("ladder steps must start at after = 0 and go forward in time")
        return self


class Throttle(Strict):
    """How often a responder may act on one server (Exchange's throttle policy)."""

    min_gap: float = Field(default=60.0, ge=0)  # seconds between two of its actions
    per_hour: int = Field(default=4, ge=1)
    per_day: int = Field(default=12, ge=1)
    # Across every server of the same role (counted in the directory, which they share):
    # at most this many in a day, and at least this many *other* servers of the role
    # must be in service (none of their own repairs in the last REPAIR_SETTLE seconds).
    group_per_day: int | None = Field(default=None, ge=1)
    min_in_service: int = Field(default=0, ge=0)


class ResponderDefinition(Strict):
    name: str
    kind: str
    monitor: str
    # Fires once per alert, when the monitor's ladder reaches this state and the alert
    # has lasted `after` seconds: the runbook's steps in order, each given its time.
    state: Literal["Degraded", "Unhealthy", "Unrecoverable"]
    after: float = Field(default=0.0, ge=0)
    service: str | None = None  # for restart-service
    # Only on servers with this role (default: wherever its monitor runs).
    role: Literal["mailbox", "frontend"] | None = None
    # Do not act when the probe's last failure lies here: a restart would not help
    # (an Auth or back-end failure seen through a front end, say).
    skip_components: tuple[str, ...] = ()
    # take-offline: how many other front ends must stay online (Active) for it to act.
    keep_online: int = Field(default=1, ge=1)
    throttle: Throttle = Field(default_factory=Throttle)


class HealthSet(Strict):
    name: str
    health_group: str
    role: Literal["mailbox", "frontend", "any"]
    server_component: str = ""
    probes: tuple[ProbeDefinition, ...]
    monitors: tuple[MonitorDefinition, ...]
    responders: tuple[ResponderDefinition, ...] = ()
    profiles: dict[str, dict[str, dict[str, dict[str, Any]]]] = Field(default_factory=dict)

    def applies_to(self, roles: tuple[str, ...]) -> bool:
        return self.role == "any" or self.role in roles

    def probe(self, name: str) -> ProbeDefinition:
        for probe in self.probes:
            if probe.name.lower() == name.lower():
                return probe
        raise UserError(f"health set {self.name} has no probe {name!r}")


def _apply_profile(raw: dict[str, Any], profile: str, source: str) -> dict[str, Any]:
    """The file's data with one profile's numbers put over the defaults."""
    profiles = raw.get("profiles", {})
    if profile == DEFAULT_PROFILE or profile not in profiles:
        return raw
    changes = profiles[profile]
    result = dict(raw)
    for section in ("probes", "monitors", "responders"):
        items = [dict(item) for item in raw.get(section, [])]
        for name, overrides in changes.get(section, {}).items():
            matches = [item for item in items if item.get("name") == name]
            if not matches:
                raise UserError(f"{source}: profile {profile} changes unknown {section} {name!r}")
            matches[0].update(overrides)
        result[section] = items
    return result


def load_health_set(text: str, source: str, profile: str = DEFAULT_PROFILE) -> HealthSet:
    from popguard.health.monitors import MONITOR_KINDS
    from popguard.health.probes import PROBE_KINDS
    from popguard.health.responders import RESPONDER_KINDS

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source}: not valid TOML: {exc}") from None
    try:
        health_set = HealthSet.model_validate(_apply_profile(raw, profile, source))
    except ValidationError as exc:
        raise UserError(validation_message(source, exc)) from None
    for probe in health_set.probes:
        _known_kind(source, "probe", probe.name, probe.kind, PROBE_KINDS)
    names = {p.name for p in health_set.probes}
    for monitor in health_set.monitors:
        _known_kind(source, "monitor", monitor.name, monitor.kind, MONITOR_KINDS)
        if monitor.probe not in names:
            raise UserError(
                f"{source}: monitor {monitor.name} reads unknown probe {monitor.probe!r}"
            )
        if monitor.kind == "failures-in-window" and monitor.window is None:
            raise UserError(f"{source}: monitor {monitor.name}: failures-in-window needs window")
    monitors = {m.name for m in health_set.monitors}
    for responder in health_set.responders:
        _known_kind(source, "responder", responder.name, responder.kind, RESPONDER_KINDS)
        if responder.monitor not in monitors:
            raise UserError(
                f"{source}: responder {responder.name}: unknown monitor {responder.monitor!r}"
            )
        if responder.kind == "restart-service" and not responder.service:
            raise UserError(f"{source}: responder {responder.name}: restart-service needs service")
    return health_set


def validation_message(source: str, exc: ValidationError) -> str:
    """One line naming the bad key: an unknown key first, the likeliest cause of the
    rest (a misspelt required key)."""
    errors = exc.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where = ".".join(str(part) for part in first["loc"])
    return f"{source}: {where}: {first['msg']}"


def _known_kind(
    source: str, what: str, name: str, kind: str, registry: Mapping[str, object]
) -> None:
    if kind not in registry:
        known = ", ".join(sorted(registry))
        raise UserError(f"{source}: {what} {name}: unknown kind {kind!r} ({known})")


def find_item(identity: str) -> tuple[HealthSet, ProbeDefinition | MonitorDefinition] | None:
    """The shipped probe or monitor named 'HealthSet\\Name' (any case), or None."""
    set_name, _, name = identity.partition("\\")
    for health_set in shipped_health_sets():
        if health_set.name.lower() != set_name.lower():
            continue
        items: list[ProbeDefinition | MonitorDefinition] = [
            *health_set.probes,
            *health_set.monitors,
        ]
        for item in items:
            if item.name.lower() == name.lower():
                return health_set, item
    return None


def shipped_health_sets(profile: str = DEFAULT_PROFILE) -> list[HealthSet]:
    """The health sets in popguard's own `sets` folder."""
    folder = resources.files("popguard.health") / "sets"
    sets = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            sets.append(load_health_set(entry.read_text(), entry.name, profile))
    return sets


def load_folder(folder: Path, profile: str = DEFAULT_PROFILE) -> list[HealthSet]:
    """Every health set in a folder (none if it does not exist)."""
    return [load_health_set(p.read_text(), str(p), profile) for p in sorted(folder.glob("*.toml"))]
