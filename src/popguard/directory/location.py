"""Where the directory lives: the `[directory]` section of DATA/popguard.toml.

No section: a SQLite file in the data folder, as one machine needs. With
`url = "postgresql://USER@HOST:PORT/DB"`, a PostgreSQL database that every host of
the organization shares. The password is never in popguard.toml (services and
commands of every server read that file): it comes from `password_file`, a file of
mode 0600, or from libpq's own PGPASSFILE (~/.pgpass).

This module reads only its own section, so that it can sit below the directory and
the rest of the file's model (directory/config.py) can include it.
"""

from __future__ import annotations

import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from popguard import paths
from popguard.errors import UserError

CONFIG_FILE = "popguard.toml"
POSTGRES_SCHEMES = ("postgresql", "postgres")


class DirectorySection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # libpq's URL; several hosts may be named (host1:5432,host2:5432) with
    # target_session_attrs=read-write, so that a PostgreSQL failover is followed.
    url: str | None = None
    password_file: Path | None = None
    # A SQLite directory file outside this data folder (several data folders of one
    # machine sharing one directory, in tests and demonstrations).
    path: Path | None = None

    @field_validator("url")
    @classmethod
    def _postgresql_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in POSTGRES_SCHEMES:
            raise ValueError(f"url must start with postgresql://, not {value.split(':')[0]!r}")
        if parts.password is not None:
            raise ValueError(
                "url must not hold a password (every service reads this file); "
                "use password_file or PGPASSFILE"
            )
        if not parts.path.strip("/"):
            raise ValueError("url names no database (postgresql://USER@HOST:PORT/DB)")
        return value

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # Relative to what? Each process may run in another working folder.
        if value is not None and not value.is_absolute():
            raise ValueError(f"an absolute path, got {str(value)!r}")
        return value


@dataclass(frozen=True)
class SqliteLocation:
    path: Path

    def describe(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class PostgresLocation:
    url: str
    password_file: Path | None

    def describe(self) -> str:
        return self.url

    def password(self) -> str | None:
        """The password from `password_file`, refused if others may read the file."""
        if self.password_file is None:
            return None
        try:
            mode = self.password_file.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise UserError(
                    f"{self.password_file}: the directory's password file must be readable "
                    f"by its owner only (chmod 600), not {stat.filemode(mode)}"
                )
            text = self.password_file.read_text()
        except OSError as exc:
            raise UserError(f"{self.password_file}: {exc.strerror}") from None
        password = text.strip("\r\n")
        if not password:
            raise UserError(f"{self.password_file}: the directory's password file is empty")
        return password


DirectoryLocation = SqliteLocation | PostgresLocation


def read_section(data: Path) -> DirectorySection:
    path = data / CONFIG_FILE
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return DirectorySection()
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    section = raw.get("directory", {})
    if not isinstance(section, dict):
        raise UserError(f"{path}: directory: a table ([directory])")
    try:
        return DirectorySection.model_validate(section)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        raise UserError(f"{path}: directory.{where}: {message}") from None


def directory_elsewhere(data: Path) -> bool:
    """Whether DATA/popguard.toml names a directory ([directory] url or path): a host
    that joined an organization, or one on PostgreSQL, rather than the one-machine
    folder that made its directory and holds its CA."""
    section = read_section(data)
    return section.url is not None or section.path is not None


def directory_location(data: Path) -> DirectoryLocation:
    return location_of(read_section(data), data)


def location_of(section: DirectorySection, data: Path) -> DirectoryLocation:
    """Where `section` (of DATA/popguard.toml, or of a file `up --config` is given)
    puts the directory; relative paths are the data folder's."""
    if section.url is not None and section.path is not None:
        raise UserError(f"{data / CONFIG_FILE}: directory: give url or path, not both")
    if section.url is not None:
        password_file = section.password_file
        if password_file is not None and not password_file.is_absolute():
            password_file = data / password_file
        return PostgresLocation(section.url, password_file)
    if section.password_file is not None:
        raise UserError(f"{data / CONFIG_FILE}: directory.password_file needs a url")
    if section.path is not None:
        return SqliteLocation(section.path)
    return SqliteLocation(paths.directory_file(data))
