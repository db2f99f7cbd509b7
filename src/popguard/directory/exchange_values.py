"""Values as Exchange's cmdlets spell them: `$true`/`$false`, and `[d.]hh:mm:ss` time spans."""

from __future__ import annotations

import re

from popguard.errors import UserError

_TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2})$")


def timespan_parts(text: str) -> tuple[int, int, int, int] | None:
    """(days, hours, minutes, seconds) of "[d.]hh:mm:ss", or None; the caller bounds them."""
    found = _TIMESPAN.match(text)
    if found is None:
        return None
    days, hours, minutes, seconds = (int(part or 0) for part in found.groups())
    return days, hours, minutes, seconds


def parse_boolean(text: str, what: str) -> bool:
    """true/false, with or without PowerShell's `$`."""
    lowered = text.strip().lower().lstrip("$")
    if lowered not in ("true", "false"):
        raise UserError(f"{what}: expected true or false, got {text!r}")
    return lowered == "true"
