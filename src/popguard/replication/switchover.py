"""Moving a database's active copy: switchover (planned), failover, whole-server moves.

A switchover is lossless: the old active copy is fenced (dismounted) through its
replication service, the target copy catches up to the old copy's last LSN and
checksum and is mounted, and then the directory names it active, in one
transaction that also ends the move's claim, so two moves of one database at
once cannot both win. Deliveries and POP3 sessions during the move get a
temporary error from the fenced copy and succeed when retried.

A failover (`skip_lag_checks`) does not need the old server: the target is
mounted with what it has, and the changes it never received (the copy queue
length at that moment) are reported as at risk. The old copy gives them back
when its server returns (see copy_replicator).
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass

from popguard.directory.directory import CopyStatusReport, DatabaseCopy, Directory
from popguard.errors import UserError
from popguard.net.tls import TlsMaterial
from popguard.replication.peer import (
    PeerProtocolError,
    PeerRefused,
    PeerUnavailable,
    ReplicationPeer,
)
from popguard.store.mailbox_database import LogHead

CATCH_UP = 30.0  # how long the target copy may take to reach the old copy's last LSN
STATUS_FRESH = 10.0  # a copy status older than this is not trusted (ServiceDown)
HEALTHY = ("Healthy",)


@dataclass(frozen=True)
class MoveResult:
    database: str
    source: str
    target: str
    status: str  # Succeeded | Failed | NotMoved
    changes_at_risk: int
    seconds: float
    error: str = ""

    def row(self) -> dict[str, object]:
        return {
            "Identity": self.database,
            "ActiveServerAtStart": self.source,
            "ActiveServerAtEnd": self.target if self.status == "Succeeded" else self.source,
            "Status": self.status,
            "ChangesAtRisk": self.changes_at_risk,
            "Seconds": round(self.seconds, 2),
            "ErrorMessage": self.error,
        }


@dataclass(frozen=True)
class Switched:
    """What a move did: the new active copy's head, and the old one's if it was fenced."""

    source: str
    target: str
    mounted: LogHead
    fenced: LogHead | None  # None: the old server did not answer (a failover)
    at_risk: int

    def status_reports(self, database: str) -> list[CopyStatusReport]:
        """The two copies' statuses as of the move, written with the directory change,
        so that the status shown is right at once, not after the next report."""
        now = time.time()

        def report(server: str, status: str, lsn: int, error: str | None) -> CopyStatusReport:
            return CopyStatusReport(database, server, status, 0, 0, lsn, now, error, now)

        reports = [report(self.target, "Mounted", self.mounted.lsn, None)]
        if self.source == self.target:
            return reports
        if self.fenced is not None:
            reports.append(report(self.source, "Healthy", self.fenced.lsn, None))
        else:
            # The new active copy's LSN at mount is the last one both copies are known
            # to share: the new active copy keeps its log from there for the old one
            # (log_retention), so that the old one, back, finds where they part and
            # gives back what only it had.
            reports.append(
                report(
                    self.source,
                    "ServiceDown",
                    self.mounted.lsn,
                    "its server did not answer at failover",
                )
            )
        return reports


def copy_status(
    copy: DatabaseCopy, reports: dict[tuple[str, str], CopyStatusReport], now: float
) -> str:
    """A copy's status as its replication service last reported it, if recently.

    FailedAndSuspended stays whatever its age: it is not a report of liveness but a
    mark (by the active copy: too far behind, to be reseeded) that holds until the
    copy's own replication service reports again."""
    report = reports.get((copy.database, copy.server))
    if report is not None and report.status == "FailedAndSuspended":
        return report.status
    if report is None or report.reported < now - STATUS_FRESH:
        return "ServiceDown"
    return report.status


class Mover:
    """Carries out moves as the operator (the admin identity of the data folder)."""

    def __init__(self, tls_material: TlsMaterial, directory: Directory) -> None:
        self.directory = directory
        self._tls = tls_material.mutual_client_context(tls_material.admin_identity())
        self._claimant = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

    def _peer(self, server: str) -> ReplicationPeer:
        return ReplicationPeer(self.directory.get_server(server), self._tls)

    async def move(
        self,
        database: str,
        target: str,
        skip_lag_checks: bool = False,
        catch_up: float = CATCH_UP,
        source_lease_lapsed: bool = False,
    ) -> MoveResult:
        started = time.monotonic()
        copies = self.directory.database_copies(database)
        database = copies[0].database
        # Claim first, then read where the database is: a move that finished just
        # before this one cannot leave it working from a stale source.
        self.directory.claim_move(database, self._claimant)
        try:
            source = self.directory.active_server(database)
            target, reports = self._check_target(copies, database, source, target, skip_lag_checks)
            switched = await self._switch(
                database, source, target, skip_lag_checks, catch_up, reports
            )
            self.directory.finish_move(
                database, self._claimant, target, switched.status_reports(database), source,
                source_lease_lapsed,
            )  # fmt: skip
        except BaseException:
            self.directory.release_move(database, self._claimant)
            raise
        return MoveResult(
            database, source, target, "Succeeded", switched.at_risk, time.monotonic() - started
        )

    def _check_target(
        self,
        copies: list[DatabaseCopy],
        database: str,
        source: str,
        target: str,
        skip_lag_checks: bool,
    ) -> tuple[str, dict[tuple[str, str], CopyStatusReport]]:
        target_copy = next((c for c in copies if c.server.lower() == target.lower()), None)
        if target_copy is None:
            servers = ", ".join(c.server for c in copies)
            raise UserError(f"database {database} has no copy on {target} (copies: {servers})")
        target = target_copy.server
        # A Blocked auto-activation policy keeps automatic choices away, not an
        # operator's explicit move (as in Exchange); disabled activation refuses both.
        if self.directory.get_server(target).activation_disabled and target != source:
            raise UserError(
                f"{target} has database copy activation disabled (set-mailboxserver {target} "
                "--database-copy-activation-disabled-and-move-now false allows it again)"
            )
        reports = self.directory.copy_status_reports()
        if target != source and not skip_lag_checks:
            status = copy_status(target_copy, reports, time.time())
            if status not in HEALTHY:
                raise UserError(
                    f"the copy {database}\\{target} is {status}, not Healthy; wait for it, or "
                    "use --skip-lag-checks to activate it as it is (changes may be lost)"
                )
        return target, reports

    async def _switch(
        self,
        database: str,
        source: str,
        target: str,
        skip_lag_checks: bool,
        catch_up: float,
        reports: dict[tuple[str, str], CopyStatusReport],
    ) -> Switched:
        """Fence the source, mount the target."""
        async with self._peer(target) as target_peer:
            if target == source:  # mounting again a copy left dismounted by a failed move
                head = await self._mount(target_peer, database, None, catch_up)
                return Switched(source, target, head, head, 0)
            fenced: LogHead | None = None
            async with self._peer(source) as source_peer:
                try:
                    fenced = await source_peer.dismount(database)
                except PeerUnavailable as exc:
                    if not skip_lag_checks:
                        raise UserError(
                            f"cannot dismount {database} on {source}: {exc}; if {source} is "
                            "down, --skip-lag-checks activates the other copy (a failover)"
                        ) from None
                except (PeerRefused, PeerProtocolError) as exc:
                    raise UserError(f"cannot dismount {database} on {source}: {exc}") from None
                try:
                    head = await self._mount(target_peer, database, fenced, catch_up)
                except BaseException:
                    # Whatever stopped the move (an error, Ctrl-C), the old copy gets its
                    # role back, so the database is not left dismounted everywhere.
                    if fenced is not None:
                        await self._mount(source_peer, database, None, catch_up)
                    raise
            if fenced is not None:
                return Switched(source, target, head, fenced, 0)
            last_known = reports.get((database, source))
            at_risk = max(0, (last_known.applied_lsn if last_known else 0) - head.lsn)
            return Switched(source, target, head, None, at_risk)

    async def _mount(
        self, peer: ReplicationPeer, database: str, expected: LogHead | None, catch_up: float
    ) -> LogHead:
        try:
            return await peer.mount(database, expected, catch_up)
        except (PeerUnavailable, PeerRefused, PeerProtocolError) as exc:
            raise UserError(f"cannot mount {database} on {peer.server.name}: {exc}") from None

    # Whole servers --------------------------------------------------------------------

    def best_copy_elsewhere(self, database: str, away_from: str) -> tuple[str | None, str]:
        """The healthy copy to activate instead of `away_from`'s; or None and why not."""
        reports = self.directory.copy_status_reports()
        now = time.time()
        candidates, refused = [], []
        for copy in self.directory.database_copies(database):
            if copy.server.lower() == away_from.lower():
                continue
            status = copy_status(copy, reports, now)
            if not self.directory.get_server(copy.server).may_activate_copies:
                refused.append(f"{copy.server} may not activate copies")
            elif status not in HEALTHY:
                refused.append(f"{copy.server} is {status}")
            else:
                report = reports[(copy.database, copy.server)]
                candidates.append((report.copy_queue_length, copy.activation_preference, copy))
        if not candidates:
            why = "; ".join(refused) or "it has no other copy"
            return None, f"no healthy copy of {database} elsewhere ({why})"
        return min(candidates, key=lambda c: c[:2])[2].server, ""

    async def move_all_away(self, server: str) -> list[MoveResult]:
        results = []
        for copy in self.directory.database_copies():
            if not (copy.is_active and copy.server.lower() == server.lower()):
                continue
            target, why = self.best_copy_elsewhere(copy.database, server)
            results.append(await self.try_move(copy.database, copy.server, target, why))
        return results

    async def move_preferred_back(self, server: str) -> list[MoveResult]:
        """Databases whose most preferred copy is on `server` go back to it."""
        results = []
        for database in self.directory.list_databases():
            copies = self.directory.database_copies(database)
            preferred = min(copies, key=lambda c: c.activation_preference)
            if preferred.server.lower() != server.lower() or preferred.is_active:
                continue
            source = self.directory.active_server(database)
            results.append(await self.try_move(database, source, preferred.server, ""))
        return results

    async def try_move(
        self, database: str, source: str, target: str | None, why: str
    ) -> MoveResult:
        if target is None:
            return MoveResult(database, source, source, "NotMoved", 0, 0.0, why)
        started = time.monotonic()
        try:
            return await self.move(database, target)
        except UserError as exc:
            return MoveResult(
                database, source, target, "Failed", 0, time.monotonic() - started, str(exc)
            )
