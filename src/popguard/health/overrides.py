"""Monitoring overrides: which properties may be overridden, their values, their durations.

An override changes one property of one probe or monitor, on one server or all of
them, for a time (`--duration 1.00:00:00`, Exchange's d.hh:mm:ss), and expires on
its own. The engine reads them every second, so they take effect without a restart.
A server's own override wins over a global one.
"""

from __future__ import annotations

from popguard.directory.directory import MonitoringOverride
from popguard.directory.exchange_values import parse_boolean, timespan_parts
from popguard.errors import UserError
from popguard.health.definitions import MonitorDefinition, ProbeDefinition

# property -> how to read its value, per item type.
PROPERTIES: dict[str, dict[str, type]] = {
    "Probe": {"Enabled": bool, "Recurrence": float, "Timeout": float},
    "Monitor": {"Enabled": bool, "Threshold": float},
}
MAX_DURATION = 60 * 24 * 3600.0  # Exchange allows at most 60 days
ITEM_TYPES = ("Probe", "Monitor")


def parse_duration(text: str) -> float:
    """Seconds in "d.hh:mm:ss" or "hh:mm:ss"; UserError for anything else."""
    parts = timespan_parts(text.strip())
    if parts is None:
        raise UserError(f"a duration is d.hh:mm:ss or hh:mm:ss, got {text!r}")
    days, hours, minutes, seconds = parts
    if hours > 23 or minutes > 59 or seconds > 59:
        raise UserError(f"a duration is d.hh:mm:ss or hh:mm:ss, got {text!r}")
    total = float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)
    if not 0 < total <= MAX_DURATION:
        raise UserError(f"a duration must be more than 0 and at most 60 days, got {text!r}")
    return total


def parse_value(item_type: str, property_name: str, value: str) -> bool | float:
    kinds = PROPERTIES.get(item_type)
    if kinds is None:
        raise UserError(f"item type must be Probe or Monitor, got {item_type!r}")
    wanted = next((k for name, k in kinds.items() if name.lower() == property_name.lower()), None)
    if wanted is None:
        raise UserError(
            f"a {item_type} override may change {', '.join(kinds)}; not {property_name!r}"
        )
    if wanted is bool:
        return parse_boolean(value, property_name)
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{property_name} is a number, got {value!r}") from None
    if not 0 < number < 1e9:
        raise UserError(f"{property_name} must be positive, got {value!r}")
    return number


def canonical_property(item_type: str, property_name: str) -> str:
    return next(n for n in PROPERTIES[item_type] if n.lower() == property_name.lower())


def _matching(
    overrides: list[MonitoringOverride], identity: str, item_type: str
) -> dict[str, bool | float]:
    """The properties overridden for one item: global first, then the server's own."""
    chosen: dict[str, bool | float] = {}
    relevant = [
        o for o in overrides if o.identity.lower() == identity.lower() and o.item_type == item_type
    ]
    for override in sorted(relevant, key=lambda o: (o.server is not None, o.id)):
        try:
            name = canonical_property(item_type, override.property_name)
            chosen[name] = parse_value(item_type, name, override.property_value)
        except (UserError, StopIteration):
            continue  # stored by an older popguard, or hand-edited: ignored, never fatal
    return chosen


def effective_probe(
    probe: ProbeDefinition, identity: str, overrides: list[MonitoringOverride]
) -> tuple[ProbeDefinition, bool]:
    """The probe as overridden, and whether it is enabled."""
    changes = _matching(overrides, identity, "Probe")
    updated = probe.model_copy(
        update={
            key.lower(): value for key, value in changes.items() if key in ("Recurrence", "Timeout")
        }
    )
    if updated.timeout > updated.recurrence:
        updated = updated.model_copy(update={"timeout": updated.recurrence})
    return updated, bool(changes.get("Enabled", True))


def effective_monitor(
    monitor: MonitorDefinition, identity: str, overrides: list[MonitoringOverride]
) -> tuple[MonitorDefinition, bool]:
    changes = _matching(overrides, identity, "Monitor")
    if "Threshold" in changes:
        monitor = monitor.model_copy(update={"threshold": changes["Threshold"]})
    return monitor, bool(changes.get("Enabled", True))


def known_item(identity: str, item_type: str) -> str:
    """The identity as the health-set files spell it; UserError if there is none such."""
    from popguard.health.loader import find_item  # the health sets load when asked

    found = find_item(identity)
    if found is not None and isinstance(found[1], ProbeDefinition) == (item_type == "Probe"):
        return f"{found[0].name}\\{found[1].name}"
    raise UserError(f"no {item_type.lower()} '{identity}' (names look like 'POP\\PopCTPMonitor')")


def new_override(
    server: str | None,
    identity: str,
    item_type: str,
    property_name: str,
    property_value: str,
    duration: str,
    now: float,
) -> MonitoringOverride:
    """An override as add-servermonitoringoverride makes it: the item and property
    checked against the health sets, the value read, the duration parsed."""
    item_type = next((t for t in ITEM_TYPES if t.lower() == item_type.lower()), "")
    if not item_type:
        raise UserError(f"an item type is {' or '.join(ITEM_TYPES)}")
    identity = known_item(identity, item_type)
    value = parse_value(item_type, property_name, property_value)
    return MonitoringOverride(
        server, identity, item_type, canonical_property(item_type, property_name),
        str(value).lower() if isinstance(value, bool) else f"{value:g}", now,
        now + parse_duration(duration),
    )  # fmt: skip
