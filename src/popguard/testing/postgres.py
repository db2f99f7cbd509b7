"""A real PostgreSQL for tests and benchmarks: Debian's server, in a folder of its own.

`initdb` and `pg_ctl` from the installed `postgresql` package, run as an unprivileged
user (PostgreSQL refuses to run as root): when the caller is root, as the package's
own `postgres` user. It listens on one address and port of the caller's choosing and
on a Unix socket in its folder; local connections are trusted (the harness makes
roles and databases through them), TCP logins need a password (scram-sha-256), as a
production directory would.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import psycopg

from popguard.testing.net import free_port

ROLE = "popguard"


def postgres_bin(tool: str) -> str:
    found = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"),
        key=lambda path: int(Path(path).parent.parent.name),
    )
    if found:
        return found[-1]
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"{tool} not found: install Debian's postgresql package")
    return path


@dataclass
class PostgresServer:
    folder: Path
    host: str
    port: int
    password: str
    run_as: str | None  # the user PostgreSQL runs as, when the caller is root
    # What the server's commands run inside: ["ip", "netns", "exec", NS] for a
    # PostgreSQL on a host of its own (popguard.testing.hosts).
    prefix: tuple[str, ...] = ()

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def password_file(self) -> Path:
        return self.folder / "password"

    @classmethod
    def start(
        cls, host: str = "127.0.0.1", port: int | None = None, prefix: tuple[str, ...] = ()
    ) -> Self:
        run_as = None
        if os.geteuid() == 0:
            run_as = "postgres" if _user_exists("postgres") else "nobody"
        folder = Path(tempfile.mkdtemp(prefix="popguard-pg-", dir="/tmp"))
        port = port or (5432 if prefix else free_port(host))
        server = cls(folder, host, port, secrets.token_urlsafe(18), run_as, prefix)
        try:
            server._init()
            server.pg_ctl("start")
            server._make_role()
        except BaseException:
            server.remove()
            raise
        return server

    def _run(self, *argv: str) -> None:
        user = ["runuser", "-u", self.run_as, "--"] if self.run_as else []
        result = subprocess.run(
            [*self.prefix, *user, *argv], capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stderr.strip() or result.stdout}")

    def _init(self) -> None:
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self.folder.chmod(0o700)
        self._run(
            postgres_bin("initdb"), "-D", str(self.data_dir), "-U", "postgres",
            "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '{self.host}'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.folder}'\n"
                # Tests lose nothing to an OS crash: skip the disk flushes.
                "fsync = off\nmax_connections = 300\n"
            )
        if ":" in self.host:
            with (self.data_dir / "pg_hba.conf").open("a") as hba:
                hba.write("host all all ::/0 scram-sha-256\n")
        else:
            with (self.data_dir / "pg_hba.conf").open("a") as hba:
                hba.write("host all all 0.0.0.0/0 scram-sha-256\n")

    def pg_ctl(self, action: str) -> None:
        """start, stop (fast) or restart, waiting until it is done."""
        argv = [postgres_bin("pg_ctl"), "-D", str(self.data_dir), "-w", "-t", "60"]
        if action in ("start", "restart"):
            argv += ["-l", str(self.folder / "log")]
        if action in ("stop", "restart"):
            argv += ["-m", "fast"]
        self._run(*argv, action)

    def admin(self, sql: str) -> None:
        """One statement as the superuser, over the Unix socket."""
        with psycopg.connect(
            host=str(self.folder), port=self.port, user="postgres", dbname="postgres",
            autocommit=True,
        ) as connection:  # fmt: skip
            connection.execute(sql.encode())

    def _make_role(self) -> None:
        self.admin(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{self.password}'")
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)

    def new_database(self, name: str | None = None) -> str:
        """A new empty database owned by popguard's role; its URL (no password)."""
        name = name or f"popguard_{secrets.token_hex(6)}"
        self.admin(f"CREATE DATABASE {name} OWNER {ROLE}")
        return self.url(name)

    def url(self, database: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{ROLE}@{host}:{self.port}/{database}"

    def directory_section(self, database_url: str) -> str:
        """The `[directory]` section of popguard.toml that points at `database_url`."""
        return f'[directory]\nurl = "{database_url}"\npassword_file = "{self.password_file}"\n'

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.pg_ctl("stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
