"""Self-fencing: a mailbox server stops serving its active copies before its lease can
lapse elsewhere (Active Manager, replication/active_manager.py).

The replication service writes, after every renewal of the server's lease that the
directory accepted, when it *sent* that renewal (CLOCK_MONOTONIC, the same for every
process of the host). A copy is served only while that is less than FENCE_DEADLINE
ago. The lease lasts LEASE_SECONDS (10 s) from the directory's receipt of that same
renewal, which came after the sending: so a server that cannot renew (cut off, its
replication service dead, the whole host paused with SIGSTOP) has stopped serving 4 s
before anyone else may activate its databases. A paused process wakes up already
fenced: the check reads the clock, not a timer.
"""

from __future__ import annotations

import json
import time

from popguard.paths import ServerFolder

FENCE_DEADLINE = 6.0  # seconds after the last good renewal was sent
_REREAD = 0.25  # seconds a read of the lease file is trusted


class Fence:
    def __init__(self, folder: ServerFolder, enabled: bool) -> None:
        self._file = folder.lease_file()
        self.enabled = enabled
        self._sent = 0.0
        self._read_at = -1e9

    def why_fenced(self) -> str | None:
        """None while this server may serve its active copies; else why not."""
        if not self.enabled:
            return None
        now = time.monotonic()
        if now - self._read_at > _REREAD:
            self._read_at = now
            try:
                self._sent = float(json.loads(self._file.read_text())["sent_monotonic"])
            except (OSError, ValueError, KeyError, TypeError):
                self._sent = 0.0
        if self._sent == 0.0:
            return "this server holds no lease yet (its replication service renews it)"
        age = now - self._sent
        if age >= FENCE_DEADLINE:
            return f"this server's lease was last renewed {age:.0f} s ago: fenced"
        return None
