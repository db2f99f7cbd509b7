"""What one service of one server is handed when it starts.

The entry point (`popguard serve SERVICE --server NAME`) builds a ServerContext once
and hands it down: the directory handle, the server as the directory knows it, that
server's own folder and the organization's TLS material. Nothing below the entry point
derives these from the data folder again, so where the directory lives (a file in the
data folder today) is decided in one place.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from popguard import paths
from popguard.directory.config import load_config
from popguard.directory.directory import Directory, Server
from popguard.directory.sql.engine import DirectoryUnavailable
from popguard.errors import UserError
from popguard.net.tls import TlsMaterial
from popguard.paths import ServerFolder

log = logging.getLogger("popguard.context")

DIRECTORY_RETRY = 2.0  # seconds between tries of an unreachable directory at start


def _wait_for_directory(data: Path) -> Directory:
    waited = False
    while True:
        try:
            directory = Directory(data)
        except DirectoryUnavailable as exc:
            if not waited:
                log.error("%s; waiting for it", exc)
                waited = True
            time.sleep(DIRECTORY_RETRY)
            continue
        if waited:
            log.info("the directory is reachable again")
        return directory


@dataclass
class ServerContext:
    # The host's data folder, for what the servers of one host share: the supervisor,
    # popguard.toml, the health mailboxes' credentials. A server's own files are in
    # `folder`, the directory behind `directory`.
    data: Path
    directory: Directory
    server: Server
    folder: ServerFolder
    tls: TlsMaterial

    @classmethod
    def open(cls, data: Path, server_name: str, role: str | None = None) -> ServerContext:
        """The context of `server_name`, which must have `role` if one is named; the
        caller closes it.

        A service started while the directory cannot be reached waits for it here
        rather than exit: under a supervisor, exiting would be a crash loop that ends
        with the service given up (FATAL) by the time the directory is back."""
        directory = _wait_for_directory(data)
        directory.cache_reads()
        try:
            server = directory.get_server(server_name)
            if role is not None and role not in server.roles:
                raise UserError(f"server {server.name} does not have the {role} role")
        except BaseException:
            directory.close()
            raise
        folder = paths.server_folder(data, server.name)
        return cls(data, directory, server, folder, TlsMaterial.of(data))

    def open_directory(self) -> Directory:
        """Another handle on the same directory, for a thread of its own: a SQLite
        connection stays in the thread that made it."""
        return Directory(self.data)

    def close(self) -> None:
        self.directory.close()


def fencing_enabled(context: ServerContext) -> bool:
    """Whether this server's mail services fence themselves by its lease: with Active
    Manager on, another server takes its databases once the lease lapses."""
    try:
        return load_config(context.data).active_manager_on
    except UserError as exc:
        log.error("%s; not fencing by the lease", exc)
        return False


def synchronous_copy_enabled(context: ServerContext) -> bool:
    """Whether acknowledgements wait for a synchronous passive copy (on by default)."""
    try:
        return load_config(context.data).active_manager.synchronous_copy
    except UserError as exc:
        log.error("%s; acknowledgements wait for a passive copy", exc)
        return True
