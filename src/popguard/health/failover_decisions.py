"""Active Manager's decisions, as recovery actions and escalations.

Active Manager runs in the replication service of the mailbox server that holds its
role (replication/active_manager.py) and writes each decision, once, as a JSON line
to that server's `control/failovers.jsonl`. This part of the server's health engine
reads the lines it has not read yet and makes each one

- a recovery action of `ActiveManager\\Failover` on the database (what moved where,
  or why nothing moved: get-recoveryactions shows it), and
- an alert (health set `ActiveManager`, sent by e-mail and webhook as any other):
  a failover is news for a person even when it worked, and a database left waiting
  for a person needs one.

How far it has read is kept beside the file, so a restarted engine repeats nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from popguard.health.jsonl_feed import JsonLinesFeed
from popguard.health.notifier import EVENT_ALERTS, Notifier
from popguard.health.results import Alert, RecoveryAction, ResultsStore
from popguard.paths import ServerFolder

log = logging.getLogger("popguard.health")

RESPONDER = "ActiveManager\\Failover"
MONITOR = "MailboxServerLease"
# What a decision's result is as a recovery action's.
RESULTS = {"Succeeded": "Succeeded", "Failed": "Failed", "NotMoved": "Skipped"}


class FailoverDecisions:
    def __init__(self, folder: ServerFolder, store: ResultsStore, notifier: Notifier) -> None:
        self._feed = JsonLinesFeed(folder.failover_decisions_file(), "a failover decision")
        self._store = store
        self._notifier = notifier

    def take_new(self) -> int:
        """Turn the decisions written since the last look into actions and alerts."""
        return self._feed.take_new(self._take)

    def _take(self, decision: dict[str, Any]) -> None:
        at = float(str(decision["at"]))
        database, source = str(decision["database"]), str(decision["source"])
        target = decision.get("target") or "nowhere"
        result, reason = str(decision["result"]), str(decision["reason"])
        detail = f"{database} from {source} to {target}: {result}; {reason}"
        self._store.add_action(
            RecoveryAction(
                responder=RESPONDER, monitor=f"{EVENT_ALERTS}\\{MONITOR}", resource=database,
                kind="Failover", alert_started=at, started=at, ended=at,
                result=RESULTS.get(result, "Failed"), detail=detail,
            )
        )  # fmt: skip
        outcome = self._notifier.raised(
            Alert(
                raised=at, health_set=EVENT_ALERTS, monitor=MONITOR, probe="",
                resource=database, failure_component="Server",
                error=f"{source}'s lease lapsed: {detail}", detail=detail, alert_started=at,
            )
        )  # fmt: skip
        log.warning("Active Manager: %s (alert: %s)", detail, outcome)
