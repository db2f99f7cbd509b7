"""What a responder is given and what it gives back."""

from __future__ import annotations

from dataclasses import dataclass

from popguard.health.results import ProbeResult


@dataclass(frozen=True)
class Incident:
    """What a responder answers: which monitor, on what, since when."""

    health_set: str
    monitor: str
    probe: str
    resource: str
    first_alert: float
    error: str


@dataclass(frozen=True)
class Outcome:
    result: str  # Succeeded | Failed | Skipped
    detail: str
    # The probe, run again right after the repair, still failed: the repair did not help.
    still_fails: bool = False


@dataclass(frozen=True)
class Recheck:
    """The probe run once more before a step acts (the runbook's "check that the
    problem still exists"); both None when its target is not on this server now."""

    result: ProbeResult | None
    fails: bool | None
