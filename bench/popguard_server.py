"""Set up and run popguard's POP3 back end (and, if asked, its front end) for the
benchmark, through its CLI only.

Everything goes through the `popguard` command, so the benchmark depends on nothing
but the documented interface:

    popguard --data DIR new-server mbx1 --role mailbox --address ADDR
    popguard --data DIR new-mailboxdatabase DB01 --server mbx1
    popguard --data DIR set-popsettings --server mbx1 --login-type PlainTextLogin ...
    popguard --data DIR new-mailbox USER --database DB01 --password-stdin
    popguard --data DIR get-server mbx1 --format json
    popguard --data DIR serve pop3be --server mbx1     (foreground, SIGTERM stops it)
    popguard --data DIR serve delivery --server mbx1   (LMTP, foreground)
    popguard --data DIR send-message --to USER --file MSG.eml

With `frontend_address`, a client access server joins the same data directory
(the organization: one directory, one CA) and its POP3 front end is started too:

    popguard --data DIR new-server cas1 --role frontend --address ADDR2
    popguard --data DIR set-popsettings --server cas1 --login-type PlainTextLogin ...
    popguard --data DIR serve pop3 --server cas1

The mail goes in over LMTP, on the port that get-server reports, one transaction per
recipient on one connection (768 `send-message` runs would cost minutes of Python
start-up); if that fails, `send-message` is the fallback. Each run uses a fresh data
directory and the loopback address it is given.
"""

from __future__ import annotations

import json
import signal
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.mail import DOMAIN, Message
from popguard.testing.net import wait_for_greeting, wait_port
from popguard.testing.processes import Started, remove_unless_kept, wait_or_kill_group

SERVER = "mbx1"
FRONTEND = "cas1"
DATABASE = "DB01"
_CLI_TIMEOUT = 120.0  # seconds for one popguard command
_DELIVERY_TIMEOUT = 900.0  # seconds for filling all the mailboxes


class PopguardError(RuntimeError):
    """A popguard command failed; the message says which one and what it printed."""


class Popguard(Started):
    """popguard's pop3be and delivery services on one address, as a context manager."""

    def __init__(
        self,
        cli: Path,
        address: str,
        users: Sequence[str],
        password: str,
        messages: Sequence[Message],
        max_connections_per_user: int = 16,
        workdir: Path | None = None,
        frontend_address: str | None = None,
        worker_processes: int = 0,
    ) -> None:
        self.cli = cli
        self.address = address
        self.users = list(users)
        self.password = password
        self.messages = list(messages)
        self.max_per_user = max_connections_per_user
        self.worker_processes = worker_processes  # per service; 0: one per core
        self.workdir = workdir
        self.data = Path()
        self.ports: dict[str, int] = {}
        self.frontend_address = frontend_address
        self.frontend_ports: dict[str, int] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.delivery_note = ""

    @property
    def port(self) -> int:
        return self.ports["pop3be"]

    @property
    def tls_port(self) -> int:
        return self.ports.get("pop3be-tls", 0)

    @property
    def ca_file(self) -> Path | None:
        """The CA that signs popguard's server certificates. Not part of the CLI
        interface: popguard keeps it at DATA/tls/ca.pem today; None if it is not there."""
        path = self.data / "tls" / "ca.pem"
        return path if path.exists() else None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    @property
    def backend_pids(self) -> list[int]:
        """The mailbox server's services (pop3be, delivery)."""
        return [p.pid for s, p in self.procs.items() if s != "pop3"]

    @property
    def frontend_pids(self) -> list[int]:
        """The front end's process (`serve pop3`), if it was started."""
        return [p.pid for s, p in self.procs.items() if s == "pop3"]

    def run(self, *args: str, stdin: str | None = None) -> str:
        """Run one popguard command; raise PopguardError with its output if it fails."""
        cmd = [str(self.cli), "--data", str(self.data), *args]
        try:
            out = subprocess.run(
                cmd, input=stdin, capture_output=True, text=True, timeout=_CLI_TIMEOUT
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PopguardError(f"`{' '.join(cmd)}` could not run: {exc}") from exc
        if out.returncode != 0:
            raise PopguardError(
                f"`{' '.join(cmd)}` exited {out.returncode}\n"
                f"stdout: {out.stdout.strip()[-2000:]}\nstderr: {out.stderr.strip()[-2000:]}"
            )
        return out.stdout

    # -- setup ---------------------------------------------------------------------

    def _popsettings(self, server: str) -> None:
        self.run(
            "set-popsettings",
            "--server",
            server,
            "--login-type",
            "PlainTextLogin",
            "--max-connections",
            "1000",
            "--max-connection-from-single-ip",
            "1000",
            "--max-connections-per-user",
            str(self.max_per_user),
            # Only when asked: a popguard from before the workers has no such option.
            *(("--worker-processes", str(self.worker_processes)) if self.worker_processes else ()),
        )

    def _ports(self, server_name: str, address: str, needed: tuple[str, ...]) -> dict[str, int]:
        info = json.loads(self.run("get-server", server_name, "--format", "json"))
        server = info[0] if isinstance(info, list) else info
        ports = {str(k): int(v) for k, v in server["Ports"].items()}
        if server.get("Address") not in (None, address):
            raise PopguardError(
                f"get-server reports address {server.get('Address')!r}, expected {address}"
            )
        for port in needed:
            if port not in ports:
                raise PopguardError(f"get-server lists no {port} port: {server}")
        return ports

    def _configure(self) -> None:
        self.run("new-server", SERVER, "--role", "mailbox", "--address", self.address)
        self.run("new-mailboxdatabase", DATABASE, "--server", SERVER)
        self._popsettings(SERVER)
        if self.frontend_address is not None:
            self.run(
                "new-server", FRONTEND, "--role", "frontend", "--address", self.frontend_address
            )
            self._popsettings(FRONTEND)
        for user in self.users:
            self.run(
                "new-mailbox", user, "--database", DATABASE, "--password-stdin", stdin=self.password
            )
        self.ports = self._ports(SERVER, self.address, ("pop3be", "lmtp"))
        if self.frontend_address is not None:
            self.frontend_ports = self._ports(FRONTEND, self.frontend_address, ("pop3",))

    def _serve(self, service: str, server: str = SERVER) -> None:
        log = open(self.data / f"serve-{service}.log", "wb")  # noqa: SIM115
        self.procs[service] = subprocess.Popen(
            [str(self.cli), "--data", str(self.data), "serve", service, "--server", server],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()  # the child has its own copy

    def _check_alive(self) -> None:
        for service, proc in self.procs.items():
            if proc.poll() is not None:
                raise PopguardError(
                    f"`popguard serve {service}` exited {proc.returncode}:\n"
                    + self.log_tail(service)
                )

    def _deliver_lmtp(self) -> None:
        """Every message to every user over LMTP, one recipient per transaction."""
        deadline = time.monotonic() + _DELIVERY_TIMEOUT
        with smtplib.LMTP(self.address, self.ports["lmtp"], timeout=60) as lmtp:
            for user in self.users:
                for msg in self.messages:
                    if time.monotonic() > deadline:
                        raise PopguardError(f"delivery took longer than {_DELIVERY_TIMEOUT:.0f}s")
                    refused = lmtp.sendmail(f"sender@{DOMAIN}", [user], msg.data)
                    if refused:
                        raise PopguardError(f"LMTP refused {user}: {refused}")

    def _deliver_cli(self) -> None:
        """The slow way: one `popguard send-message` per user and message."""
        files = []
        for msg in self.messages:
            path = self.data / f"{msg.name}.eml"
            path.write_bytes(msg.data)
            files.append(path)
        deadline = time.monotonic() + _DELIVERY_TIMEOUT
        for user in self.users:
            for path in files:
                if time.monotonic() > deadline:
                    raise PopguardError(f"delivery took longer than {_DELIVERY_TIMEOUT:.0f}s")
                self.run("send-message", "--to", user, "--file", str(path))

    def start(self) -> None:
        if not self.cli.exists():
            raise PopguardError(f"{self.cli} does not exist")
        self.data = Path(tempfile.mkdtemp(prefix="popbench-popguard-", dir=self.workdir))
        try:
            self._configure()
            self._serve("pop3be")
            self._serve("delivery")
            try:
                wait_for_greeting(self.address, self.port, timeout=30.0)
                wait_port(self.address, self.ports["lmtp"], timeout=30.0)
            except (OSError, RuntimeError) as exc:
                self._check_alive()
                raise PopguardError(
                    f"popguard services not answering: {exc}\n"
                    + self.log_tail("pop3be")
                    + self.log_tail("delivery")
                ) from exc
            try:
                self._deliver_lmtp()
                self.delivery_note = "LMTP"
            except (OSError, smtplib.SMTPException, PopguardError) as exc:
                self._check_alive()
                self.delivery_note = f"LMTP failed ({exc}); used send-message"
                self._deliver_cli()
            self._check_alive()
            if self.frontend_address is not None:
                self._start_frontend(self.frontend_address)
        except BaseException:
            self.stop()
            raise

    def _start_frontend(self, address: str) -> None:
        self._serve("pop3", FRONTEND)
        try:
            wait_for_greeting(address, self.frontend_ports["pop3"], timeout=30.0)
        except (OSError, RuntimeError) as exc:
            self._check_alive()
            raise PopguardError(
                f"popguard front end not answering: {exc}\n" + self.log_tail("pop3")
            ) from exc
        self._check_alive()

    def log_tail(self, service: str, lines: int = 30) -> str:
        path = self.data / f"serve-{service}.log"
        if not path.exists():
            return ""
        return "".join(path.read_text(errors="replace").splitlines(True)[-lines:])

    # -- teardown ------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM each service we started, SIGKILL its group if it lingers."""
        procs, self.procs = self.procs, {}
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            wait_or_kill_group(proc)
        remove_unless_kept(self.data)
