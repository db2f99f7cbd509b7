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


# ByteQuantifiedSize: Exchange's sizes are binary (1 KB = 1024 B), written "50MB",
# "1.5 GB", "52428800" (bytes), or as Exchange shows them, "50 MB (52,428,800 bytes)".
_SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_SIZE = re.compile(r"^(\d{1,15}(?:\.\d{1,6})?)\s*(B|KB|MB|GB|TB)?$", re.IGNORECASE)
_SIZE_AS_SHOWN = re.compile(
    r"^[0-9.]+\s*[A-Za-z]{1,2}\s*\(([0-9,]{1,25})\s*bytes\)$", re.IGNORECASE
)
UNLIMITED = "Unlimited"
# 1 PB: far above any mailbox, far below an integer column's end on either engine.
MAX_BYTE_QUANTIFIED_SIZE = 1024**5


def parse_byte_quantified_size(text: str, what: str) -> int | None:
    """Octets of an Exchange size, or None for "Unlimited"; UserError naming `what`."""
    cleaned = text.strip()
    if cleaned.lower() == UNLIMITED.lower():
        return None
    octets: int | None = None
    shown = _SIZE_AS_SHOWN.match(cleaned)
    if shown is not None and re.fullmatch(r"\d{1,3}(,\d{3})*", shown.group(1)):
        octets = int(shown.group(1).replace(",", ""))
    elif (found := _SIZE.match(cleaned)) is not None:
        number, unit = found.groups()
        multiplier = _SIZE_UNITS[(unit or "B").upper()]
        whole, _, fraction = number.partition(".")
        # Exact arithmetic: 1.1 MB is 1153433 octets (rounded down), not a float's guess.
        octets = int(whole) * multiplier + int(fraction or "0") * multiplier // 10 ** len(fraction)
    if octets is None:
        raise UserError(
            f"{what}: expected a size such as 50MB, 1.5GB or 1048576 (octets), or "
            f"Unlimited; got {text!r}"
        )
    if octets > MAX_BYTE_QUANTIFIED_SIZE:
        raise UserError(f"{what}: at most 1024 TB, got {text!r}")
    return octets


def format_byte_quantified_size(octets: int | None) -> str:
    """As Exchange shows a size: "50 MB (52,428,800 bytes)", or "Unlimited"."""
    if octets is None:
        return UNLIMITED
    unit = next(u for u in ("TB", "GB", "MB", "KB", "B") if octets >= _SIZE_UNITS[u] or u == "B")
    value = f"{octets / _SIZE_UNITS[unit]:.2f}".rstrip("0").rstrip(".")
    return f"{value} {unit} ({octets:,} bytes)"
