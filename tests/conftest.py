"""Fixtures that start real popguard services on their own loopback address."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email import policy as email_policy
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from popguard import paths
from popguard.control import permissions
from popguard.control.service_user import SERVICE_USER_VARIABLE
from popguard.directory.directory import Directory
from popguard.directory.passwords import hash_password
from popguard.directory.settings import PopSettings
from popguard.net import tls
from popguard.net.workers import WORKER_COUNT_VARIABLE
from popguard.pop3.session import LoginType
from popguard.services.counters import read_counters
from popguard.services.lmtp_client import deliver
from popguard.testing.net import free_loopback_address, wait_port
from popguard.testing.organization import popguard, serve
from popguard.testing.postgres import PostgresServer
from popguard.testing.processes import stop_processes

# The files tests put in data folders (popguard.toml, ...) are made as popguard makes
# its own: `popguard up` refuses a data folder open to group or others.
permissions.restrict_umask()

# One worker per service in the organizations tests start (every process they spawn
# inherits this): a master and a worker each, not a worker per core, so that dozens of
# organizations fit on two cores. Tests that want more say so with WorkerProcesses
# (tests/test_workers.py), or remove the variable (the per-core default, tests/test_up.py).
os.environ.setdefault(WORKER_COUNT_VARIABLE, "1")
# The suite runs as root in CI, with its data folders in pytest's root-only temporary
# folders (and its interpreter under /root): the services stay root's there, as the
# operator's explicit choice. tests/test_service_user.py starts them as `popguard`.
os.environ.setdefault(SERVICE_USER_VARIABLE, "root")

PASSWORD = "correct horse battery staple"

# Modules whose tests take one to five minutes each (faults in network namespaces, the
# whole repair ladder on its real timers). They start first, so that the two xdist
# workers end together instead of one finishing a five-minute test alone at the end.
LONG_RUNNING_MODULES = frozenset(
    {
        "test_repair_ladder.py",
        "test_netns.py",
        "test_postgres_organization.py",
        "test_self_repair.py",
        "test_hosts.py",
        "test_failover_health.py",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A stable sort: every xdist worker collects the same order, as xdist requires.
    items.sort(key=lambda item: item.path.name not in LONG_RUNNING_MODULES)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL per test worker; each test takes a database of its own."""
    with PostgresServer.start() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def directory_data(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A data folder whose directory is on each engine in turn: SQLite in the folder,
    or a new PostgreSQL database named by its popguard.toml."""
    data = tmp_path / "data"
    data.mkdir()
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        (data / "popguard.toml").write_text(server.directory_section(server.new_database()))
    return data


HEALTH_PORT = 8480


def apply_settings(data: Path, server: str, service: str, **changes: object) -> None:
    """set-popsettings, then wait for `service`'s counters to show the new revision."""
    with Directory(data) as directory:
        current, _ = directory.pop_settings(server)
        revision = directory.set_pop_settings(server, current.with_changes(dict(changes)))
    counters_file = paths.server_folder(data, server).counters_file(service)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        published = read_counters(counters_file) or {}
        if int(published.get("SettingsRevision", 0)) >= revision:
            return
        time.sleep(0.1)
    raise AssertionError(f"{server}/{service} never applied settings revision {revision}")


class DataFolder:
    """What every test organization offers about its data folder."""

    data: Path

    @property
    def cafile(self) -> str:
        return str(tls.TlsMaterial.of(self.data).ca_certificate_file)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cafile)

    def directory(self) -> Directory:
        return Directory(self.data)


@dataclass
class MailboxServer(DataFolder):
    """One mailbox server (pop3be + delivery as real processes) in its own data folder."""

    data: Path
    name: str
    address: str
    database: str = "DB01"
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    pop3_port: int = 1110
    pop3s_port: int = 1995
    lmtp_port: int = 2424
    lmtp_peer_port: int = 2425
    replication_port: int = 64327

    def add_mailbox(self, address: str, password: str = PASSWORD) -> str:
        with self.directory() as directory:
            directory.new_mailbox(address, self.database, hash_password(password))
        return address

    def set_settings(self, **changes: object) -> None:
        """Change POP settings and wait until the running pop3be has applied them."""
        apply_settings(self.data, self.name, "pop3be", **changes)

    def deliver(self, recipient: str, message: bytes) -> None:
        with self.directory() as directory:
            result = deliver(directory, recipient, message, "sender@example.test")
        assert result.code == 250, result.reply

    def start(self, service: str) -> subprocess.Popen[bytes]:
        log = self.logs.setdefault(service, self.data / f"{self.name}-{service}.log")
        process = serve(self.data, service, self.name, log)
        self.processes[service] = process
        port = {
            "pop3be": self.pop3_port,
            "delivery": self.lmtp_port,
            "replication": self.replication_port,
            "health": HEALTH_PORT,
        }[service]
        wait_port(self.address, port, process=process)
        if service == "pop3be":
            wait_port(self.address, self.pop3s_port, process=process)
        return process

    def kill(self, service: str, signum: int = signal.SIGKILL) -> None:
        """Signal the service's master and wait until it and its workers are gone (they
        die with it): until then a worker's copy of the socket may still take a
        connection, which its death then resets."""
        process = self.processes.pop(service)
        workers = children(process.pid)
        process.send_signal(signum)
        process.wait(10)
        wait_for("the workers to die with their master",
                 lambda: not any(pid_alive(pid) for pid in workers), 10)  # fmt: skip

    def stop_all(self) -> None:
        stop_processes(list(self.processes.values()))
        self.processes.clear()

    def log_text(self, service: str) -> str:
        return self.logs[service].read_text(errors="replace")


def make_mailbox_server(data: Path, settings: PopSettings | None = None) -> MailboxServer:
    address = free_loopback_address()
    server = MailboxServer(data=data, name="mbx1", address=address)
    with server.directory() as directory:
        directory.new_server("mbx1", ["mailbox"], address)
        directory.new_database(server.database, "mbx1")
        if settings is not None:
            directory.set_pop_settings("mbx1", settings)
    return server


@contextlib.contextmanager
def running_mailbox_server(
    data: Path, settings: PopSettings | None = None
) -> Iterator[MailboxServer]:
    """A mailbox server whose pop3be and delivery run as processes until the block ends."""
    server = make_mailbox_server(data, settings)
    try:
        server.start("pop3be")
        server.start("delivery")
        yield server
    finally:
        server.stop_all()


@pytest.fixture
def mailbox_server(tmp_path: Path) -> Iterator[MailboxServer]:
    """A running mailbox server that allows plaintext logins (tests of TLS set it back)."""
    settings = PopSettings(LoginType=LoginType.PLAIN_TEXT_LOGIN)
    with running_mailbox_server(tmp_path / "data", settings) as server:
        yield server


def message(subject: str, body: str = "Hello.\r\n", size: int = 0) -> bytes:
    """A small RFC 5322 message with a unique Message-ID; padded to `size` octets."""
    head = (
        f"From: sender@example.test\r\nTo: user@example.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{secrets.token_hex(8)}@example.test>\r\n\r\n"
    ).encode()
    content = head + body.encode()
    if size > len(content):
        line = b"x" * 76 + b"\r\n"
        content += line * ((size - len(content)) // len(line))
    return content


def processes_matching(fragment: str) -> list[int]:
    """Process ids whose command line contains `fragment` (like pgrep -f, without procps)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if fragment in command_line:
            found.append(int(entry.name))
    return found


def pid_alive(pid: int) -> bool:
    """Whether any thread of process `pid` runs. A killed process's main thread turns
    zombie before its other threads have finished dying, and until the last of them
    has, its files (a listening socket) are still open: the process is not gone."""
    try:
        os.kill(pid, 0)
        threads = [task / "stat" for task in Path(f"/proc/{pid}/task").iterdir()]
    except (ProcessLookupError, FileNotFoundError):
        return False
    for stat in threads:
        try:
            if stat.read_text().rpartition(")")[2].split()[0] != "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            continue  # that thread is gone
    return False


def children(pid: int) -> list[int]:
    """The processes `pid` started (a service's master: its workers)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@dataclass
class Organization(DataFolder):
    """cas1 (front end) + mbx1 and mbx2 (back end and delivery each); DB01 on mbx1,
    DB02 on mbx2, each with a passive copy row on the other server."""

    data: Path
    frontend_address: str
    mailbox: dict[str, MailboxServer]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    pop3_port: int = 10110
    pop3s_port: int = 10995

    def add_mailbox(self, address: str, database: str = "DB01") -> str:
        with self.directory() as directory:
            directory.new_mailbox(address, database, hash_password(PASSWORD))
        return address

    def deliver(self, recipient: str, content: bytes) -> None:
        with self.directory() as directory:
            result = deliver(directory, recipient, content, "sender@example.test")
        assert result.code == 250, result.reply

    def start_frontend(self) -> subprocess.Popen[bytes]:
        process = serve(self.data, "pop3", "cas1", self.data / "pop3.log")
        self.processes.append(process)
        wait_port(self.frontend_address, self.pop3_port, process=process)
        wait_port(self.frontend_address, self.pop3s_port, process=process)
        return process

    def start_frontend_health(self) -> subprocess.Popen[bytes]:
        process = serve(self.data, "health", "cas1", self.data / "cas1-health.log")
        self.processes.append(process)
        wait_port(self.frontend_address, HEALTH_PORT, process=process)
        return process

    def set_frontend_settings(self, **changes: object) -> None:
        apply_settings(self.data, "cas1", "pop3", **changes)

    def frontend_log(self) -> str:
        return (self.data / "pop3.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for server in self.mailbox.values():
            server.stop_all()
        stop_processes(self.processes)


@contextlib.contextmanager
def running_organization(
    data: Path, replication: bool = False, health: bool = False
) -> Iterator[Organization]:
    """cas1, mbx1 and mbx2 with all their services running until the block ends
    (replication too, when asked: the passive copies then follow the active ones)."""
    frontend_address = free_loopback_address()
    mailbox: dict[str, MailboxServer] = {}
    with Directory(data) as directory:
        directory.new_server("cas1", ["frontend"], frontend_address)
        for name, database in (("mbx1", "DB01"), ("mbx2", "DB02")):
            address = free_loopback_address()
            directory.new_server(name, ["mailbox"], address)
            directory.new_database(database, name)
            mailbox[name] = MailboxServer(data=data, name=name, address=address, database=database)
        directory.add_database_copy("DB01", "mbx2", 2)
        directory.add_database_copy("DB02", "mbx1", 2)
    org = Organization(data=data, frontend_address=frontend_address, mailbox=mailbox)
    try:
        for server in mailbox.values():
            server.start("pop3be")
            server.start("delivery")
            if replication:
                server.start("replication")
            if health:
                server.start("health")
        org.start_frontend()
        if health:
            org.start_frontend_health()
        yield org
    finally:
        org.stop_all()


@pytest.fixture
def organization(tmp_path: Path) -> Iterator[Organization]:
    with running_organization(tmp_path / "data") as org:
        yield org


@pytest.fixture
def replicated_organization(tmp_path: Path) -> Iterator[Organization]:
    with running_organization(tmp_path / "data", replication=True) as org:
        yield org


@pytest.fixture
def watched_organization(tmp_path: Path) -> Iterator[Organization]:
    """An organization whose three servers each run their health service."""
    with running_organization(tmp_path / "data", health=True) as org:
        yield org


@pytest.fixture
def detached_organization(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "data"
    addresses = [free_loopback_address() for _ in range(3)]
    started = popguard(data, "up", "--detach", "--frontend-address", addresses[0], "--address",
                       addresses[1], "--second-address", addresses[2])  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr
        (data / "popguard.toml").write_text("[faults]\nenabled = true\n")
        yield data
    finally:
        popguard(data, "down")


def json_of(data: Path, *args: str) -> Any:
    shown = popguard(data, *args, "--format", "json")
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def wait_for(what: str, check: Any, timeout: float = 120.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class AlertSinks:
    """A real SMTP server (aiosmtpd) and an HTTP webhook receiver on a loopback address
    of their own: what popguard's escalations reached."""

    host: str
    mails: list[Message] = field(default_factory=list)
    hooks: list[dict[str, Any]] = field(default_factory=list)
    smtp_port: int = 2525
    webhook_port: int = 9093

    @property
    def webhook_url(self) -> str:
        return f"http://{self.host}:{self.webhook_port}/alerts"

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
        self.mails.append(message_from_bytes(envelope.content, policy=email_policy.default))
        return "250 OK"


@pytest.fixture
def alert_sinks() -> Iterator[AlertSinks]:
    sinks = AlertSinks(free_loopback_address())
    smtp = Controller(sinks, hostname=sinks.host, port=sinks.smtp_port)
    smtp.start()

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            sinks.hooks.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    web = ThreadingHTTPServer((sinks.host, sinks.webhook_port), Hook)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        yield sinks
    finally:
        web.shutdown()
        smtp.stop()
