"""supervisord's event listener for exits it did not ask for: a crash, in one word.

supervisord stops a service it was asked to stop (STOPPING, then STOPPED); a process
that ends any other way (a crash, a kill from outside, an exit of its own) passes
through EXITED, and supervisord starts it again. This listener counts those EXITED
events per service in each server's folder, so the crash-loop monitors see crashes
only: an operator's `restart-service`, `restart-server` or `up` never counts.
systemd keeps the same count itself (a unit's NRestarts).

Run by supervisord as `python -m popguard.control.exit_listener DATA`; its standard
output is supervisord's event protocol, so it says nothing there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from supervisor import childutils

from popguard import paths

SUBSCRIBED = "PROCESS_STATE_EXITED"


def read_exits(file: Path) -> dict[str, int]:
    """Unexpected exits counted so far, per service; nothing counted yet is empty."""
    try:
        stored = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(stored, dict):
        return {}
    return {str(k): v for k, v in stored.items() if isinstance(v, int)}


def count_exit(data: Path, server: str, service: str) -> None:
    file = paths.server_folder(data, server).exits_file()
    counts = read_exits(file)
    counts[service] = counts.get(service, 0) + 1
    file.parent.mkdir(parents=True, exist_ok=True)
    temporary = file.with_suffix(".tmp")
    temporary.write_text(json.dumps(counts))
    os.replace(temporary, file)  # a reader sees the old count or the new one


def service_of(group: str, process: str) -> str | None:
    """The popguard service of supervisord's program `SERVER-SERVICE` in group SERVER."""
    prefix = f"{group}-"
    return process[len(prefix) :] if process.startswith(prefix) else None


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m popguard.control.exit_listener DATA", file=sys.stderr)
        return 1
    data = Path(argv[0])
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        if headers.get("eventname") == SUBSCRIBED:
            fields = childutils.get_headers(payload)
            service = service_of(fields.get("groupname", ""), fields.get("processname", ""))
            if service is not None:
                try:
                    count_exit(data, fields["groupname"], service)
                except OSError as exc:  # a full disk must not stop the events
                    print(f"exit_listener: cannot count an exit: {exc}", file=sys.stderr)
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
