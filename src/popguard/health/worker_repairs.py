"""Worker processes their master killed as hung, as recovery actions.

A service's master (net/workers.py) kills a worker that has said nothing on its
channel for WORKER_HANG_LIMIT seconds (stopped, or its event loop blocked) and starts
another; it writes each kill as a JSON line to the server's
`control/hung-workers.jsonl`. This part of the health engine makes each one a
recovery action of `WorkerWatchdog\\KillHungWorker` (get-recoveryactions shows it).
No alert: the repair is done, and one worker's sessions were all it cost. Workers
that keep dying are PopProcessRestartsMonitor's to escalate, through the crash
counter of the service.
"""

from __future__ import annotations

import logging
from typing import Any

from popguard.health.jsonl_feed import JsonLinesFeed
from popguard.health.results import RecoveryAction, ResultsStore
from popguard.paths import ServerFolder

log = logging.getLogger("popguard.health")

RESPONDER = "WorkerWatchdog\\KillHungWorker"
MONITOR = "WorkerChannelSilent"


class WorkerRepairs:
    def __init__(self, folder: ServerFolder, store: ResultsStore) -> None:
        self._feed = JsonLinesFeed(folder.hung_workers_file(), "a hung worker's record")
        self._store = store

    def take_new(self) -> int:
        return self._feed.take_new(self._take)

    def _take(self, record: dict[str, Any]) -> None:
        at = float(record["at"])
        service, slot, pid = str(record["service"]), int(record["slot"]), int(record["pid"])
        silent = float(record["silent"])
        detail = (
            f"{service} worker {slot} (pid {pid}) said nothing for {silent:.0f} s; "
            "killed, and its master started another"
        )
        self._store.add_action(
            RecoveryAction(
                responder=RESPONDER, monitor=f"{service}\\{MONITOR}", resource=service,
                kind="KillHungWorker", alert_started=at, started=at, ended=at,
                result="Succeeded", detail=detail,
            )
        )  # fmt: skip
        log.warning("%s", detail)
