"""One database copy on this server, kept in step with the active copy.

While the directory names another server as the database's active one, the copy
pulls that server's change log (long polling) and replays it. A copy that was
active and is no more (a switchover, or a failover while this server was down)
is fenced first. When its log has changed hands it is "diverged": the entries
that never reached the new active copy are found by comparing checksums, the
messages they delivered are given to the new active copy (once, by key), and
the copy is emptied and seeded again from LSN 1.

When the active copy's log no longer has what this copy needs (trimmed, see
log_retention), the copy is seeded from a snapshot of the active copy instead:
downloaded over the replication channel into a `.seeding` file, checked against its
SHA-256, then loaded in one transaction (a copy is never half seeded), and the log
replayed from the snapshot's LSN. A kill -9 on either side leaves at most a stray
file, which the next start removes; seeding then starts again.

While this server holds the active copy, the replicator only reports on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import TypeVar

from popguard.directory.directory import CopyStatusReport
from popguard.directory.sql.engine import DirectoryUnavailable
from popguard.errors import UserError
from popguard.replication.directory_thread import DirectoryThread
from popguard.replication.peer import (
    Diverged,
    LogTrimmed,
    PeerProtocolError,
    PeerRefused,
    PeerUnavailable,
    ReplicationPeer,
)
from popguard.store import change_log
from popguard.store.change_log import LogFormatError
from popguard.store.mailbox_database import (
    ACTIVE,
    LogIntegrityError,
    MailboxDatabase,
    NotMountedError,
    SnapshotError,
    StoreSizes,
)

log = logging.getLogger("popguard.replication")

T = TypeVar("T")

LONG_POLL = 2.0  # how long the active side holds a pull that finds nothing new
REPORT_INTERVAL = 2.0
RETRY_AFTER_FAILURE = 5.0
RETRY_AFTER_DISCONNECT = 1.0
# How often the copy's sizes are measured for its status (a sum over an index and the
# log's pages: cheap, but not worth doing on every pull).
MEASURE_INTERVAL = 10.0


class CopyReplicator:
    def __init__(
        self,
        directory: DirectoryThread,
        server: str,
        database: str,
        store: MailboxDatabase,
        pending_file: Path,
        executor: Executor,
        peer_for: Callable[[str], Awaitable[ReplicationPeer]],
    ) -> None:
        self.directory = directory
        self.server = server
        self.database = database
        self.store = store
        self._executor = executor
        self._peer_for = peer_for
        self.status = "Initializing"
        self.error: str | None = None
        self.copy_queue_length = 0
        self.applied_lsn = 0
        self.last_inspected: float | None = None
        self._reported: tuple[object, ...] = ()
        self._progress = (0, 0)
        self._reported_at = 0.0
        self._seeding = False
        # (active server, LSN): this copy's log up to LSN is known to be a prefix of that
        # server's (it accepted our checksum there). Only that much of a passive copy's
        # log may be trimmed: the rest may be changes only this copy has (after a
        # failover), which the resynchronization needs to find and give back.
        self.confirmed: tuple[str, int] | None = None
        self._fenced_while_mounted = False
        # Messages only this copy had when it was found diverged, kept until the active
        # copy has taken them back (see _redeliver_pending).
        self.pending_file = pending_file
        self.seeding_file = pending_file.with_suffix(".seeding")
        self.sizes: StoreSizes | None = None  # sent with the next report, then cleared
        self._measured_at = -MEASURE_INTERVAL

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def trimmable_through(self, active: str) -> int | None:
        """How far this passive copy's own log may be trimmed (None: not at all)."""
        if self.confirmed is None or self.confirmed[0].lower() != active.lower():
            return None
        return self.confirmed[1]

    async def run(self, stop: asyncio.Event) -> None:
        # Report where the copy is from the first report on, not LSN 0: the active copy
        # trims behind the reports, and a copy that seemed to be at 0 would be taken
        # for one past help.
        self.applied_lsn = (await self._run(self.store.head)).lsn
        while not stop.is_set():
            pause = 0.0
            active = ""
            try:
                active = await self._active_server()
                if active.lower() == self.server.lower():
                    await self._report_active()
                    pause = 1.0
                else:
                    await self._follow(active)
            except Diverged as exc:
                log.warning("%s: %s", self._name, exc)
                try:
                    await self._resynchronize(active, exc.peer_head)
                except (PeerUnavailable, PeerRefused, PeerProtocolError, NotMountedError) as again:
                    self._set("Resynchronizing", f"resynchronizing: {again}")
                    pause = RETRY_AFTER_FAILURE
                except Exception as again:  # the replicator must outlive any one failure
                    log.exception("%s: resynchronizing failed", self._name)
                    self._set("Failed", f"resynchronizing failed: {again}")
                    pause = RETRY_AFTER_FAILURE
            except PeerUnavailable as exc:
                was_healthy = self.status in ("Healthy", "DisconnectedAndHealthy")
                status = (
                    "DisconnectedAndHealthy" if was_healthy else "DisconnectedAndResynchronizing"
                )
                self._set(status, str(exc))
                pause = RETRY_AFTER_DISCONNECT
            except NotMountedError:
                # The copy was mounted while a pull was on its way (a switchover to it):
                # the replay was refused, as it must be; the directory will name it next.
                pause = 0.2
            except (
                PeerRefused,
                PeerProtocolError,
                LogFormatError,
                LogIntegrityError,
                SnapshotError,
            ) as exc:
                # Nothing of a bad batch was applied (apply is one transaction).
                log.error("%s failed: %s", self._name, exc)
                self._set("Failed", str(exc))
                pause = RETRY_AFTER_FAILURE
            except UserError as exc:  # the database or server left the directory
                self._set("Failed", str(exc))
                pause = RETRY_AFTER_FAILURE
            except Exception as exc:
                log.exception("%s: unexpected error", self._name)
                self._set("Failed", f"internal error: {exc!r}")
                pause = RETRY_AFTER_FAILURE
            await self._measure()
            if await self._active_now() == active:
                await self._publish()
            # else a move changed the active copy meanwhile: what was seen is stale, and
            # the move itself wrote both copies' statuses.
            if pause:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)

    async def _active_server(self) -> str:
        return await self.directory(lambda d: d.active_server(self.database))

    async def _active_now(self) -> str:
        try:
            return await self._active_server()
        except UserError:
            return ""

    @property
    def _name(self) -> str:
        return f"{self.database}\\{self.server}"

    def _set(self, status: str, error: str | None = None) -> None:
        self.status, self.error = status, error

    async def _report_active(self) -> None:
        role = await self._run(self.store.role)
        self.applied_lsn = (await self._run(self.store.head)).lsn
        self.copy_queue_length = 0
        self.last_inspected = time.time()
        self._set("Mounted" if role == ACTIVE else "Dismounted")

    async def _follow(self, active: str) -> None:
        if await self._run(self.store.role) == ACTIVE:
            # Read the directory again *after* the role: a switchover mounts the copy
            # first and names it in the directory next; only a copy that is mounted
            # while another is named, with no move under way, is stale.
            if await self.directory(lambda d: d.move_in_progress(self.database)):
                raise NotMountedError(f"{self._name} is being activated")
            if (await self._active_server()).lower() == self.server.lower():
                raise NotMountedError(f"{self._name} is the active copy now")
            head = await self._run(self.store.fence)
            self.confirmed = None
            # It took writes as the active copy that the new one may never have had.
            self._fenced_while_mounted = head.lsn > 0
            if head.lsn:  # not a brand-new, empty copy
                log.warning(
                    "%s was mounted, but %s is active now: fenced at LSN %d",
                    self._name, active, head.lsn,
                )  # fmt: skip
        peer = await self._peer_for(active)
        if self.pending_file.exists():
            await self._redeliver_pending(peer, active)
        head = await self._run(self.store.head)
        if head.lsn == 0:
            self._seeding = True
        try:
            batch = await peer.log_after(self.database, head, LONG_POLL)
        except LogTrimmed as trimmed:
            if self._fenced_while_mounted:
                # An old active copy back after the new one trimmed past it: what only
                # it had cannot be told from what both have. A duplicate, not a loss.
                await self._give_back(peer, active, (await self._run(self.store.base)).lsn)
            await self._seed_from_snapshot(peer, active, head.lsn, trimmed.base_lsn)
            return
        if batch.entries:
            head = await self._run(self.store.apply, batch.entries)
        self.confirmed = (active, head.lsn)
        self.applied_lsn = head.lsn
        self.copy_queue_length = max(0, batch.source_head - head.lsn)
        self.last_inspected = time.time()
        if self.copy_queue_length == 0:
            self._seeding = False
        self._set("Seeding" if self._seeding else "Healthy")

    async def _seed_from_snapshot(
        self, peer: ReplicationPeer, active: str, mine: int, base: int
    ) -> None:
        self._seeding = True
        why = (
            f"seeding from a snapshot of {active}'s copy: its log starts after LSN {base}, "
            f"this copy is at LSN {mine}"
        )
        self._set("Seeding", why)
        await self._publish(force=True)
        log.warning("%s: %s", self._name, why)
        started = time.monotonic()
        try:
            snapshot = await peer.snapshot(self.database, self.seeding_file)
            head = await self._run(self.store.load_snapshot, self.seeding_file)
        finally:
            # Whatever happened, no copy of mail stays behind in a stray file.
            await self._run(self.seeding_file.unlink, True)
        self.applied_lsn = head.lsn
        self.last_inspected = time.time()
        log.warning(
            "%s: seeded from %s's snapshot at LSN %d (%d octets, %.1fs); replaying from there",
            self._name, active, head.lsn, snapshot.octets, time.monotonic() - started,
        )  # fmt: skip

    async def _resynchronize(self, active: str, peer_head: int) -> None:
        """Give back what only this copy had, then seed it again from the active copy."""
        self.confirmed = None
        self._set("Resynchronizing")
        await self._publish(force=True)
        peer = await self._peer_for(active)
        mine = await self._run(self.store.head)
        mine_base = (await self._run(self.store.base)).lsn
        peer_base = _int_or_zero((await peer.head(self.database)).get("base_lsn"))
        # Checksums chain, so they agree up to some LSN and differ after it: found by
        # bisection over what both logs still hold, if they agree where that starts.
        low = max(mine_base, peer_base)
        high = max(low, min(mine.lsn, peer_head))
        theirs = await peer.checksum_at(self.database, low) if low <= mine.lsn else None
        ours = await self._run(self.store.checksum_at, low)
        if theirs is None or theirs != ours:
            # They part before anything both logs hold (the active copy trimmed past
            # the parting point: this copy was away longer than the limits): every
            # message still here may be missing there. A duplicate, not a loss.
            log.warning(
                "%s: the logs part before LSN %d, which the active copy trimmed: every "
                "message delivered here after LSN %d is given back",
                self._name, low, mine_base,
            )  # fmt: skip
            low = high = mine_base
        while low < high:
            middle = (low + high + 1) // 2
            theirs = await peer.checksum_at(self.database, middle)
            ours = await self._run(self.store.checksum_at, middle)
            if theirs is not None and theirs == ours:
                low = middle
            else:
                high = middle - 1
        log.warning(
            "%s: log diverged after LSN %d (this copy had %d, the active copy %d)",
            self._name, low, mine.lsn, peer_head,
        )  # fmt: skip
        await self._give_back(peer, active, low)
        await self._run(self.store.reset)
        self.applied_lsn = 0
        self._seeding = True

    async def _give_back(self, peer: ReplicationPeer, active: str, after: int) -> None:
        """Give the active copy the messages delivered here after `after` and still here."""
        lost = await self._run(self.store.delivered_after, after)
        log.warning(
            "%s: %d messages delivered here after LSN %d go to %s",
            self._name, len(lost), after, active,
        )  # fmt: skip
        if lost:
            _write_durably(self.pending_file, b"".join(change_log.encode(lost)))
            await self._redeliver_pending(peer, active)
        self._fenced_while_mounted = False

    async def _redeliver_pending(self, peer: ReplicationPeer, active: str) -> None:
        entries = change_log.decode(self.pending_file.read_bytes())
        stored = await peer.redeliver(self.database, self.server, entries)
        log.warning(
            "%s: %d messages given back to %s (%d new there)",
            self._name,
            len(entries),
            active,
            stored,
        )
        self.pending_file.unlink()

    async def _measure(self) -> None:
        """The copy's sizes, every MEASURE_INTERVAL, for the next report (store-ops)."""
        now = time.monotonic()
        if now - self._measured_at < MEASURE_INTERVAL:
            return
        self._measured_at = now
        try:
            self.sizes = await self._run(self.store.sizes)
        except Exception:  # sizes are for the operator: never worth stopping the copy
            log.exception("%s: measuring the copy's sizes failed", self._name)

    async def _publish(self, force: bool = False) -> None:
        """Report to the directory when something changed, or every REPORT_INTERVAL."""
        state = (self.status, self.error)
        now = time.time()
        # A new status or error is reported at once; progress (LSN, queue) at most
        # once a second, so a busy copy does not write to the directory on every pull.
        interval = (
            REPORT_INTERVAL if (self.applied_lsn, self.copy_queue_length) == self._progress else 1.0
        )
        if (
            not force
            and self.sizes is None
            and state == self._reported
            and now - self._reported_at < interval
        ):
            return
        sizes = self.sizes
        report = CopyStatusReport(
            database=self.database,
            server=self.server,
            status=self.status,
            copy_queue_length=self.copy_queue_length,
            replay_queue_length=0,  # a batch is replayed as soon as it arrives
            applied_lsn=self.applied_lsn,
            last_inspected_log_time=self.last_inspected,
            error=self.error,
            reported=now,
            database_size=None if sizes is None else sizes.file_bytes,
            message_bytes=None if sizes is None else sizes.message_bytes,
            log_bytes=None if sizes is None else sizes.log_bytes,
        )
        try:
            await self.directory(lambda d: d.report_copy_status(report))
        except DirectoryUnavailable:
            return  # logged once for the whole outage; reported again once it ends
        except Exception:
            log.exception("%s: reporting copy status failed", self._name)
            return
        self._reported, self._reported_at = state, now
        self.sizes = None
        self._progress = (self.applied_lsn, self.copy_queue_length)


def _int_or_zero(value: object) -> int:
    """A peer's optional count (a peer of an older popguard sends none)."""
    try:
        return max(0, int(str(value)))
    except ValueError:
        return 0


def _write_durably(path: Path, content: bytes) -> None:
    """Write, fsync, rename into place, fsync the folder: there whole or not at all."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "wb") as out:
        out.write(content)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
