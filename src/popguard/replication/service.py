"""`popguard serve replication`: Exchange's MSExchangeRepl for one mailbox server.

It serves the change logs of the copies on this server to other mailbox servers
(HTTPS on the server's `replication` port, each side showing a certificate of
the organization's CA: a peer must be a mailbox server of the directory, or the
operator's admin identity), runs one CopyReplicator per copy, and carries out
the dismount and mount steps of a switchover when a move asks for them.

It also keeps every copy on this server small and forgetful: every
`[store] forget_interval` seconds it trims each copy's log behind the slowest copy
that still counts (log_retention), marks copies too far behind for a reseed (when
this server holds the active copy), and runs the copy's `forget` (free pages given
back, WAL checkpointed and truncated). It serves snapshots for seeding (VACUUM INTO,
shipped with its SHA-256) and removes the snapshot files a killed process left.

All store work runs on one worker thread, in order, with one connection per copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from popguard.directory.config import ActiveManagerSection, Store, load_config
from popguard.directory.directory import (
    LEASE_RENEWAL,
    LEASE_SECONDS,
    CopyStatusReport,
    Directory,
    Server,
)
from popguard.directory.sql.engine import DIRECTORY_ERRORS, DirectoryUnavailable
from popguard.errors import UserError
from popguard.net import health_api, tls
from popguard.net.serving import listen
from popguard.replication.active_manager import ActiveManager
from popguard.replication.copy_replicator import CopyReplicator
from popguard.replication.directory_thread import DirectoryThread
from popguard.replication.log_retention import (
    SUSPENDED,
    CopyProgress,
    RetentionLimits,
    plan_trim,
)
from popguard.replication.peer import (
    PeerProtocolError,
    PeerRefused,
    PeerUnavailable,
    ReplicationPeer,
)
from popguard.replication.synchronous import NotRecorded, SynchronousCopies
from popguard.services.context import ServerContext
from popguard.store import change_log
from popguard.store.change_log import LogFormatError
from popguard.store.mailbox_database import (
    ACTIVE,
    Forgotten,
    LogHead,
    LogIntegrityError,
    LogLag,
    LogTrimmedError,
    MailboxDatabase,
    NotMountedError,
    QuotaExceededError,
    RestoredMessage,
    StoreFullError,
    remove_leftovers,
)

log = logging.getLogger("popguard.replication")

T = TypeVar("T")

MAX_WAIT = 30.0
MAX_CATCH_UP = 120.0
MAX_REQUEST_BODY = 512 * 1024 * 1024
POLL = 0.02  # how often a held pull or a catch-up looks at the log again
# A failover waits for the target's health report at most this long (then judges the
# copy by its status alone): a dead server has already cost a lease.
HEALTH_REPORT_TIMEOUT = 3.0
# A lease renewal the directory has not answered within this is taken for a failure
# (the failsafe's question goes out) while it is still on its way: over a silently cut
# link it would take the engine's 5 s to fail, and the fence falls 6 s after the last
# renewal that was sent, at most 2 s before.
RENEWAL_PATIENCE = 1.5
LEASE_TICK = 0.25  # how often the renewal's task looks whether one is due
# How long a stopping service waits for Active Manager's move under way.
DECIDER_STOP_PATIENCE = 10.0
SNAPSHOT_CHUNK = 1 << 20
_SERVER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,62}$")


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


class ReplicationService:
    def __init__(self, context: ServerContext) -> None:
        self.context = context
        # Every directory call of the service runs on one of these threads, never on
        # the event loop (directory_thread.py); the lease's renewal has its own, so that
        # nothing queued before it can make it late.
        self._directory = DirectoryThread(context.open_directory, "replication-directory")
        self._lease_directory = DirectoryThread(context.open_directory, "replication-lease")
        self._renewal: tuple[float, asyncio.Future[tuple[float, list[Server]]]] | None = None
        self.server: Server = context.server
        self._lease_sent = 0.0  # monotonic time of the last renewal that succeeded
        self._failsafe_sent = 0.0  # ... of the last failsafe question all peers agreed to
        self._steady_since: float | None = None  # renewing without a failure since
        self._mailbox_peers: list[Server] = []  # the other mailbox servers, as last read
        identity = context.tls.replication_identity(self.server.name, self.server.address)
        self._server_tls = context.tls.mutual_server_context(identity)
        self._client_tls = context.tls.mutual_client_context(identity)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replication-store")
        self._stores: dict[str, MailboxDatabase] = {}
        self._replicators: dict[str, tuple[CopyReplicator, asyncio.Task[None]]] = {}
        self._peers: dict[str, ReplicationPeer] = {}
        self._stop = asyncio.Event()
        self._forgotten_at: dict[str, float] = {}  # database -> monotonic time of last run
        self._synchronous_copy = self._active_manager_settings().synchronous_copy
        self._log_grew: dict[str, asyncio.Event] = {}  # database -> set when its log grew
        self._sync = SynchronousCopies(self._record_synchronous, self._recorded_synchronous)
        # The organization's servers and this server's copies as the last reconcile
        # (every second) read them, by lowercased name. A request that finds its peer
        # and its database here needs no directory: the directory thread is one, and
        # the first read after the directory went away holds it for the connect timeout
        # (5 s), longer than a delivery waits for its copy's pull (SYNC_TIMEOUT).
        self._servers: dict[str, Server] = {}
        self._local_copies: dict[str, str] = {}

    # Stores and peers ---------------------------------------------------------------

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _open(self, database: str) -> MailboxDatabase:
        """Runs on the store thread (the connection is used from there only)."""
        store = self._stores.get(database)
        if store is None:
            path = self.context.folder.database_copy_file(database)
            store = self._stores[database] = MailboxDatabase(path, database)
        return store

    async def _peer(self, server_name: str) -> ReplicationPeer:
        return self._peer_of(await self._directory(lambda d: d.get_server(server_name)))

    def _peer_of(self, server: Server) -> ReplicationPeer:
        peer = self._peers.get(server.name)
        if peer is None or peer.server != server:
            if peer is not None:
                asyncio.get_running_loop().create_task(peer.aclose())
            peer = self._peers[server.name] = ReplicationPeer(server, self._client_tls)
        return peer

    # The copies on this server ----------------------------------------------------------

    async def _reconcile(self) -> None:
        """Start a replicator for each copy on this server, stop those of removed copies."""
        copies, servers = await self._directory(lambda d: (d.database_copies(), d.list_servers()))
        wanted = {c.database for c in copies if c.server.lower() == self.server.name.lower()}
        self._servers = {server.name.lower(): server for server in servers}
        self._local_copies = {database.lower(): database for database in wanted}
        for database, (_, task) in list(self._replicators.items()):
            if task.done():  # it ended on an error it could not handle: start it again
                log.error(
                    "copy %s\\%s: replicator ended; starting it again", database, self.server.name
                )
                del self._replicators[database]
        for database in wanted - set(self._replicators):
            store = await self._run(self._open, database)
            pending = self.context.folder.database_copy_file(database).with_suffix(".redeliver")
            replicator = CopyReplicator(
                self._directory,
                self.server.name,
                database,
                store,
                pending,
                self._executor,
                self._peer,
            )
            task = asyncio.create_task(replicator.run(self._stop), name=f"replicate {database}")
            self._replicators[database] = (replicator, task)
            log.info("copy %s\\%s: replicator started", database, self.server.name)
        for database in set(self._replicators) - wanted:
            _, task = self._replicators.pop(database)
            task.cancel()
            log.info("copy %s\\%s removed: replicator stopped", database, self.server.name)

    # The HTTP API -------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BODY, middlewares=[self._authorize])
        app.add_routes(
            [
                web.get("/v1/databases/{database}/log", self._log),
                web.get("/v1/databases/{database}/checksum/{lsn}", self._checksum),
                web.get("/v1/databases/{database}/head", self._head),
                web.get("/v1/databases/{database}/snapshot", self._snapshot),
                web.post("/v1/databases/{database}/dismount", self._dismount),
                web.post("/v1/databases/{database}/mount", self._mount),
                web.post("/v1/databases/{database}/redeliver", self._redeliver),
                web.post("/v1/databases/{database}/restore", self._restore),
                web.get("/v1/databases/{database}/usage", self._usage),
                web.post("/v1/databases/{database}/acknowledgement", self._acknowledgement),
                web.get("/v1/failsafe", self._failsafe),
            ]
        )
        return app

    @web.middleware
    async def _authorize(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        certificate = ssl_object.getpeercert() if ssl_object else None
        peer, unit = tls.peer_name(certificate), tls.peer_unit(certificate)
        if peer is None:
            return _error(401, "a client certificate of the organization is required")
        wanted_unit = tls.ADMIN_UNIT if peer == tls.ADMIN_IDENTITY else tls.REPLICATION_UNIT
        if unit != wanted_unit:
            return _error(403, f"{peer}'s certificate is not a replication or admin certificate")
        request["peer"] = peer
        # The failsafe's question is answered on the certificate alone: it is asked when
        # the directory may be unreachable, and its answer (whether this server renewed
        # its lease lately) is no secret from a replication certificate of the CA.
        if peer != tls.ADMIN_IDENTITY and request.path != "/v1/failsafe":
            try:
                server = await self._server_named(peer)
            except UserError:
                return _error(403, f"{peer} is not a server of this organization")
            if "mailbox" not in server.roles:
                return _error(403, f"{peer} is not a mailbox server")
        try:
            return await handler(request)
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"bad request: {exc}")
        except (NotMountedError, LogIntegrityError) as exc:
            return _error(409, str(exc))

    async def _server_named(self, name: str) -> Server:
        """The server as the last reconcile read it; one it did not see (added since,
        or a name of no server) is asked of the directory."""
        known = self._servers.get(name.lower())
        if known is not None:
            return known
        return await self._directory(lambda d: d.get_server(name))

    async def _store_for(self, request: web.Request) -> tuple[str, MailboxDatabase]:
        name = request.match_info["database"]
        database = self._local_copies.get(name.lower())
        if database is None:  # a copy added since the last reconcile, or none
            copies = await self._directory(lambda d: d.database_copies())
            database = next(
                (
                    c.database
                    for c in copies
                    if c.database.lower() == name.lower()
                    and c.server.lower() == self.server.name.lower()
                ),
                None,
            )
        if database is None:
            raise web.HTTPNotFound(text=f"no copy of {name} on {self.server.name}")
        return database, await self._run(self._open, database)

    async def _log(self, request: web.Request) -> web.Response:
        database, store = await self._store_for(request)
        after = int(request.query["after"])
        checksum = bytes.fromhex(request.query["checksum"])
        wait = min(max(float(request.query.get("wait", "0")), 0.0), MAX_WAIT)
        max_bytes = min(max(int(request.query.get("max_bytes", "1")), 1), 64 * 1024 * 1024)
        base = await self._run(store.base)
        if after < base.lsn:
            return web.json_response(
                {"error": f"log trimmed: it starts after LSN {base.lsn}", "base_lsn": base.lsn},
                status=410,
            )
        mine = await self._run(store.checksum_at, after)
        if mine is None and after < (base := await self._run(store.base)).lsn:
            # Trimmed between the two looks: the asker is behind, not diverged.
            return web.json_response(
                {"error": f"log trimmed: it starts after LSN {base.lsn}", "base_lsn": base.lsn},
                status=410,
            )
        if mine != checksum:
            head = await self._run(store.head)
            return web.json_response({"error": "log diverged", "last_lsn": head.lsn}, status=409)
        if self._synchronous_copy and request["peer"] != tls.ADMIN_IDENTITY:
            await self._confirmed(database, request["peer"], after, store)
        deadline = time.monotonic() + wait
        while True:
            grew = self._log_grew.setdefault(database, asyncio.Event())
            try:
                entries = await self._run(store.entries_after, after, max_bytes)
            except LogTrimmedError as exc:  # trimmed while the pull was held
                return web.json_response({"error": str(exc), "base_lsn": exc.base_lsn}, status=410)
            if entries or time.monotonic() >= deadline or self._stop.is_set():
                break
            # Another process wrote the log; an acknowledgement waiting for it says so
            # at once, and anything else is seen within POLL.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(grew.wait(), POLL)
        head = await self._run(store.head)
        return web.Response(
            body=b"".join(change_log.encode(entries)),
            content_type="application/octet-stream",
            headers={"X-Last-Lsn": str(head.lsn)},
        )

    async def _confirmed(
        self, database: str, peer: str, after: int, store: MailboxDatabase
    ) -> None:
        """A passive copy's pull says it holds the log through `after`: what the
        acknowledgements of this active copy wait for."""
        if await self._run(store.role) != ACTIVE:
            return

        async def head() -> int:
            return (await self._run(store.head)).lsn

        try:
            server = (await self._server_named(peer)).name  # the directory's spelling
            await self._sync.confirmed(database, server, after, head)
        except DIRECTORY_ERRORS as exc:  # the pull goes on; the next one confirms again
            log.warning("%s\\%s: confirmation of LSN %d not noted: %s", database, peer, after, exc)

    async def _acknowledgement(self, request: web.Request) -> web.Response:
        """Delivery and the back end of this server: wait until a synchronous copy holds
        the change at `lsn` before they acknowledge it (replication/synchronous.py)."""
        if request["peer"].lower() not in (self.server.name.lower(), tls.ADMIN_IDENTITY.lower()):
            return _error(403, "only this server's own services wait for its copies")
        database, store = await self._store_for(request)
        lsn = int((await request.json())["lsn"])
        if await self._run(store.role) != ACTIVE:
            return _error(409, f"the copy of {database} on {self.server.name} is not active")
        self._log_grew.pop(database, asyncio.Event()).set()  # wake the held pulls
        try:
            acknowledgement = await self._sync.acknowledge(database, lsn)
        except NotRecorded as exc:
            return _error(503, str(exc))
        except DIRECTORY_ERRORS as exc:
            return _error(503, f"the directory cannot say which copies are synchronous: {exc}")
        return web.json_response({"copy": acknowledgement.copy, "reason": acknowledgement.reason})

    async def _record_synchronous(self, database: str, server: str, synchronous: bool) -> None:
        await self._directory(lambda d: d.set_copy_synchronous(database, server, synchronous))

    async def _recorded_synchronous(self, database: str) -> dict[str, bool]:
        copies = await self._directory(lambda d: d.database_copies(database))
        return {c.server: c.synchronous for c in copies if not c.is_active}

    async def _checksum(self, request: web.Request) -> web.Response:
        _, store = await self._store_for(request)
        checksum = await self._run(store.checksum_at, int(request.match_info["lsn"]))
        if checksum is None:
            raise web.HTTPNotFound(text="no such LSN")
        return web.json_response({"checksum": checksum.hex()})

    async def _head(self, request: web.Request) -> web.Response:
        _, store = await self._store_for(request)
        head, base = await self._run(store.head), await self._run(store.base)
        role = await self._run(store.role)
        return web.json_response(
            {"lsn": head.lsn, "checksum": head.checksum.hex(), "role": role, "base_lsn": base.lsn}
        )

    async def _snapshot(self, request: web.Request) -> web.StreamResponse:
        """A consistent snapshot of this copy, for seeding another: made by VACUUM INTO
        in a thread of its own (a read transaction: deliveries go on), its SHA-256 and
        LSN sent first, then its octets; the file goes as soon as it is sent."""
        database, store = await self._store_for(request)
        folder = self.context.folder.database_copy_file(database).parent
        out = folder / f"{database}.snapshot-{secrets.token_hex(6)}.sqlite"
        try:
            head, sha256 = await asyncio.to_thread(store.snapshot, out)
            response = web.StreamResponse(
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(out.stat().st_size),
                    "X-Snapshot-Sha256": sha256,
                    "X-Snapshot-Lsn": str(head.lsn),
                }
            )
            source = await asyncio.to_thread(out.open, "rb")
            try:
                await response.prepare(request)
                while chunk := await asyncio.to_thread(source.read, SNAPSHOT_CHUNK):
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionError as exc:  # the seeding copy went away: it starts again
                log.warning(
                    "%s\\%s: snapshot for %s cut short: %s",
                    database, self.server.name, request["peer"], exc,
                )  # fmt: skip
                return response
            finally:
                source.close()
            log.warning(
                "%s\\%s: snapshot at LSN %d sent to %s",
                database, self.server.name, head.lsn, request["peer"],
            )  # fmt: skip
            return response
        finally:
            out.unlink(missing_ok=True)

    async def _dismount(self, request: web.Request) -> web.Response:
        database, store = await self._store_for(request)
        head = await self._run(store.fence)
        self._sync.forget(database)
        log.warning("%s\\%s dismounted at LSN %d", database, self.server.name, head.lsn)
        return web.json_response({"lsn": head.lsn, "checksum": head.checksum.hex()})

    async def _mount(self, request: web.Request) -> web.Response:
        """Mount this copy once its log reaches the old active copy's last entry."""
        database, store = await self._store_for(request)
        body = await request.json()
        catch_up = min(max(float(body.get("catch_up", 30)), 0.0), MAX_CATCH_UP)
        expected = None
        if body.get("lsn") is not None:
            expected = LogHead(int(body["lsn"]), bytes.fromhex(str(body["checksum"])))
            deadline = time.monotonic() + catch_up
            while (await self._run(store.head)).lsn < expected.lsn:
                if time.monotonic() >= deadline:
                    head = await self._run(store.head)
                    return _error(
                        409,
                        f"copy did not catch up within {catch_up:g}s: at LSN {head.lsn} "
                        f"of {expected.lsn}",
                    )
                await asyncio.sleep(POLL)
        head = await self._run(store.mount, expected)
        self._sync.forget(database)  # the activation cleared the directory's marks
        log.warning("%s\\%s mounted at LSN %d", database, self.server.name, head.lsn)
        return web.json_response({"lsn": head.lsn, "checksum": head.checksum.hex()})

    async def _redeliver(self, request: web.Request) -> web.Response:
        database, store = await self._store_for(request)
        origin = request.headers.get("X-Origin", "")
        if not _SERVER_NAME.match(origin):
            return _error(400, "X-Origin must name the server the messages come from")
        if request["peer"] != tls.ADMIN_IDENTITY and origin.lower() != request["peer"].lower():
            return _error(403, f"{request['peer']} may give back only its own messages")
        try:
            entries = change_log.decode(await request.read())
        except LogFormatError as exc:
            return _error(400, f"malformed entries: {exc}")
        stored = 0
        for entry in entries:
            if entry.kind != "deliver" or entry.payload is None or entry.size is None:
                return _error(400, f"entry {entry.lsn} is not a delivery")
            # The chain's checksum names the entry whoever gives it back, so two old
            # copies giving back the same lost message store it once.
            key = f"{entry.lsn}:{entry.checksum.hex()}"
            before = await self._run(store.last_lsn)
            await self._run(
                functools.partial(
                    store.redeliver, key, entry.address, entry.payload, entry.size, entry.at
                )
            )
            stored += int(await self._run(store.last_lsn) != before)
        log.warning(
            "%s: %d of %d messages from %s's lost log stored again",
            database, stored, len(entries), origin,
        )  # fmt: skip
        return web.json_response({"stored": stored})

    async def _restore(self, request: web.Request) -> web.Response:
        """The operator's restore-mailbox: one mailbox's messages from a backup, those it
        does not hold stored in one transaction of this (active) copy, whose log ships
        them to the passive copies as any write. A `quota` (octets) the mailbox would go
        over refuses them all (507, with the numbers)."""
        if request["peer"] != tls.ADMIN_IDENTITY:
            return _error(403, "only the operator restores mailboxes")
        database, store = await self._store_for(request)
        quota = None if "quota" not in request.query else int(request.query["quota"])
        try:
            entries = change_log.decode(await request.read())
        except LogFormatError as exc:
            return _error(400, f"malformed entries: {exc}")
        addresses = {entry.address for entry in entries}
        if len(addresses) != 1:
            return _error(400, "a restore gives back messages of one mailbox")
        messages = []
        for entry in entries:
            if entry.kind != "deliver" or entry.payload is None or entry.size is None:
                return _error(400, f"entry {entry.lsn} is not a delivery")
            messages.append(RestoredMessage(entry.payload, entry.size, entry.at))
        (address,) = addresses
        try:
            restored = await self._run(store.restore, address, messages, quota)
        except QuotaExceededError as exc:
            return web.json_response(
                {"error": str(exc), "address": address, "used": exc.used, "needed": exc.size,
                 "quota": exc.quota},
                status=507,
            )  # fmt: skip
        except StoreFullError as exc:
            return _error(503, f"the disk of {database} on {self.server.name} is full: {exc}")
        self._log_grew.pop(database, asyncio.Event()).set()  # wake the held pulls
        log.warning(
            "%s: restored %d messages to %s (%d octets), %d already there",
            database, restored.restored, address, restored.octets, restored.already_there,
        )  # fmt: skip
        return web.json_response(
            {"restored": restored.restored, "already_there": restored.already_there,
             "octets": restored.octets}
        )  # fmt: skip

    async def _usage(self, request: web.Request) -> web.Response:
        """Each mailbox's message count and octets in this copy (get-mailbox, store-ops)."""
        _, store = await self._store_for(request)
        usage = await self._run(store.all_usage)
        return web.json_response({a: [u.items, u.octets] for a, u in usage.items()})

    # Keeping copies small and forgetful ---------------------------------------------------

    def _store_settings(self) -> Store:
        try:
            return load_config(self.context.data).store
        except UserError as exc:  # a bad popguard.toml: say so, keep to the defaults
            log.error("%s; forgetting with the default [store] settings", exc)
            return Store()

    async def _maintain_all(self) -> None:
        settings = self._store_settings()
        now = time.monotonic()
        for database in list(self._replicators):
            if now - self._forgotten_at.get(database, -1e18) < settings.forget_interval:
                continue
            self._forgotten_at[database] = now
            try:
                await self._maintain(database, settings)
            except DirectoryUnavailable:  # logged once for the whole outage
                # No trimming without the copies' reports; deleted mail is forgotten anyway.
                await self._forget_only(database)
            except Exception:
                log.exception("%s\\%s: trimming or forgetting failed", database, self.server.name)

    async def _forget_only(self, database: str) -> None:
        try:
            store = await self._run(self._open, database)
            await self._forget(store)
        except Exception:
            log.exception("%s\\%s: forgetting failed", database, self.server.name)

    async def _forget(self, store: MailboxDatabase) -> Forgotten:
        """The copy's forget, one vacuum step per turn of the store thread: a pull's
        answer or a synchronous confirmation queued meanwhile goes between two steps,
        instead of after all of them (a large deletion's 40 s dropped the synchronous
        copy: bench.delivery_beside_forget --burst)."""
        freed, done = 0, False
        while not done:
            step, done = await self._run(store.give_back_pages)
            freed += step
        return Forgotten(freed, await self._run(store.empty_wal))

    async def _maintain(self, database: str, settings: Store) -> None:
        """Trim this copy's log, mark copies too far behind (on the active copy), then
        make what was deleted unreadable from this copy's files."""
        store = await self._run(self._open, database)
        head, base = await self._run(store.head), await self._run(store.base)

        def read(d: Directory) -> tuple[str, dict[tuple[str, str], CopyStatusReport], list[Any]]:
            return d.active_server(database), d.copy_status_reports(), d.database_copies(database)

        active_server, reports, copies = await self._directory(read)
        mounted = await self._run(store.role) == ACTIVE
        active = mounted and active_server.lower() == self.server.name.lower()
        others = []
        for copy in copies:
            report = reports.get((copy.database, copy.server))
            if copy.server.lower() == self.server.name.lower() or report is None:
                continue
            lag = LogLag(None, 0)
            if base.lsn <= report.applied_lsn < head.lsn:
                lag = await self._run(store.lag, report.applied_lsn)
            others.append(CopyProgress(copy.server, report.status, report.applied_lsn, lag))
        limits = RetentionLimits(settings.max_copy_lag_seconds, settings.max_copy_lag_bytes)
        plan = plan_trim(head.lsn, base.lsn, others, limits, time.time())
        through: int | None = plan.through
        if active:
            try:
                for server, why in plan.reseed:
                    await self._suspend(reports[(database, server)], why)
            except DirectoryUnavailable:
                # A copy is trimmed past only once the directory says why; until then
                # the log stays, and forgetting goes on regardless.
                through = None
        else:
            replicator, _ = self._replicators[database]
            confirmed = None if mounted else replicator.trimmable_through(active_server)
            through = None if confirmed is None else min(plan.through, confirmed)
        trimmed = 0 if through is None else await self._run(store.trim, through)
        forgotten = await self._forget(store)
        if trimmed or forgotten.pages_freed or not forgotten.wal_emptied:
            log.info(
                "%s\\%s: %d log entries trimmed (through LSN %d; kept for %s), %d pages "
                "given back, WAL %s",
                database, self.server.name, trimmed, through or 0, plan.held_for or "no copy",
                forgotten.pages_freed,
                "emptied" if forgotten.wal_emptied else "busy: emptied on the next run",
            )  # fmt: skip

    async def _suspend(self, report: CopyStatusReport, why: str) -> None:
        log.warning("%s\\%s: %s", report.database, report.server, why)
        suspended = CopyStatusReport(
            database=report.database,
            server=report.server,
            status=SUSPENDED,
            copy_queue_length=report.copy_queue_length,
            replay_queue_length=report.replay_queue_length,
            applied_lsn=report.applied_lsn,
            last_inspected_log_time=report.last_inspected_log_time,
            error=f"suspended by {self.server.name}: {why}",
            reported=time.time(),
        )
        await self._directory(lambda d: d.report_copy_status(suspended))

    # Running --------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await runner.setup()
        address, port = self.server.address, self.server.port("replication")
        site = web.TCPSite(runner, address, port, ssl_context=self._server_tls, reuse_address=True)

        for leftover in remove_leftovers(self.context.folder.database_copy_file("x").parent):
            log.warning("removed %s, left by a process that did not finish", leftover)
        await listen(site.start, "replication", address, port)
        log.info("replication listening on %s:%d, pid %d", address, port, os.getpid())
        # Active Manager in a thread of its own, with its own event loop: its directory
        # calls and the moves it makes never hold up this loop, which answers the peers.
        stop_deciding = threading.Event()
        deciding = threading.Thread(
            target=lambda: asyncio.run(self._decide_failovers(stop_deciding)),
            name="active-manager", daemon=True,
        )  # fmt: skip
        if self._active_manager_enabled():
            deciding.start()
        # The lease's renewal runs beside everything else, never behind it: a forget run
        # after a large deletion lasts seconds, a directory read over a dead link up to
        # 5 s, and a renewal held up that long would fence the server.
        leasing = asyncio.create_task(self._keep_lease(stop), name="lease")
        maintaining: asyncio.Task[None] | None = None
        try:
            while not stop.is_set():
                try:
                    await self._reconcile()
                except Exception:
                    log.exception("reading this server's copies from the directory failed")
                if maintaining is None or maintaining.done():
                    maintaining = asyncio.create_task(self._maintain_all(), name="maintenance")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
        finally:
            self._stop.set()
            stop_deciding.set()
            for task in (leasing, maintaining):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if deciding.is_alive():  # a move under way gets a while to finish
                await asyncio.to_thread(deciding.join, DECIDER_STOP_PATIENCE)
            for _, task in self._replicators.values():
                task.cancel()
            await asyncio.gather(
                *(t for _, t in self._replicators.values()), return_exceptions=True
            )
            await runner.cleanup()
            for peer in self._peers.values():
                await peer.aclose()
            self._executor.submit(self._close_stores).result()
            self._executor.shutdown()
            self._directory.close()
            self._lease_directory.close()
            self.context.close()

    def _active_manager_settings(self) -> ActiveManagerSection:
        try:
            return load_config(self.context.data).active_manager
        except UserError as exc:
            log.error("%s; no automatic failover, no synchronous copies", exc)
            return ActiveManagerSection(enabled=False, synchronous_copy=False)

    def _active_manager_enabled(self) -> bool:
        try:
            return load_config(self.context.data).active_manager_on
        except UserError:
            return False  # said by _active_manager_settings

    def _health_report(self, server: Server) -> list[dict[str, Any]]:
        """`server`'s health sets as its health service reports them (Active Manager
        never activates a copy on a server they call Unhealthy). Runs in a thread."""
        data = self.context.data
        rows = health_api.request(server, health_api.api_token(data), health_api.api_tls(data),
                                  "GET", "healthreport", timeout=HEALTH_REPORT_TIMEOUT)  # fmt: skip
        if not isinstance(rows, list):
            raise UserError(f"{server.name}: the health report is not a list")
        return rows

    async def _decide_failovers(self, stop: threading.Event) -> None:
        """Active Manager's look once a second, on its own thread and loop: a failover
        may take seconds (mounting, catching up) and must not hold up the renewal."""
        # A handle of its own: the moves it makes run beside the service's own reads.
        manager = ActiveManager(
            self.server.name,
            self.context.open_directory(),
            self.context.tls,
            synchronous_copy=self._synchronous_copy,
            decisions_file=self.context.folder.failover_decisions_file(),
            steady=self.steady,
            health_report=self._health_report,
        )
        log.info("Active Manager on: a mailbox server whose lease lapses fails over")
        try:
            while not stop.is_set():
                try:
                    await manager.tick()
                except Exception:
                    log.exception("Active Manager's look failed")
                await asyncio.to_thread(stop.wait, 1.0)
        finally:
            manager.directory.close()

    async def _keep_lease(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._renew_lease()
            except Exception:
                log.exception("the lease's renewal failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LEASE_TICK)

    async def _renew_lease(self) -> None:
        """This server's lease in the directory, every LEASE_RENEWAL seconds (Active
        Manager: another server may act on its databases only once it has lapsed, by
        the directory's clock). The time of sending a renewal that succeeded goes to
        the lease file, on this host's monotonic clock: what the fence judges by.

        When the directory cannot be reached, the failsafe (Patroni's): if every other
        mailbox server of the organization answers that it cannot reach the directory
        either, nobody can fail anything over (a failover is a transaction in the
        directory, and a decider waits a whole lease of reachability after an outage
        before it acts), so this server goes on serving: the lease file is written
        with the time the question was sent. One server that does not answer, or that
        reaches the directory, and the fence falls 6 s after the last good answer,
        4 s before any decider may act."""
        now = time.monotonic()
        if self._renewal is None:
            if now - self._lease_sent < LEASE_RENEWAL or now - self._failsafe_sent < LEASE_RENEWAL:
                return
            self._renewal = (now, self._lease_directory.submit(self._renew_on_thread))
        elif now - self._failsafe_sent < LEASE_RENEWAL:
            return  # one still on its way, and the failsafe held lately
        sent, renewal = self._renewal
        patience = max(0.0, sent + RENEWAL_PATIENCE - time.monotonic())
        await asyncio.wait({renewal}, timeout=patience)
        try:
            if not renewal.done():
                raise DirectoryUnavailable(
                    f"the directory has not answered a lease renewal in {RENEWAL_PATIENCE:g} s"
                )
            self._renewal = None
            remaining, self._mailbox_peers = renewal.result()
        except DIRECTORY_ERRORS as exc:
            self._steady_since = None
            if self._lease_sent > 0 and not isinstance(exc, DirectoryUnavailable):
                log.warning("renewing the lease of %s failed: %s", self.server.name, exc)
            if self._lease_sent > 0 and await self._failsafe_holds():
                if not self._failsafe_sent:
                    log.warning("the directory is unreachable from every mailbox server: "
                                "serving on (failsafe), nobody can fail over")  # fmt: skip
                self._failsafe_sent = sent
                self._write_lease_file(sent, None)
            elif self._failsafe_sent:
                log.error("failsafe over: a mailbox server reaches the directory or does not "
                          "answer; this server fences itself")  # fmt: skip
                self._failsafe_sent = 0.0
            return
        if self._failsafe_sent:
            log.warning("the directory is reachable again: failsafe over")
            self._failsafe_sent = 0.0
        if self._steady_since is None:
            self._steady_since = sent
        self._lease_sent = sent
        self._write_lease_file(sent, remaining)

    def _renew_on_thread(self, directory: Directory) -> tuple[float, list[Server]]:
        remaining = directory.renew_lease(self.server.name)
        peers = [
            s for s in directory.list_servers()
            if "mailbox" in s.roles and s.name.lower() != self.server.name.lower()
        ]  # fmt: skip
        return remaining, peers

    async def _failsafe_holds(self) -> bool:
        peers = [self._peer_of(s) for s in self._mailbox_peers]

        async def unreachable_there(peer: ReplicationPeer) -> bool:
            try:
                return not await peer.directory_reachable()
            except (PeerUnavailable, PeerRefused, PeerProtocolError):
                return False

        answers = await asyncio.gather(*(unreachable_there(p) for p in peers))
        return all(answers)

    async def _failsafe(self, request: web.Request) -> web.Response:
        """Another mailbox server, which cannot reach the directory, asks whether this
        one can: a lease renewed lately, and no renewal overdue, says yes."""
        now = time.monotonic()
        overdue = self._renewal is not None and now - self._renewal[0] >= RENEWAL_PATIENCE
        reachable = not overdue and now - self._lease_sent < LEASE_RENEWAL + RENEWAL_PATIENCE
        return web.json_response({"directory_reachable": reachable})

    def steady(self) -> bool:
        """Whether this server has renewed its lease without a failure for a whole lease:
        Active Manager decides nothing before (every live server renews meanwhile)."""
        since = self._steady_since
        return since is not None and time.monotonic() - since >= LEASE_SECONDS

    def _write_lease_file(self, sent: float, remaining: float | None) -> None:
        lease_file = self.context.folder.lease_file()
        lease_file.parent.mkdir(parents=True, exist_ok=True)
        partial = lease_file.with_suffix(".partial")
        content = {"sent_monotonic": sent, "seconds": remaining, "failsafe": remaining is None}
        partial.write_text(json.dumps(content))
        os.replace(partial, lease_file)  # whole or not at all, for its readers

    def _close_stores(self) -> None:
        for store in self._stores.values():
            store.close()


def serve(data: Path, server_name: str) -> None:
    from popguard.net.serving import run_until_stopped, setup_logging

    setup_logging("replication", server_name)
    service = ReplicationService(ServerContext.open(data, server_name, "mailbox"))
    run_until_stopped(service.run)
