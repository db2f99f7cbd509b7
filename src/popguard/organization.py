"""Making a new organization's directory: what `popguard up` starts from.

For now a front end (cas1) and one mailbox server (mbx1) with one database and
a demo mailbox; the whole organization (more mailbox servers, copies) grows
from here.
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
DEFAULT_DATABASE = "DB01"


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
    mailbox: Server
    demo: DemoMailbox


def ensure_demo_organization(
    directory: Directory,
    frontend_address: str = DEFAULT_FRONTEND_ADDRESS,
    mailbox_address: str = DEFAULT_MAILBOX_ADDRESS,
) -> DemoOrganization:
    """cas1 before mbx1 with DB01 and a demo mailbox; made once, reused later.

    The demo mailbox's password is kept in a 0600 file so `up` can show it again:
    a convenience for the demo mailbox only; real mailboxes keep only a hash.
    """
    data = directory.data
    servers = [s for s in directory.list_servers() if "mailbox" in s.roles]
    if not servers:
        server = directory.new_server(DEFAULT_MAILBOX_SERVER, ["mailbox"], mailbox_address)
        directory.new_database(DEFAULT_DATABASE, server.name)
        servers = [server]
    server = servers[0]
    frontends = [s for s in directory.list_servers() if "frontend" in s.roles]
    if not frontends:
        frontends = [directory.new_server(DEFAULT_FRONTEND_SERVER, ["frontend"], frontend_address)]
    demo_file = _demo_file(data)
    new = directory.find_mailbox(DEMO_ADDRESS) is None
    if new or not demo_file.exists():
        password = generate_password()
        database = next(c.database for c in directory.database_copies() if c.is_active)
        if directory.find_mailbox(DEMO_ADDRESS) is None:
            directory.new_mailbox(DEMO_ADDRESS, database, hash_password(password))
        else:
            directory.set_password_hash(DEMO_ADDRESS, hash_password(password))
        fd = os.open(demo_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{DEMO_ADDRESS}\n{password}\n")
    lines = demo_file.read_text().splitlines()
    return DemoOrganization(frontends[0], server, DemoMailbox(lines[0], lines[1], new))


WELCOME_MESSAGE = (
    b"From: popguard <postmaster@popguard.test>\r\n"
    b"To: <demo@popguard.test>\r\n"
    b"Subject: Welcome to popguard\r\n"
    b"Message-ID: <welcome@popguard.test>\r\n"
    b"\r\n"
    b"This message was delivered through LMTP into mailbox database DB01.\r\n"
    b"Read it with any POP3 client; delete it and it is gone for good.\r\n"
)
