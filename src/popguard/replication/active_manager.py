"""Active Manager: a dead mailbox server's active copies fail over by themselves.

Each mailbox server's replication service renews the server's lease in the directory
(service.py). Here, once a second, one of them at a time (the holder of the
'ActiveManager' role lease) looks for servers whose lease has lapsed by the
directory's clock and activates, for each database active there, the best other
copy: on a server whose own lease is current and that may activate copies, holding
the most of the log (applied LSN as last reported), then the most preferred, and
never one whose server's own health sets call it Unhealthy (asked of its health
service; one that does not answer is judged by its copy status alone). The
activation is the existing lossy failover (the old copy cannot be dismounted; what
it held beyond the new copy is given back when it returns), applied only if the old
server's lease is still lapsed in the same transaction. A database failed over is not
failed over again within FLAP_GUARD seconds.

Only a synchronous copy is activated (replication/synchronous.py): one that every
acknowledgement of the dead server waited for, so it holds every message acknowledged
and every deletion confirmed. When no copy of a database is synchronous (the passive
copies fell behind, and the dead server went on alone), the database waits for a
person, who may choose the lossy way (`--skip-lag-checks`), as Patroni's synchronous
mode does.

On by default with a PostgreSQL directory, off with SQLite (`[active_manager] enabled`
in popguard.toml says otherwise). It runs on a thread and event loop of its own in the
replication service, so that its directory calls and moves never hold up the loop that
renews the lease and answers the peers' failsafe questions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from popguard.directory.directory import LEASE_SECONDS, Directory, Server
from popguard.directory.sql.engine import DIRECTORY_ERRORS
from popguard.errors import UserError
from popguard.net.tls import TlsMaterial
from popguard.replication.switchover import Mover, copy_status

log = logging.getLogger("popguard.activemanager")

ROLE = "ActiveManager"
FLAP_GUARD = 300.0  # seconds before a database failed over may fail over again
# What a passive copy may say of itself and still be activated once its active copy's
# server is dead: it cannot be connected to that server any more, so "Disconnected..."
# is the normal word; the most of the log decides among them.
USABLE = ("Healthy", "DisconnectedAndHealthy", "DisconnectedAndResynchronizing")

# A server's health report: its health sets with their AlertValue (get-healthreport's
# rows); raises UserError when its health service does not answer.
HealthReport = Callable[[Server], list[dict[str, Any]]]


@dataclass(frozen=True)
class Decision:
    database: str
    source: str
    target: str | None
    result: str  # Succeeded | Failed | NotMoved
    reason: str


class ActiveManager:
    def __init__(
        self,
        server: str,
        directory: Directory,
        tls: TlsMaterial,
        synchronous_copy: bool = True,
        decisions_file: Path | None = None,
        steady: Callable[[], bool] = lambda: True,
        health_report: HealthReport | None = None,
    ) -> None:
        self.server = server
        self._health_report = health_report
        # Whether this server's own lease renewals have gone well for a whole lease.
        self._steady = steady
        self._decisions_file = decisions_file
        # With synchronous copies (the default) only a copy marked synchronous is known
        # to hold every acknowledged change; without, the most of the log is the best
        # there is, and what the dead server held beyond it is given back on its return.
        self.synchronous_copy = synchronous_copy
        self.directory = directory
        self._tls = tls
        self._failed_over: dict[str, float] = {}
        self._said: dict[str, str] = {}  # database -> the last reason logged
        self._reachable_since: float | None = None  # monotonic, of the directory
        self.decisions: list[Decision] = []

    async def tick(self) -> list[Decision]:
        """One look: nothing unless this server holds the role and a lease lapsed."""
        try:
            holder = self.directory.claim_role(ROLE, self.server)
            leases = self.directory.leases()
            lapsed = {name for name, left in leases.items() if left < 0}
            actives = [c for c in self.directory.database_copies() if c.is_active]
        except DIRECTORY_ERRORS:
            self._reachable_since = None
            return []  # an unreachable directory decides nothing
        now = time.monotonic()
        if self._reachable_since is None:
            self._reachable_since = now
        if now - self._reachable_since < LEASE_SECONDS or not self._steady():
            # Just started, or the directory just came back: every lease may have lapsed
            # while nobody could renew. A live server renews within LEASE_RENEWAL; only
            # a lease still lapsed after a whole lease of reachability is a dead server.
            return []
        if not holder or not lapsed:
            return []
        decisions = []
        for copy in actives:
            if copy.server not in lapsed:
                continue
            decisions.append(await self._fail_over(copy.database, copy.server, leases))
        self.decisions = (self.decisions + decisions)[-100:]
        return decisions

    async def _fail_over(self, database: str, source: str, leases: dict[str, float]) -> Decision:
        since = time.monotonic() - self._failed_over.get(database, -FLAP_GUARD)
        if since < FLAP_GUARD:
            why = f"failed over {since:.0f} s ago: within the flap guard"
            return self._decided(database, source, None, "NotMoved", why)
        target, why = await self._best_copy(database, source, leases)
        if target is None:
            return self._decided(database, source, None, "NotMoved", why)
        mover = Mover(self._tls, self.directory)
        try:
            result = await mover.move(
                database, target, skip_lag_checks=True, source_lease_lapsed=True
            )
        except UserError as exc:
            return self._decided(database, source, target, "Failed", str(exc))
        self._failed_over[database] = time.monotonic()
        at_risk = ""
        if result.changes_at_risk:
            at_risk = f", {result.changes_at_risk} changes to be given back when it returns"
        return self._decided(
            database, source, target, "Succeeded",
            f"{source}'s lease lapsed {-leases[source]:.1f} s ago{at_risk}",
        )  # fmt: skip

    async def _best_copy(
        self, database: str, source: str, leases: dict[str, float]
    ) -> tuple[str | None, str]:
        reports = self.directory.copy_status_reports()
        now = time.time()
        candidates, refused = [], []
        everywhere = self.directory.database_copies(database)
        copies = [c for c in everywhere if c.server.lower() != source.lower()]
        if self.synchronous_copy and copies and not any(c.synchronous for c in copies):
            return None, (
                f"no copy of {database} was synchronous with {source}: each may lack mail "
                f"{source} acknowledged; a person decides (move-activemailboxdatabase "
                f"{database} --activate-on-server SERVER --skip-lag-checks)"
            )
        for copy in copies:
            status = copy_status(copy, reports, now)
            if self.synchronous_copy and not copy.synchronous:
                refused.append(f"{copy.server} was not synchronous with {source}")
            elif leases.get(copy.server, -1.0) <= 0:
                refused.append(f"{copy.server}'s own lease is not current")
            elif not self.directory.get_server(copy.server).may_activate_copies:
                refused.append(f"{copy.server} may not activate copies")
            elif status not in USABLE or (database, copy.server) not in reports:
                refused.append(f"{copy.server} is {status}")
            else:
                applied = reports[(database, copy.server)].applied_lsn
                candidates.append((-applied, copy.activation_preference, copy.server))
        # The best first; the health of each is asked only when it comes to it.
        for _, _, server in sorted(candidates):
            unhealthy = await self._unhealthy_sets(server)
            if not unhealthy:
                return server, ""
            refused.append(f"{server}'s health sets call it Unhealthy ({', '.join(unhealthy)})")
        return None, f"no copy of {database} to activate ({'; '.join(refused) or 'none'})"

    async def _unhealthy_sets(self, server: str) -> list[str]:
        """The health sets of `server` that are Unhealthy by its own engine. Off the
        event loop: the lease's renewal must never wait for another server's answer."""
        if self._health_report is None:
            return []
        try:
            rows = await asyncio.to_thread(self._health_report, self.directory.get_server(server))
        except UserError as exc:
            log.warning("activating on %s by its copy status alone: %s", server, exc)
            return []
        return sorted({str(r["HealthSet"]) for r in rows if r.get("AlertValue") == "Unhealthy"})

    def _record(self, decision: Decision) -> None:
        """One line for the health service, which makes it a recovery action and an
        escalation (get-recoveryactions, the alert's e-mail and webhook)."""
        if self._decisions_file is None:
            return
        line = json.dumps({**asdict(decision), "at": time.time(), "decider": self.server})
        try:
            self._decisions_file.parent.mkdir(parents=True, exist_ok=True)
            with self._decisions_file.open("a", encoding="utf-8") as out:
                out.write(line + "\n")
        except OSError as exc:
            log.error("cannot record the decision on %s: %s", decision.database, exc)

    def _decided(
        self, database: str, source: str, target: str | None, result: str, reason: str
    ) -> Decision:
        decision = Decision(database, source, target, result, reason)
        if self._said.get(database) != f"{result} {reason}":  # once, not every second
            self._said[database] = f"{result} {reason}"
            level = logging.WARNING if result == "Succeeded" else logging.ERROR
            log.log(level, "failover of %s from %s to %s: %s (%s)",
                    database, source, target or "nowhere", result, reason)  # fmt: skip
            self._record(decision)
        return decision
