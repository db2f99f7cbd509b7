"""Injected faults that live in a file, so that they outlast a restart of the service:
`slow` (every reply waits) and `refuse-auth` (logins get -ERR [SYS/TEMP]).

The POP3 services read their fault file with their settings, every second; the file
is written by `popguard inject-fault` only when the configuration enables faults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

KINDS = ("slow", "refuse-auth")


@dataclass(frozen=True)
class Fault:
    kind: str
    seconds: float = 0.0


def read_fault(path: Path) -> Fault | None:
    """The fault in force, or None; a file that does not parse is no fault."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("kind") not in KINDS:
        return None
    seconds = stored.get("seconds", 0.0)
    return Fault(stored["kind"], float(seconds) if isinstance(seconds, int | float) else 0.0)


def write_fault(path: Path, fault: Fault) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": fault.kind, "seconds": fault.seconds}))
