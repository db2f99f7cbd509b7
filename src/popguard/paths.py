"""Where each piece of state lives inside the data folder.

One place describes the layout, so that every process finds the same file for the
same logical object. A host's data folder holds the directory (while it is a SQLite
file), the organization's TLS material and one folder per server of this host; a
server's folder holds only that server's own files.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from popguard.errors import UserError

DATA_ENV = "POPGUARD_DATA"
DEFAULT_DATA = Path("popguard-data")


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA)


CONFIG_FILE = "popguard.toml"
DIRECTORY_SECTION = "directory"


def directory_location(data: Path) -> Path:
    """The SQLite directory this data folder's processes open.

    By default the file in the data folder. A host that shares an organization's
    directory with other hosts names it in DATA/popguard.toml:

        [directory]
        path = "/abs/path/directory.sqlite"

    Read here, at the bottom, with tomllib alone: every process that opens the
    directory needs it, and a mistake elsewhere in the file (a topology typo) must
    not send a service to another directory. config.py validates the same section.
    """
    section = _directory_section(data)
    where = section.get("path") if section else None
    if where is None:
        return data / "directory.sqlite"
    config = data / CONFIG_FILE
    if not isinstance(where, str) or not where:
        raise UserError(f"{config}: directory.path: a file name, got {where!r}")
    path = Path(where)
    if not path.is_absolute():
        # Relative to what? Each process may run in another working folder.
        raise UserError(f"{config}: directory.path: an absolute path, got {where!r}")
    return path


def directory_elsewhere(data: Path) -> bool:
    """Whether DATA/popguard.toml names a directory of its own ([directory]): a host
    that joined an organization, not the one that made it and holds its CA."""
    return _directory_section(data) is not None


def _directory_section(data: Path) -> dict[str, object] | None:
    config = data / CONFIG_FILE
    try:
        raw = tomllib.loads(config.read_text())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UserError(f"{config}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config}: not valid TOML: {exc}") from None
    section = raw.get(DIRECTORY_SECTION)
    if section is None:
        return None
    if not isinstance(section, dict):
        raise UserError(f"{config}: {DIRECTORY_SECTION}: a table ([{DIRECTORY_SECTION}])")
    return section


def directory_file(data: Path) -> Path:
    """The SQLite directory of this data folder: see directory_location."""
    return directory_location(data)


def tls_dir(data: Path) -> Path:
    return data / "tls"


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

    def fault_file(self, service: str) -> Path:
        return self.root / "faults" / f"{service}.json"

    def health_dir(self) -> Path:
        return self.root / "health"

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
