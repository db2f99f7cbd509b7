"""Where each piece of state lives inside the data folder.

One function per kind of file, so that every process finds the same file for
the same logical object and the layout is described in exactly one place.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "POPGUARD_DATA"
DEFAULT_DATA = Path("popguard-data")


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA)


def directory_file(data: Path) -> Path:
    return data / "directory.sqlite"


def tls_dir(data: Path) -> Path:
    return data / "tls"


def server_dir(data: Path, server: str) -> Path:
    return data / "servers" / server


def database_copy_file(data: Path, database: str, server: str) -> Path:
    """The SQLite file of the copy of `database` that lives on `server`."""
    return server_dir(data, server) / "databases" / f"{database}.sqlite"


def counters_file(data: Path, server: str, service: str) -> Path:
    return server_dir(data, server) / "counters" / f"{service}.json"


def default_protocol_log_dir(data: Path, server: str, service: str) -> Path:
    return server_dir(data, server) / "logs" / service
