"""Making an organization's directory from a topology: what `popguard up` starts from.

The topology is the `[[servers]]`, `[[databases]]` and `[demo]` of DATA/popguard.toml
(see config.py) or, when it lists no servers, the organization of DESIGN.md: a front
end (cas1) and two mailbox servers (mbx1, mbx2), DB01 active on mbx1 with a passive
copy on mbx2, DB02 the reverse, and a demo mailbox in DB01.

Each piece is made when missing, so a data folder made by an older run grows what
the topology adds (servers, databases, copies). Nothing that exists is changed: a
server the directory knows with another address or other roles is refused, not
moved; a database keeps its copies and where it is active.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from popguard.directory.config import Config, DatabaseEntry, Demo, ServerEntry, check_topology
from popguard.directory.directory import DatabaseCopy, Directory, Server, normalize_address
from popguard.directory.passwords import generate_password, hash_password
from popguard.errors import UserError

DEFAULT_FRONTEND_SERVER = "cas1"
DEFAULT_FRONTEND_ADDRESS = "127.0.1.1"
DEFAULT_MAILBOX_SERVER = "mbx1"
DEFAULT_MAILBOX_ADDRESS = "127.0.2.1"
SECOND_MAILBOX_SERVER = "mbx2"
SECOND_MAILBOX_ADDRESS = "127.0.3.1"
DEFAULT_DATABASE = "DB01"
SECOND_DATABASE = "DB02"
DEFAULT_TOPOLOGY_SOURCE = "the default organization"


@dataclass(frozen=True)
class DemoMailbox:
    address: str
    database: str
    password: str  # "" when it is another host's (here is False)
    new: bool  # made by this call: it gets a welcome message
    # Whether this host runs the server of its database's active copy: only that host
    # makes the demo mailbox and keeps its password (DATA/demo-mailbox.txt).
    here: bool = True
    active_server: str = ""


def _demo_file(data: Path) -> Path:
    return data / "demo-mailbox.txt"


@dataclass(frozen=True)
class Organization:
    servers: list[Server]  # the topology's, in its order
    databases: dict[str, list[DatabaseCopy]]  # each database's copies, by preference
    demo: DemoMailbox

    @property
    def frontends(self) -> list[Server]:
        return [s for s in self.servers if "frontend" in s.roles]

    @property
    def mailbox_servers(self) -> list[Server]:
        return [s for s in self.servers if "mailbox" in s.roles]


def check_default_demo(demo: Demo, source: str) -> None:
    """The default organization's demo mailbox can only be in one of its databases."""
    if demo.database is not None and demo.database.lower() not in (
        DEFAULT_DATABASE.lower(),
        SECOND_DATABASE.lower(),
    ):
        raise UserError(
            f"{source}: demo.database: without [[servers]] the organization is the default "
            f"one, with {DEFAULT_DATABASE} and {SECOND_DATABASE}, not {demo.database}"
        )


def default_topology(
    directory: Directory,
    frontend_address: str | None = None,
    mailbox_address: str | None = None,
    second_address: str | None = None,
    demo: Demo | None = None,
) -> Config:
    """cas1, mbx1 and mbx2 with DB01 and DB02, as a topology.

    An address not given is the one the directory already has for that server, or
    the default: a folder made with other addresses keeps them.
    """
    demo = demo or Demo()
    known = {s.name.lower(): s.address for s in directory.list_servers()}

    def address(name: str, given: str | None, default: str) -> str:
        return given or known.get(name.lower(), default)

    check_default_demo(demo, DEFAULT_TOPOLOGY_SOURCE)
    topology = Config(
        servers=(
            ServerEntry(
                name=DEFAULT_FRONTEND_SERVER,
                roles=("frontend",),
                address=address(
                    DEFAULT_FRONTEND_SERVER, frontend_address, DEFAULT_FRONTEND_ADDRESS
                ),
            ),
            ServerEntry(
                name=DEFAULT_MAILBOX_SERVER,
                roles=("mailbox",),
                address=address(DEFAULT_MAILBOX_SERVER, mailbox_address, DEFAULT_MAILBOX_ADDRESS),
            ),
            ServerEntry(
                name=SECOND_MAILBOX_SERVER,
                roles=("mailbox",),
                address=address(SECOND_MAILBOX_SERVER, second_address, SECOND_MAILBOX_ADDRESS),
            ),
        ),
        databases=(
            DatabaseEntry(
                name=DEFAULT_DATABASE, copies=(DEFAULT_MAILBOX_SERVER, SECOND_MAILBOX_SERVER)
            ),
            DatabaseEntry(
                name=SECOND_DATABASE, copies=(SECOND_MAILBOX_SERVER, DEFAULT_MAILBOX_SERVER)
            ),
        ),
        demo=demo,
    )
    check_topology(topology, DEFAULT_TOPOLOGY_SOURCE)
    return topology


def check_against_directory(directory: Directory, topology: Config, source: str) -> None:
    """Refuse a topology that would change a server the directory already has.

    A server is made once with its address and roles (its certificate, its copies
    and the services of its roles hang on them); a topology that names it with
    others is a mistake to report, not a change to make quietly.
    """
    known = directory.list_servers()
    by_name = {s.name.lower(): s for s in known}
    by_address = {_ip(s.address): s for s in known}
    for entry in topology.servers:
        existing = by_name.get(entry.name.lower())
        if existing is not None:
            if _ip(existing.address) != _ip(entry.address):
                raise UserError(
                    f"{source}: server {entry.name} has address {entry.address}, but the "
                    f"directory of {directory.data} has {existing.name} at {existing.address} "
                    "(a server's address is not changed; use another name or data folder)"
                )
            if set(existing.roles) != set(entry.roles):
                raise UserError(
                    f"{source}: server {entry.name} has roles {', '.join(sorted(set(entry.roles)))}"
                    f", but the directory of {directory.data} has {existing.name} with roles "
                    f"{', '.join(existing.roles)} (a server's roles are not changed; use another "
                    "name or data folder)"
                )
        other = by_address.get(_ip(entry.address))
        if other is not None and other.name.lower() != entry.name.lower():
            raise UserError(
                f"{source}: server {entry.name}'s address {entry.address} is {other.name}'s "
                f"in the directory of {directory.data}"
            )


def ensure_topology(
    directory: Directory, topology: Config, source: str, here: set[str] | None = None
) -> Organization:
    """The topology's servers, databases, copies and demo mailbox; made once, reused later.

    The demo mailbox's password is kept in a 0600 file so `up` can show it again:
    a convenience for the demo mailbox only; real mailboxes keep only a hash. With
    `here` (the lower-case names of the servers this host runs), the demo mailbox is
    made only when its database's active copy is on one of them: the host that runs
    that server keeps the password; another host's `up` leaves it alone.
    """
    check_topology(topology, source)
    check_against_directory(directory, topology, source)
    known = {s.name.lower() for s in directory.list_servers()}
    servers = []
    for entry in topology.servers:
        if entry.name.lower() not in known:
            directory.new_server(entry.name, sorted(set(entry.roles)), entry.address)
        servers.append(directory.get_server(entry.name))
    name_of = {s.name.lower(): s.name for s in servers}
    for database in topology.databases:
        _ensure_database(directory, database.name, [name_of[c.lower()] for c in database.copies])
    # The directory's spelling of each name, which may differ from the file's in case.
    spelled = {d.lower(): d for d in directory.list_databases()}
    demo_database = spelled[(topology.demo.database or topology.databases[0].name).lower()]
    demo_address = normalize_address(topology.demo.address)
    found = directory.find_mailbox(demo_address)
    # An existing demo mailbox stays in its database: it is judged where it is.
    active = directory.active_server(found.database if found else demo_database)
    if here is None or active.lower() in here:
        demo = _ensure_demo_mailbox(directory, demo_address, demo_database, active)
    else:
        demo = DemoMailbox(
            demo_address, found.database if found else demo_database, "", False, False, active
        )
    databases = {
        spelled[d.name.lower()]: directory.database_copies(spelled[d.name.lower()])
        for d in topology.databases
    }
    return Organization(servers, databases, demo)


def _ensure_database(directory: Directory, name: str, copies: list[str]) -> None:
    """`name` with a copy on each of `copies`; a new database is active on the first."""
    if name.lower() not in (d.lower() for d in directory.list_databases()):
        directory.new_database(name, copies[0])
    existing = directory.database_copies(name)
    have = {c.server.lower() for c in existing}
    preference = max((c.activation_preference for c in existing), default=0)
    for server in copies:
        if server.lower() not in have:
            preference += 1
            directory.add_database_copy(name, server, preference)


def _ensure_demo_mailbox(
    directory: Directory, address: str, database: str, active_server: str
) -> DemoMailbox:
    address = normalize_address(address)
    demo_file = _demo_file(directory.data)
    stored = demo_file.read_text().splitlines() if demo_file.exists() else []
    mailbox = directory.find_mailbox(address)
    new = mailbox is None
    if mailbox is None or stored[:1] != [address] or len(stored) < 2:
        password = generate_password()
        if mailbox is None:
            mailbox = directory.new_mailbox(address, database, hash_password(password))
        else:
            directory.set_password_hash(address, hash_password(password))
        fd = os.open(demo_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{address}\n{password}\n")
        stored = [address, password]
    # An existing demo mailbox stays in its database: it is shown where it is.
    return DemoMailbox(address, mailbox.database, stored[1], new, True, active_server)


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return address


def welcome_message(demo: DemoMailbox) -> bytes:
    return (
        "From: popguard <postmaster@popguard.test>\r\n"
        f"To: <{demo.address}>\r\n"
        "Subject: Welcome to popguard\r\n"
        "Message-ID: <welcome@popguard.test>\r\n"
        "\r\n"
        f"This message was delivered through LMTP into mailbox database {demo.database}.\r\n"
        "Read it with any POP3 client; delete it and it is gone for good.\r\n"
    ).encode()
