"""Three hosts of one organization in network namespaces, for fault tests and
benchmarks: PostgreSQL on a host of its own, and cas1, mbx1 and mbx2 each on a host of
its own with its own data folder and its own `up --servers NAME`; a counted mail load
run from the front end's host (testing/mail_load.py); and the faults: a host killed
whole, a link cut, a host paused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from popguard.testing.hosts import Host, HostNetwork
from popguard.testing.organization import three_server_topology
from popguard.testing.postgres import PostgresServer


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def three_host_topology(cas1: str, mbx1: str, mbx2: str, directory_section: str) -> str:
    return three_server_topology(cas1, mbx1, mbx2, directory_section)


def pop3s_retr(host: Host, cas1: str, ca: Path, user: str, password: str, number: int) -> str:
    done = run([*host.command("curl", "--silent", "--show-error", "--max-time", "20",
                              "--ssl-reqd", "--cacert", str(ca), "--user", f"{user}:{password}",
                              f"pop3s://{cas1}:10995/{number}")])  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


@dataclass
class ThreeHosts:
    network: HostNetwork
    hosts: dict[str, Host]
    folders: dict[str, Path]
    user: str
    password: str
    ca: Path
    postgres: PostgresServer
    # What a host's popguard commands (and so the services its `up` starts) have in
    # their environment besides the test's own: e.g. a stepped clock (clock_step.py).
    environments: dict[str, dict[str, str]] = field(default_factory=dict)

    def environment(self, name: str) -> dict[str, str]:
        return os.environ | self.environments.get(name, {})

    def popguard(self, name: str, *argv: str) -> str:
        done = subprocess.run(
            self.hosts[name].command(sys.executable, "-m", "popguard", "--data",
                                     str(self.folders[name]), *argv),
            capture_output=True, text=True, timeout=240, check=False,
            env=self.environment(name),
        )  # fmt: skip
        assert done.returncode == 0, f"{name}: popguard {' '.join(argv)}: {done.stderr}"
        return done.stdout

    def retr(self, number: int) -> str:
        """RETR through the front end, from the front end's host."""
        return pop3s_retr(self.hosts["cas1"], self.hosts["cas1"].address, self.ca,
                          self.user, self.password, number)  # fmt: skip

    def mail_load(self, *argv: str) -> list[str]:
        return list(self.hosts["cas1"].command(
            sys.executable, "-m", "popguard.testing.mail_load", *argv,
            "--pop3s", self.hosts["cas1"].address, "--ca", str(self.ca),
            # `=` forms: a generated password may begin with "-", which argparse would
            # take for an option.
            f"--user={self.user}", f"--password={self.password}",
        ))  # fmt: skip

    def start_load(self, seconds: float) -> subprocess.Popen[str]:
        """LMTP deliveries to mbx1, then mbx2 (Postfix's next hops), and deletions
        through the front end, for `seconds`, from the front end's host."""
        servers = f"{self.hosts['mbx1'].address},{self.hosts['mbx2'].address}"
        return subprocess.Popen(
            self.mail_load("load", "--lmtp", servers, "--seconds", str(seconds)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def check_load(self, load: subprocess.Popen[str]) -> None:
        """Every acknowledged message is there (once, if acknowledged at the first
        try), no deleted one came back, and there is one active copy of DB01."""
        out, err = load.communicate(timeout=240)
        assert load.returncode == 0, err
        result = json.loads(out)
        acknowledged = {int(n): tries for n, tries in result["acknowledged"].items()}
        deleted = set(result["deleted"])
        uncertain = set(result["uncertain"])
        assert len(acknowledged) > 20, result
        inventory = subprocess.run(self.mail_load("inventory"), capture_output=True, text=True,
                                   timeout=120, check=False)  # fmt: skip
        assert inventory.returncode == 0, inventory.stderr
        held = Counter(json.loads(inventory.stdout))
        for number, tries in acknowledged.items():
            if number in uncertain:
                continue  # its QUIT answered -ERR: deleted or not, both are right
            copies = held[f"load-{number}"]
            if number in deleted and tries == 1:
                assert copies == 0, f"load-{number} was deleted and came back"
            elif number not in deleted:
                assert copies >= 1, f"load-{number} was acknowledged and is lost"
                if tries == 1:
                    assert copies == 1, f"load-{number} is there {copies} times"
        print(f"{len(acknowledged)} acknowledged, {len(deleted)} deleted, "
              f"{len(uncertain)} QUITs answered -ERR, all accounted for")  # fmt: skip
        active_of(self, "DB01")

    def wait_healthy(self, identity: str) -> None:
        deadline = time.monotonic() + 90
        status: dict[str, object] = {}
        while time.monotonic() < deadline:
            status = json.loads(
                self.popguard(
                    "mbx1",
                    "get-mailboxdatabasecopystatus",
                    "--identity",
                    identity,
                    "--format",
                    "json",
                )
            )[0]
            if status["Status"] == "Healthy" and status["CopyQueueLength"] == 0:
                return
            time.sleep(1)
        raise AssertionError(f"{identity} never became Healthy: {status}")


@contextlib.contextmanager
def three_hosts(
    tmp_path: Path, more_config: str = "", environments: dict[str, dict[str, str]] | None = None
) -> Iterator[ThreeHosts]:
    """PostgreSQL on a host of its own; a front end and two mailbox servers each on a
    host of its own, with its own data folder and its own `up --servers NAME`; each
    host's popguard commands with `environments[host]` added to their environment."""
    with HostNetwork.make(["db", "cas1", "mbx1", "mbx2"]) as network:
        db = network["db"]
        postgres = PostgresServer.start(host=db.address, prefix=tuple(db.command()))
        hosts = {name: network[name] for name in ("cas1", "mbx1", "mbx2")}
        folders = {name: tmp_path / name for name in hosts}
        for folder in folders.values():
            folder.mkdir(mode=0o700)
        config = tmp_path / "organization.toml"
        config.write_text(three_host_topology(
            hosts["cas1"].address, hosts["mbx1"].address, hosts["mbx2"].address,
            postgres.directory_section(postgres.new_database()),
        ) + more_config)  # fmt: skip
        org = ThreeHosts(
            network, hosts, folders, "", "", folders["mbx1"] / "tls" / "ca.pem", postgres,
            dict(environments or {}),
        )  # fmt: skip
        started: list[str] = []
        try:
            # The first host makes the organization (and keeps its CA key).
            first = org.popguard("mbx1", "up", "--detach", "--config", str(config),
                                 "--servers", "mbx1")  # fmt: skip
            started.append("mbx1")
            match = re.search(r"demo mailbox (\S+) \(in DB01\)\s+password (\S+)", first)
            assert match, first
            org.user, org.password = match.groups()
            for name in ("mbx2", "cas1"):
                bundle = tmp_path / f"{name}.credentials"
                org.popguard("mbx1", "export-server-credentials", name, "--out", str(bundle))
                (folders[name] / "popguard.toml").write_text(config.read_text())
                org.popguard(name, "import-server-credentials", str(bundle))
                org.popguard(name, "up", "--detach", "--servers", name)
                started.append(name)
            yield org
        finally:
            for name in reversed(started):
                subprocess.run(
                    hosts[name].command(sys.executable, "-m", "popguard", "--data",
                                        str(folders[name]), "down"),
                    capture_output=True, timeout=120, check=False, env=org.environment(name),
                )  # fmt: skip
            postgres.remove()


def kill_host(host: Host) -> None:
    pids = run(["ip", "netns", "pids", host.namespace]).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def eventually(attempt: Callable[[], str], bound: float) -> str:
    """`attempt` once it works, trying every half second for at most `bound` seconds."""
    deadline = time.monotonic() + bound
    while True:
        try:
            return attempt()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


LMTP_CODE = """
import smtplib, sys
with smtplib.LMTP(sys.argv[1], 2424, timeout=30) as client:
    client.ehlo("test.example")
    client.mail("sender@example.test")
    code, _ = client.rcpt(sys.argv[2])
    if code == 250:
        code, _ = client.data(b"Subject: on the cut-off side\\r\\n\\r\\nx\\r\\n")
    print(code)
"""


def lmtp_code(on: Host, to: str, user: str) -> int:
    done = run(on.command(sys.executable, "-c", LMTP_CODE, to, user), timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def active_of(org: ThreeHosts, database: str) -> str:
    copies = json.loads(org.popguard("mbx2", "get-mailboxdatabasecopystatus", "--format",
                                     "json"))  # fmt: skip
    mounted = [
        row["Name"]
        for row in copies
        if row["Status"] == "Mounted" and row["Name"].startswith(f"{database}\\")
    ]
    assert len(mounted) == 1, copies  # one active copy, whatever happened
    return str(mounted[0]).split("\\")[1]
