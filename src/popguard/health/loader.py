"""Health sets from files: one TOML file per health set, loaded into the typed models
of definitions.py and checked against the kinds that exist.

An unknown key or kind is refused with a message that names it and the file. A
profile (`[profiles.NAME]`) overrides numbers for a whole deployment style:
`exchange2013` reproduces Exchange 2013's. The kinds are looked up in the tables
their modules register them in (PROBE_KINDS, MONITOR_KINDS, RESPONDER_KINDS), read
at each load, so that a kind added to a table is known at once.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from popguard.errors import UserError
from popguard.health.definitions import (
    HealthSet,
    MonitorDefinition,
    ProbeDefinition,
    validation_message,
)
from popguard.health.monitors import MONITOR_KINDS
from popguard.health.probes import PROBE_KINDS
from popguard.health.responders import RESPONDER_KINDS

DEFAULT_PROFILE = "default"


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
