"""The mailbox database copies a mailbox server serves: those active on it.

Two checks guard every write: the directory must name this server as the
database's active one, and the copy itself must be mounted (see mailstore).

Reads run on the event loop (SQLite reads of one row are quick); writes run on
one worker thread with their own connections, so a commit's fsync never stalls
the sessions of other users.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from popguard.directory.directory import Directory
from popguard.paths import ServerFolder
from popguard.store.fence import Fence
from popguard.store.mailbox_database import MailboxDatabase, NotMountedError

T = TypeVar("T")


class MountedDatabases:
    def __init__(
        self, folder: ServerFolder, server: str, directory: Directory, fencing: bool = False
    ) -> None:
        self.folder = folder
        self.fence = Fence(folder, fencing)
        self.server = server
        self.directory = directory
        self._readers: dict[str, MailboxDatabase] = {}
        self._writers: dict[str, MailboxDatabase] = {}
        self._write_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")

    def _check_mounted(self, database: str) -> None:
        fenced = self.fence.why_fenced()
        if fenced is not None:
            raise NotMountedError(f"database {database} is not served here now: {fenced}")
        active = self.directory.active_server(database)
        if active.lower() != self.server.lower():
            raise NotMountedError(f"database {database} is active on {active}, not {self.server}")

    def _file(self, database: str) -> Path:
        return self.folder.database_copy_file(database)

    def reader(self, database: str) -> MailboxDatabase:
        self._check_mounted(database)
        store = self._readers.get(database)
        if store is None:
            store = self._readers[database] = MailboxDatabase(self._file(database), database)
        return store

    async def write(self, database: str, change: Callable[[MailboxDatabase], T]) -> T:
        """Run `change` on the writer connection of `database`, off the event loop."""
        self._check_mounted(database)

        def in_thread() -> T:
            # Again at the write itself: the wait for this thread may have outlasted
            # the lease (a paused process, a slow disk).
            fenced = self.fence.why_fenced()
            if fenced is not None:
                raise NotMountedError(f"database {database} is not written here now: {fenced}")
            store = self._writers.get(database)
            if store is None:
                store = self._writers[database] = MailboxDatabase(self._file(database), database)
            return change(store)

        return await asyncio.get_running_loop().run_in_executor(self._write_thread, in_thread)

    async def write_logged(
        self, database: str, change: Callable[[MailboxDatabase], T]
    ) -> tuple[T, int]:
        """`write`, and the LSN the copy's log reached with it: what a passive copy must
        hold before the change is acknowledged."""

        def logged(store: MailboxDatabase) -> tuple[T, int]:
            return change(store), store.last_lsn()

        return await self.write(database, logged)

    def close(self) -> None:
        self._write_thread.shutdown(wait=True)
        for store in (*self._readers.values(), *self._writers.values()):
            store.close()
        self._readers.clear()
        self._writers.clear()
