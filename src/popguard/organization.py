"""Making a new organization's directory: what `popguard up` starts from.

A front end (cas1) and two mailbox servers (mbx1, mbx2) as in DESIGN.md: DB01
active on mbx1 with a passive copy on mbx2, DB02 the reverse, and a demo mailbox
in DB01. Each piece is made when missing, so a data folder made by an older
popguard (cas1 and mbx1 only) grows the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .directory import Directory, Server
from .passwords import generate_password, hash_password

DEMO_ADDRESS = "demo@popguard.test"
DEFAULT_FRONTEND_SERVER = "cas1"
DEFAULT_FRONTEND_ADDRESS = "127.0.1.1"
DEFAULT_MAILBOX_SERVER = "mbx1"
DEFAULT_MAILBOX_ADDRESS = "127.0.2.1"
SECOND_MAILBOX_SERVER = "mbx2"
SECOND_MAILBOX_ADDRESS = "127.0.3.1"
DEFAULT_DATABASE = "DB01"
SECOND_DATABASE = "DB02"


@dataclass(frozen=True)
class DemoMailbox:
    address: str
    password: str
    new: bool  # made by this call: it gets a welcome message


def _demo_file(data: Path) -> Path:
    return data / "demo-mailbox.txt"


@dataclass(frozen=True)
class DemoOrganization:
    frontend: Server
    mailbox_servers: list[Server]
    demo: DemoMailbox


def _server(directory: Directory, name: str, role: str, address: str) -> Server:
    known = {s.name.lower(): s for s in directory.list_servers()}
    if name.lower() in known:
        return known[name.lower()]
    return directory.new_server(name, [role], address)


def _database(directory: Directory, name: str, active: str, passive: str) -> None:
    if name.lower() not in (d.lower() for d in directory.list_databases()):
        directory.new_database(name, active)
    copies = {c.server.lower() for c in directory.database_copies(name)}
    if passive.lower() not in copies:
        directory.add_database_copy(name, passive, len(copies) + 1)


def ensure_demo_organization(
    directory: Directory,
    frontend_address: str = DEFAULT_FRONTEND_ADDRESS,
    mailbox_address: str = DEFAULT_MAILBOX_ADDRESS,
    second_address: str = SECOND_MAILBOX_ADDRESS,
) -> DemoOrganization:
    """cas1, mbx1 and mbx2 with DB01 and DB02 and a demo mailbox; made once, reused later.

    The demo mailbox's password is kept in a 0600 file so `up` can show it again:
    a convenience for the demo mailbox only; real mailboxes keep only a hash.
    """
    data = directory.data
    frontend = _server(directory, DEFAULT_FRONTEND_SERVER, "frontend", frontend_address)
    mbx1 = _server(directory, DEFAULT_MAILBOX_SERVER, "mailbox", mailbox_address)
    mbx2 = _server(directory, SECOND_MAILBOX_SERVER, "mailbox", second_address)
    _database(directory, DEFAULT_DATABASE, mbx1.name, mbx2.name)
    _database(directory, SECOND_DATABASE, mbx2.name, mbx1.name)
    demo_file = _demo_file(data)
    new = directory.find_mailbox(DEMO_ADDRESS) is None
    if new or not demo_file.exists():
        password = generate_password()
        if directory.find_mailbox(DEMO_ADDRESS) is None:
            directory.new_mailbox(DEMO_ADDRESS, DEFAULT_DATABASE, hash_password(password))
        else:
            directory.set_password_hash(DEMO_ADDRESS, hash_password(password))
        fd = os.open(demo_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{DEMO_ADDRESS}\n{password}\n")
    lines = demo_file.read_text().splitlines()
    return DemoOrganization(frontend, [mbx1, mbx2], DemoMailbox(lines[0], lines[1], new))


WELCOME_MESSAGE = (
    b"From: popguard <postmaster@popguard.test>\r\n"
    b"To: <demo@popguard.test>\r\n"
    b"Subject: Welcome to popguard\r\n"
    b"Message-ID: <welcome@popguard.test>\r\n"
    b"\r\n"
    b"This message was delivered through LMTP into mailbox database DB01.\r\n"
    b"Read it with any POP3 client; delete it and it is gone for good.\r\n"
)
