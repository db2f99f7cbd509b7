"""Health mailboxes: one monitoring mailbox per database, which the login probes use.

popguard makes them itself and keeps their passwords in one file readable only by
its owner (`DATA/health/mailboxes.json`, mode 0600). A password older than
ROTATE_AFTER is replaced: the new one is written to the file before the directory
takes its hash, so a probe reading the file in between fails once at worst.
Health services on several servers may start at once: a file lock serializes them.

Each host (data folder) keeps its own passwords, so each host has its own health
mailbox per database: a host that finds the first one made by another host (the
directory has it, its own file does not) makes `healthmailbox-DB-TAG@...` for itself
rather than take the other's password away from under its probes.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from popguard.directory.directory import Directory
from popguard.directory.passwords import generate_password, hash_password
from popguard.health.probes import Credential

DOMAIN = "monitoring.popguard.local"
ROTATE_AFTER = 7 * 24 * 3600.0


def address_for(database: str, tag: str = "") -> str:
    suffix = f"-{tag}" if tag else ""
    return f"healthmailbox-{database.lower()}{suffix}@{DOMAIN}"


def credentials_file(data: Path) -> Path:
    return data / "health" / "mailboxes.json"


@contextmanager
def _locked(data: Path) -> Iterator[None]:
    folder = data / "health"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".mailboxes.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_credentials(data: Path) -> dict[str, Credential]:
    """database (lower case) -> its health mailbox's credential."""
    try:
        stored = json.loads(credentials_file(data).read_text())
    except (OSError, ValueError):
        return {}
    return {
        database: Credential(entry["address"], entry["password"])
        for database, entry in stored.get("databases", {}).items()
    }


def _write(data: Path, entries: dict[str, dict[str, object]]) -> None:
    path = credentials_file(data)
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"databases": entries}, out, indent=2)
    os.replace(temporary, path)


def ensure_health_mailboxes(
    directory: Directory, data: Path, now: float | None = None
) -> dict[str, Credential]:
    """A working health mailbox for every database; made, repaired or rotated as needed
    (the credentials are kept in the data folder `data`)."""
    now = time.time() if now is None else now
    with _locked(data):
        try:
            entries = json.loads(credentials_file(data).read_text()).get("databases", {})
        except (OSError, ValueError):
            entries = {}
        for database in directory.list_databases():
            key = database.lower()
            entry = entries.get(key)
            address = str(entry["address"]) if entry else address_for(database)
            mailbox = directory.find_mailbox(address)
            if entry is None and mailbox is not None:
                # Another host's (or a lost file's): a mailbox of this host's own.
                address = address_for(database, secrets.token_hex(4))
                mailbox = directory.find_mailbox(address)
            fresh = entry is not None and now - float(entry.get("changed", 0)) < ROTATE_AFTER
            if mailbox is not None and mailbox.database != database:
                continue  # someone else's mailbox under this name: leave it alone
            if mailbox is not None and fresh:
                continue
            password = generate_password()
            entries[key] = {"address": address, "password": password, "changed": now}
            _write(data, entries)  # the file first: see the module's docstring
            if mailbox is None:
                directory.new_mailbox(address, database, hash_password(password))
            else:
                directory.set_password_hash(address, hash_password(password))
            if mailbox is None or mailbox.use_database_quota_defaults:
                # A probe measures the service, not a database's quota: its test
                # messages are never refused as "mailbox full".
                directory.set_mailbox_quota(address, False, None)
    return read_credentials(data)
