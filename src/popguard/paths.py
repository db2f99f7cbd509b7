"""Where each piece of state lives inside the data folder.

One place describes the layout, so that every process finds the same file for the
same logical object. A host's data folder holds the directory (while it is a SQLite
file), the organization's TLS material and one folder per server of this host; a
server's folder holds only that server's own files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "POPGUARD_DATA"
DEFAULT_DATA = Path("popguard-data")


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA)


def directory_file(data: Path) -> Path:
    """The SQLite directory of a data folder that names none elsewhere (a [directory]
    section: directory/location.py)."""
    return data / "directory.sqlite"


def tls_dir(data: Path) -> Path:
    return data / "tls"


CA_KEY_NAME = "ca.key"


def ca_key_file(data: Path) -> Path:
    """The organization's CA key: on the host that made the organization only, and
    root's alone when the services run as another user (control/service_user.py)."""
    return tls_dir(data) / CA_KEY_NAME


@dataclass(frozen=True)
class ServerFolder:
    """One server's own folder: its database copies, counters, logs, faults, health."""

    root: Path

    def database_copy_file(self, database: str) -> Path:
        """The SQLite file of this server's copy of `database`."""
        return self.root / "databases" / f"{database}.sqlite"

    def counters_file(self, service: str) -> Path:
        return self.root / "counters" / f"{service}.json"

    def logs_dir(self) -> Path:
        return self.root / "logs"

    def default_protocol_log_dir(self, service: str) -> Path:
        return self.logs_dir() / service

    def mailbox_locks_dir(self) -> Path:
        """One lock file per mailbox: the POP3 session that holds it (any worker)."""
        return self.root / "locks" / "mailboxes"

    def local_socket_file(self, service: str) -> Path:
        """The Unix socket on which `service` serves the front ends of its own host.

        It is inside the data folder, which is its owner's alone (control/permissions),
        so only the service user and root can connect to it, or bind it."""
        return self.root / "run" / f"{service}.sock"

    def fault_file(self, service: str) -> Path:
        return self.root / "faults" / f"{service}.json"

    def health_dir(self) -> Path:
        return self.root / "health"

    def failover_decisions_file(self) -> Path:
        """Active Manager's decisions taken on this server, one JSON line each: the
        health service makes each a recovery action and an escalation."""
        return self.root / "control" / "failovers.jsonl"

    def lease_file(self) -> Path:
        """When this server last renewed its lease (CLOCK_MONOTONIC at sending): what
        its services will judge their own fencing by (Active Manager)."""
        return self.root / "control" / "lease.json"

    def hung_workers_file(self) -> Path:
        """The worker processes this server's masters killed as hung, one JSON line
        each: the health service makes each a recovery action."""
        return self.root / "control" / "hung-workers.jsonl"

    def exits_file(self) -> Path:
        """Exits of this server's services that their supervisor did not ask for."""
        return self.root / "control" / "unexpected-exits.json"

    def results_file(self) -> Path:
        """The health engine's results store: probe results, monitor states, actions."""
        return self.health_dir() / "results.sqlite"


def server_folder(data: Path, server: str) -> ServerFolder:
    return ServerFolder(data / "servers" / server)


def api_token_file(data: Path) -> Path:
    """The bearer token every health API of this data folder accepts."""
    return data / "health" / "api-token"
