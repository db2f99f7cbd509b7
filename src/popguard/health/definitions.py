"""Health sets as data: the typed models of probes, monitors and responders.

Each names a *kind*; which kinds exist is for the loader to check against the
kinds' own tables (PROBE_KINDS, MONITOR_KINDS, RESPONDER_KINDS), so that these
models, which every part of health reads, depend on none of the kinds.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from popguard.errors import UserError

STATES = ("Degraded", "Unhealthy", "Unrecoverable")
ROLES = ("mailbox", "frontend")


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
    # The runbook's "re-run the probe": a target that failed after a success runs
    # again up to `retries` times, `retry_interval` seconds after each failed run
    # ended, before the next recurrence. A monitor's consecutive failures are then
    # confirmed within seconds rather than recurrences, and a blip must still outlast
    # every re-run to count. Once per failure streak: a target that keeps failing is
    # probed at the recurrence again, not hammered.
    retries: int = Field(default=0, ge=0)
    retry_interval: float | None = Field(default=None, gt=0)
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
        if self.retries and self.retry_interval is None:
            raise ValueError("retries need a retry_interval")
        if self.retry_interval is not None and self.retry_interval >= self.recurrence:
            raise ValueError(
                f"retry_interval {self.retry_interval}s is not shorter than recurrence "
                f"{self.recurrence}s"
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
    # Fire at once, before `after`, when the step before it ran and the probe, run again
    # right after, still failed: waiting out `after` would only keep users out longer.
    hurry: bool = False
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


def validation_message(source: str, exc: ValidationError) -> str:
    """One line naming the bad key: an unknown key first, the likeliest cause of the
    rest (a misspelt required key)."""
    errors = exc.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where = ".".join(str(part) for part in first["loc"])
    return f"{source}: {where}: {first['msg']}"
