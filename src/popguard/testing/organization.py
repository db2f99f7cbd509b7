"""popguard services started for a test or a benchmark: one service as a process of
its own (`popguard serve`), or a whole organization as an operator starts it,
`popguard up --detach`, in a fresh data folder, with every service under supervisord
and every health engine running.

    popguard --data DATA up --detach --frontend-address A --address B --second-address C
    popguard --data DATA down

DATA/popguard.toml is written before `up` (faults enabled when asked). Commands go
through the `popguard` CLI; only the polling that needs sub-second resolution talks
to the health API directly (the same HTTP API and bearer token the CLI uses), since
one CLI run costs about half a second of Python start-up.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

# Not popguard's defaults (127.0.1.1, .2.1, .3.1): a `popguard up` or a test run
# elsewhere on the machine may be using those.
DEFAULT_ADDRESSES = ("127.0.11.1", "127.0.12.1", "127.0.13.1")
SERVERS = ("cas1", "mbx1", "mbx2")  # in the order of the addresses
PORTS = {
    "cas1": (10110, 10995, 8480, 8088),
    "mbx1": (1110, 1995, 2424, 2425, 64327, 8480),
    "mbx2": (1110, 1995, 2424, 2425, 64327, 8480),
}
CLI_TIMEOUT = 120.0  # seconds for one popguard command (up and down wait up to 60 s each)
API_TIMEOUT = 10.0  # seconds for one health API request
INVOKE_TIMEOUT = 30.0  # seconds for one probe run through the API (timeouts are 4-12 s)
POLL = 0.5  # seconds between two looks at anything we wait for


class OrganizationError(RuntimeError):
    """The organization did not do what the run needs; the message says what."""


def popguard(
    data: Path, *args: str, stdin: str | None = None, timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """The `popguard` command as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "popguard", "--data", str(data), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def popguard_output(
    data: Path, *args: str, stdin: str | None = None, timeout: float = CLI_TIMEOUT
) -> str:
    """The output of a `popguard` command that must succeed."""
    done = popguard(data, *args, stdin=stdin, timeout=timeout)
    if done.returncode != 0:
        raise OrganizationError(f"popguard {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def serve(data: Path, service: str, server: str, log: Path) -> subprocess.Popen[bytes]:
    """`popguard serve SERVICE --server SERVER` in the background, its output appended
    to `log`. The caller waits for its port and stops it (stop_processes)."""
    command = [sys.executable, "-m", "popguard", "--data", str(data), "serve", service]
    with open(log, "ab") as out:
        return subprocess.Popen([*command, "--server", server], stdout=out, stderr=out)


def addresses_free(addresses: tuple[str, ...]) -> str:
    """'' if every port of every server can be bound on its address, else what is taken."""
    for server, address in zip(SERVERS, addresses, strict=True):
        for port in PORTS[server]:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((address, port))
                except OSError as exc:
                    return f"{address}:{port} ({server}) is taken: {exc.strerror}"
    return ""


def three_server_topology(cas1: str, mbx1: str, mbx2: str, directory_section: str = "") -> str:
    """A topology file: front end cas1, mailbox servers mbx1 and mbx2, DB01 on mbx1 with a
    copy on mbx2, and `directory_section` ([directory] ...) first."""
    return f"""{directory_section}
[[servers]]
name = "cas1"
roles = ["frontend"]
address = "{cas1}"

[[servers]]
name = "mbx1"
roles = ["mailbox"]
address = "{mbx1}"

[[servers]]
name = "mbx2"
roles = ["mailbox"]
address = "{mbx2}"

[[databases]]
name = "DB01"
copies = ["mbx1", "mbx2"]
"""


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Seconds until check() held, polled every POLL; OrganizationError after `timeout`."""
    started = time.monotonic()
    while True:
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise OrganizationError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL)


class UpOrganization:
    def __init__(self, data: Path, addresses: tuple[str, ...]) -> None:
        self.data = data
        self.addresses = dict(zip(SERVERS, addresses, strict=True))
        self._token = ""
        self.demo = ("", "")  # the demo mailbox's address and password, once up
        self._http: httpx.Client | None = None  # once up: it trusts the organization's CA

    # The CLI -------------------------------------------------------------------------

    def cli(self, *args: str) -> str:
        return popguard_output(self.data, *args)

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--format", "json"))

    def up(self, faults: bool) -> None:
        # Owner-only, as popguard makes its own files: `up` refuses anything wider.
        self.data.mkdir(mode=0o700, parents=True, exist_ok=True)
        config = self.data / "popguard.toml"
        config.write_text(f"[faults]\nenabled = {str(faults).lower()}\n")
        config.chmod(0o600)
        cas, mbx1, mbx2 = (self.addresses[s] for s in SERVERS)
        self.cli("up", "--detach", "--frontend-address", cas, "--address", mbx1,
                 "--second-address", mbx2)  # fmt: skip
        self._token = (self.data / "health" / "api-token").read_text().strip()
        # The health API speaks HTTPS with the organization's certificates.
        self._http = httpx.Client(
            timeout=API_TIMEOUT, verify=ssl.create_default_context(cafile=str(self.ca_file()))
        )
        address, password = (self.data / "demo-mailbox.txt").read_text().split()[:2]
        self.demo = (address, password)

    def down(self) -> None:
        if self._http is not None:
            self._http.close()
        self.cli("down")

    # The health API ------------------------------------------------------------------

    def api(self, server: str, method: str, path: str, **kwargs: Any) -> Any:
        url = f"https://{self.addresses[server]}:8480/v1/{path}"
        if self._http is None:
            raise OrganizationError(f"{server} {path}: the organization is not up")
        response = self._http.request(
            method, url, headers={"Authorization": f"Bearer {self._token}"}, **kwargs
        )
        if response.status_code != 200:
            raise OrganizationError(f"{server} {path}: HTTP {response.status_code} {response.text}")
        return response.json()

    def serverhealth(self, server: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.api(server, "GET", "serverhealth")
        return rows

    def invoke(self, server: str, identity: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.api(
            server, "POST", "invoke", json={"identity": identity}, timeout=INVOKE_TIMEOUT
        )
        return rows

    def recovery_actions(self, server: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.api(server, "GET", "recoveryactions")
        return rows

    def alerts(self, server: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.api(server, "GET", "alerts")
        return rows

    def not_healthy(self) -> list[tuple[str, str, str, str]]:
        """(server, monitor, resource, AlertValue) of every monitor that is not Healthy."""
        return [
            (server, row["Name"], row["TargetResource"], row["AlertValue"])
            for server in SERVERS
            for row in self.serverhealth(server)
            if row["AlertValue"] != "Healthy"
        ]

    def wait_all_healthy(self, timeout: float) -> float:
        """Every monitor of every server has results and is Healthy."""
        return wait_until("every monitor to be Healthy", lambda: not self.not_healthy(), timeout)

    # Files ---------------------------------------------------------------------------

    def results_store(self, server: str) -> sqlite3.Connection:
        """The server's health results store, read-only (the health service writes it)."""
        path = self.data / "servers" / server / "health" / "results.sqlite"
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)

    def supervisor_log(self) -> Path:
        return self.data / "supervisor" / "supervisord.log"

    def ca_file(self) -> Path:
        return self.data / "tls" / "ca.pem"


@contextlib.contextmanager
def up_organization(
    addresses: tuple[str, ...], faults: bool, prefix: str, keep: Callable[[], bool]
) -> Iterator[UpOrganization]:
    """`up --detach` in a fresh folder; `down` however the block ends (SIGTERM too: it
    becomes a KeyboardInterrupt, as Ctrl-C is). The folder goes unless keep() says,
    asked at the end (a failed run may want its logs)."""
    taken = addresses_free(addresses)
    if taken:
        raise OrganizationError(f"{taken}: choose other loopback addresses with --addresses")
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    org = UpOrganization(folder / "data", addresses)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        org.up(faults)
        yield org
    finally:
        try:
            org.down()
        except OrganizationError as exc:  # not up (up failed early): nothing to stop
            print(f"down: {exc}", file=sys.stderr)
        signal.signal(signal.SIGTERM, previous)
        if keep():
            print(f"kept the data folder {org.data}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
