"""The POP3 back end (`popguard serve pop3be`), Exchange's MSExchangePOP3BE.

It serves the mailboxes of the databases whose active copy is on this server:
a login locks the mailbox (one session at a time) and takes a snapshot of its
messages; RETR and TOP read the stored wire form; QUIT applies the deletions
in one transaction.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from popguard.directory.directory import Mailbox
from popguard.directory.settings import SortOrder
from popguard.errors import UserError
from popguard.pop3.replies import ResponseCode, err
from popguard.pop3.session import Authenticate, MaildropEntry, Retrieve, ServerSession, Update
from popguard.services.context import ServerContext, fencing_enabled, synchronous_copy_enabled
from popguard.services.copy_acknowledgement import SynchronousCopyWait
from popguard.services.mailbox_lock import MailboxLock, MailboxLocks
from popguard.services.pop3_service import CommandTimer, Connection, Handoff, Pop3Service
from popguard.store.mailbox_database import NotMountedError
from popguard.store.mounted import MountedDatabases

log = logging.getLogger("popguard.pop3be")

FENCE_WATCH_INTERVAL = 0.5  # seconds between looks at the fence, for open sessions
FENCED_LOGIN = (
    "this server cannot renew its lease in the directory, so it serves no mailbox "
    "database now; try again later"
)


class BackendService(Pop3Service):
    role = "mailbox"
    service = "pop3be"
    log_prefix = "POP3BE"
    endpoints = ("pop3be", "pop3be-tls")
    title = "back end"
    serves_local_socket = True

    def __init__(self, context: ServerContext) -> None:
        super().__init__(context)
        self.databases = MountedDatabases(
            context.folder, self.server.name, self.directory, fencing_enabled(context)
        )
        identity = context.tls.replication_identity(self.server.name, self.server.address)
        self.copies = SynchronousCopyWait(
            self.server,
            self.directory,
            context.tls.mutual_client_context(identity),
            synchronous_copy_enabled(context),
        )
        # Held across the server's workers (a file lock per mailbox): see mailbox_lock.
        self._locks = MailboxLocks(context.folder.mailbox_locks_dir())
        self._held: dict[str, MailboxLock] = {}  # session id -> the lock its login took

    def close_resources(self) -> None:
        self.databases.close()

    def periodic(self) -> list[tuple[float, Callable[[], None]]]:
        return (
            [(FENCE_WATCH_INTERVAL, self._end_sessions_if_fenced)]
            if self.databases.fence.enabled
            else []
        )

    def _end_sessions_if_fenced(self) -> None:
        """A fenced server serves no mailbox: its logged-in sessions end now, with a
        line saying why, rather than at their next command; a front end's relay ends
        with them, and the client's next login goes where the database is active."""
        why = self.databases.fence.why_fenced()
        if why is None:
            return
        ended = 0
        for connection, stream in self.open_connections():
            if connection.user and not stream.closed.is_set():
                stream.write(err(FENCED_LOGIN, ResponseCode.SYS_TEMP))
                stream.close()
                ended += 1
        if ended:
            log.warning("%s; ended %d logged-in sessions", why, ended)

    def session_ended(self, session: ServerSession, connection: Connection) -> None:
        lock = self._held.pop(connection.session_id, None)
        if lock is not None:
            lock.release()

    async def authenticate(
        self,
        session: ServerSession,
        request: Authenticate,
        connection: Connection,
        timer: CommandTimer,
    ) -> Handoff | None:
        mailbox = await self.verified_mailbox(session, request, connection, timer)
        if mailbox is None:
            return None
        address = mailbox.address
        lock = self._locks.take(address)
        if lock is None:
            timer.context = "InUse"
            session.login_failed("mailbox is in use by another session", ResponseCode.IN_USE)
            return None
        try:
            self._open_maildrop(session, mailbox, lock, connection, timer)
        finally:
            if connection.session_id not in self._held:
                lock.release()
        return None

    def _open_maildrop(
        self,
        session: ServerSession,
        mailbox: Mailbox,
        lock: MailboxLock,
        connection: Connection,
        timer: CommandTimer,
    ) -> None:
        """Log in a mailbox whose lock this session has taken, or refuse to."""
        address = mailbox.address
        interval = self.settings.MinimumLoginInterval
        wait = lock.last_login() + interval - time.time()
        if interval and wait > 0:
            timer.context = "LoginDelay"
            session.login_failed(
                f"logged in too recently, wait {math.ceil(wait)} more seconds",
                ResponseCode.LOGIN_DELAY,
            )
            return
        try:
            store = self.databases.reader(mailbox.database)
            messages = store.maildrop(address)
        except (NotMountedError, UserError) as exc:
            timer.context = str(exc)
            # Fenced: the directory, not this server's store, is what failed (the health
            # probes read "directory" and no restart or move responder acts on it).
            why = (
                "mailbox database is not available here now, try again later"
                if self.databases.fence.why_fenced() is None
                else FENCED_LOGIN
            )
            session.login_failed(why, ResponseCode.SYS_TEMP)
            return
        except sqlite3.Error:
            log.exception("reading the maildrop of %s failed", address)
            session.login_failed("mailbox store error, try again later", ResponseCode.SYS_TEMP)
            return
        if self.settings.MessageRetrievalSortOrder is SortOrder.DESCENDING:
            messages.sort(key=lambda m: (m.received, m.uid), reverse=True)
        self._held[connection.session_id] = lock
        lock.mark_login()
        self.counters.successful_logins += 1
        connection.user = address
        connection.database = mailbox.database
        timer.context = f"Database={mailbox.database}"
        session.login_succeeded(address, [MaildropEntry(m.uid, m.size) for m in messages])

    def retrieve(self, session: ServerSession, request: Retrieve, connection: Connection) -> None:
        try:
            wire = self.databases.reader(connection.database).wire(connection.user, request.uid)
        except (NotMountedError, UserError, sqlite3.Error) as exc:
            log.warning("RETR of uid %d for %s failed: %s", request.uid, connection.user, exc)
            wire = None
        if wire is not None:
            self.counters.messages_retrieved += 1
        session.message_found(request, wire)

    async def update(self, session: ServerSession, request: Update, connection: Connection) -> None:
        user = connection.user
        if not request.deleted_uids:
            session.update_done(True)
            return
        try:
            removed, lsn = await self.databases.write_logged(
                connection.database, lambda store: store.expunge(user, list(request.deleted_uids))
            )
        except (NotMountedError, UserError, sqlite3.Error) as exc:
            log.warning("deletions for %s not applied: %s", user, exc)
            session.update_done(False)
            return
        self.counters.messages_deleted += removed
        # +OK only once a passive copy has the deletions too: a failover must never
        # bring back mail its user deleted. Otherwise -ERR: they may come back.
        unconfirmed = await self.copies.held(connection.database, lsn)
        if unconfirmed is not None:
            log.warning("deletions for %s applied here only: %s", user, unconfirmed)
        session.update_done(unconfirmed is None)


def serve(data: Path, server_name: str) -> None:
    from popguard.services.pop3_service import serve_pop3

    serve_pop3(data, server_name, BackendService)
