"""Backups of a mailbox database, and what is brought back from them.

A backup is the snapshot seeding uses (`VACUUM INTO` on the copy's replication
service, one read transaction: deliveries go on), fetched over the replication channel
as the operator (the admin identity) from a healthy copy, a passive one first, as
Exchange backs up passive copies to spare the active one. The file is one header line
and the snapshot's octets:

    POPGUARD-BACKUP 1 {"database": ..., "server": ..., "lsn": ..., "octets": ...,
                       "sha256": ..., "taken": ...}\\n<octets of the SQLite snapshot>

Restoring never touches a serving copy: the backup becomes a recovery database, a file
of its own that no service mounts (Exchange's recovery database), checked whole (the
SHA-256, SQLite's integrity check, the log's checksum chain, each message still named
by the log against its digest). `restore-mailbox` then gives one mailbox's messages
from it to the active copy of a mailbox, through that copy's replication service, which
stores those the mailbox does not hold (by the message's digest) in one transaction of
the copy, logged and shipped to the passive copies like any delivery: restoring twice
stores each message once, and a quota the mailbox would go over refuses them all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from popguard.directory.directory import DatabaseCopy, Directory
from popguard.errors import UserError
from popguard.net.tls import TlsMaterial
from popguard.replication.peer import (
    PeerProtocolError,
    PeerRefused,
    PeerUnavailable,
    ReplicationPeer,
)
from popguard.replication.switchover import copy_status
from popguard.store.change_log import LogEntry, payload_digest
from popguard.store.mailbox_database import MailboxDatabase, Restored

MAGIC = b"POPGUARD-BACKUP 1 "
MAX_HEADER = 4096
CHUNK = 1 << 20
# The copies a backup may be taken from: those that serve or follow without a fault.
HEALTHY = ("Healthy", "Mounted")


@dataclass(frozen=True)
class BackupHeader:
    database: str
    server: str
    lsn: int
    octets: int
    sha256: str
    taken: float


def backup_sources(directory: Directory, database: str, server: str | None) -> list[DatabaseCopy]:
    """The copies to try, best first: healthy passive copies, then the active one."""
    copies = directory.database_copies(database)
    if server is not None:
        chosen = [c for c in copies if c.server.lower() == server.lower()]
        if not chosen:
            raise UserError(f"{database} has no copy on {server}")
        return chosen
    reports, now = directory.copy_status_reports(), time.time()
    healthy = [c for c in copies if copy_status(c, reports, now) in HEALTHY]
    if not healthy:
        raise UserError(
            f"{database} has no healthy copy to back up (see get-mailboxdatabasecopystatus)"
        )
    return sorted(healthy, key=lambda c: (c.is_active, c.activation_preference))


async def take_backup(
    directory: Directory, tls_material: TlsMaterial, database: str, out: Path, server: str | None
) -> BackupHeader:
    """Write a backup of `database` to `out` from the first copy that gives one."""
    context = tls_material.mutual_client_context(tls_material.admin_identity())
    snapshot_file = out.with_name(out.name + ".snapshot-partial")
    failures = []
    try:
        for copy in backup_sources(directory, database, server):
            peer = ReplicationPeer(directory.get_server(copy.server), context)
            try:
                snapshot = await peer.snapshot(copy.database, snapshot_file)
            except (PeerUnavailable, PeerRefused, PeerProtocolError) as exc:
                failures.append(f"{copy.server}: {exc}")
                continue
            finally:
                await peer.aclose()
            header = BackupHeader(
                copy.database, copy.server, snapshot.lsn, snapshot.octets, snapshot.sha256,
                time.time(),
            )  # fmt: skip
            _write_backup(out, header, snapshot_file)
            return header
    finally:
        snapshot_file.unlink(missing_ok=True)
    raise UserError(f"no copy of {database} gave a snapshot: {'; '.join(failures)}")


def _write_backup(out: Path, header: BackupHeader, snapshot: Path) -> None:
    partial = out.with_name(out.name + ".partial")
    with _owner_only(partial) as sink, open(snapshot, "rb") as source:
        sink.write(MAGIC + json.dumps(asdict(header)).encode() + b"\n")
        while chunk := source.read(CHUNK):
            sink.write(chunk)
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(partial, out)


@contextlib.contextmanager
def _owner_only(path: Path) -> Iterator[BinaryIO]:
    """A new file only its owner may read: a backup holds every user's mail."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as sink:
        yield sink


def read_header(path: Path) -> BackupHeader:
    """The header of a backup file, or one line saying why it is not one."""
    try:
        with open(path, "rb") as source:
            line = source.readline(MAX_HEADER)
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    if not line.startswith(MAGIC) or not line.endswith(b"\n"):
        raise UserError(f"{path} is not a popguard backup (no POPGUARD-BACKUP header)")
    try:
        fields = json.loads(line[len(MAGIC) :])
        header = BackupHeader(**fields)
        if not (isinstance(header.octets, int) and isinstance(header.sha256, str)):
            raise TypeError("octets or sha256 of the wrong type")
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: the backup's header is damaged: {exc}") from None
    return header


def restore_database(backup: Path, recovery: Path) -> tuple[BackupHeader, MailboxDatabase]:
    """Make `recovery` a recovery database holding what `backup` holds, checked whole;
    UserError (one line) for a backup that is damaged, cut short or not one."""
    header = read_header(backup)
    if recovery.exists():
        raise UserError(f"{recovery} exists already: give a new file for the recovery database")
    partial = recovery.with_name(recovery.name + ".partial")
    digest, octets = hashlib.sha256(), 0
    try:
        with open(backup, "rb") as source, _owner_only(partial) as sink:
            source.readline(MAX_HEADER)
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                octets += len(chunk)
                sink.write(chunk)
            sink.flush()
            os.fsync(sink.fileno())
        if octets != header.octets:
            raise UserError(
                f"{backup} is cut short or padded: {octets} octets of snapshot, the header "
                f"says {header.octets}"
            )
        if digest.hexdigest() != header.sha256:
            raise UserError(f"{backup} is damaged: its snapshot fails the SHA-256 in its header")
        store = _open_checked(partial, header.database)
        store.close()
        os.replace(partial, recovery)
    finally:
        partial.unlink(missing_ok=True)
    return header, _open_checked(recovery, header.database)


def _open_checked(path: Path, database: str) -> MailboxDatabase:
    try:
        store = MailboxDatabase(path, database)
    except Exception as exc:  # a file that passed its SHA-256 but is no database of ours
        raise UserError(f"the backup of {database} is not a mailbox database: {exc}") from None
    problems = store.verify()
    if problems:
        store.close()
        raise UserError(f"the backup of {database} fails its checks: {'; '.join(problems[:3])}")
    if store.role() != "passive":
        store.fence()  # no service mounts it, and it takes no delivery
    return store


def open_recovery_database(path: Path) -> MailboxDatabase:
    if not path.is_file():
        raise UserError(f"no recovery database {path} (restore-mailboxdatabase makes one)")
    return _open_checked(path, path.stem)


def restored_entries(recovery: MailboxDatabase, source: str, target: str) -> list[LogEntry]:
    """The messages of `source` in the recovery database, as deliveries to `target`.

    Each carries its UID there in place of an LSN, and the message's digest in place of
    a chain checksum (the framing wants one; the active copy keys on the message)."""
    entries = []
    for info in recovery.maildrop(source):
        wire = recovery.wire(source, info.uid)
        if wire is None:
            continue
        entries.append(
            LogEntry(
                lsn=info.uid,
                at=info.received,
                kind="deliver",
                address=target,
                uid=info.uid,
                size=info.size,
                payload=wire,
                checksum=payload_digest(wire),
            )
        )
    return entries


async def restore_mailbox(
    directory: Directory,
    tls_material: TlsMaterial,
    entries: list[LogEntry],
    database: str,
    quota: int | None,
) -> Restored:
    """Give `entries` to the active copy of `database`, which stores those the mailbox
    lacks; QuotaExceededError (nothing stored) if they would not fit in `quota`."""
    context = tls_material.mutual_client_context(tls_material.admin_identity())
    server = directory.get_server(directory.active_server(database))
    async with ReplicationPeer(server, context) as peer:
        try:
            return await peer.restore(database, entries, quota)
        except (PeerUnavailable, PeerRefused, PeerProtocolError) as exc:
            raise UserError(f"restoring to {database} on {server.name} failed: {exc}") from None
