"""Records another process appends to a JSON-lines file, each taken once.

Active Manager's decisions (health/failover_decisions.py) and the masters' hung-worker
kills (health/worker_repairs.py) are written where they happen, as one JSON line each,
and become recovery actions here. How far the file has been read is kept beside it,
so a restarted health service repeats nothing; a line still being written waits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("popguard.health")


class JsonLinesFeed:
    def __init__(self, path: Path, what: str) -> None:
        self._file = path
        self._offset_file = path.with_suffix(".read")
        self._what = what  # for the log: "a failover decision"

    def take_new(self, take: Callable[[dict[str, Any]], None]) -> int:
        """Call `take` with every record written since the last look; their number."""
        try:
            offset = int(self._offset_file.read_text() or 0)
        except (OSError, ValueError):
            offset = 0
        try:
            with self._file.open("rb") as records:
                records.seek(offset)
                chunk = records.read()
        except FileNotFoundError:
            return 0
        complete = chunk[: chunk.rfind(b"\n") + 1]
        taken = 0
        for line in complete.splitlines():
            try:
                take(json.loads(line))
                taken += 1
            except (ValueError, KeyError, TypeError) as exc:
                log.error("%s cannot be read (%s): %r", self._what, exc, line[:200])
        if complete:
            _write_whole(self._offset_file, str(offset + len(complete)))
        return taken


def _write_whole(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(path)
