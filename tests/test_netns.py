"""Several hosts in network namespaces of the tests' own, the directory across them.

Every host is a Linux network namespace on a bridge, with an address from
198.18.0.0/15 (popguard.testing.hosts); all of it is deleted at the end.
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
from dataclasses import dataclass
from pathlib import Path

import pytest

from popguard.testing.hosts import Host, HostNetwork
from popguard.testing.organization import three_server_topology, wait_until
from popguard.testing.postgres import PostgresServer


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def namespaces() -> str:
    return run(["ip", "netns", "list"]).stdout


CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], 4242), 2).close()"
LISTEN = (
    "import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 4242)); s.listen(); "
    "time.sleep(120)"
)


def connects(host: Host, address: str) -> bool:
    return run(host.command(sys.executable, "-c", CONNECT, address), timeout=30).returncode == 0


def test_hosts_reach_each_other_only_over_their_network_and_are_deleted() -> None:
    with HostNetwork.make(["a", "b"]) as network:
        a, b = network["a"], network["b"]
        assert a.address.startswith(("198.18.", "198.19."))
        listener = subprocess.Popen(b.command(sys.executable, "-c", LISTEN))
        try:
            deadline = time.monotonic() + 10
            while not connects(a, b.address) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert connects(a, b.address)
            assert not connects(a, "127.0.0.1")  # b's loopback is b's own
            network.cut("b")
            assert not connects(a, b.address)
            network.mend("b")
            assert connects(a, b.address)
        finally:
            listener.kill()
            listener.wait()
        names = [host.namespace for host in network.hosts.values()]
        bridge = network.bridge
    assert not any(name in namespaces() for name in names)
    assert run(["ip", "link", "show", bridge]).returncode != 0


@pytest.fixture
def network_with_directory() -> Iterator[tuple[HostNetwork, PostgresServer]]:
    with HostNetwork.make(["db", "mail"]) as network:
        db = network["db"]
        server = PostgresServer.start(host=db.address, prefix=tuple(db.command()))
        try:
            yield network, server
        finally:
            server.remove()


def topology(directory_section: str) -> str:
    # One host holds the whole organization here, on its own loopback addresses.
    return f"""{directory_section}
[[servers]]
name = "cas1"
roles = ["frontend"]
address = "127.0.1.1"

[[servers]]
name = "mbx1"
roles = ["mailbox"]
address = "127.0.2.1"

[[servers]]
name = "mbx2"
roles = ["mailbox"]
address = "127.0.3.1"

[[databases]]
name = "DB01"
copies = ["mbx1", "mbx2"]
"""


def curl_retr(
    command: list[str], ca: Path, user: str, password: str
) -> subprocess.CompletedProcess[str]:
    return run([*command, "curl", "--silent", "--show-error", "--max-time", "20",
                "--ssl-reqd", "--cacert", str(ca), "--user", f"{user}:{password}",
                "pop3s://127.0.1.1:10995/1"])  # fmt: skip


@pytest.mark.timeout(400)
def test_an_organization_uses_a_directory_on_another_host_and_rides_out_losing_it(
    network_with_directory: tuple[HostNetwork, PostgresServer], tmp_path: Path
) -> None:
    network, postgres = network_with_directory
    mail = network["mail"]
    config = tmp_path / "organization.toml"
    config.write_text(topology(postgres.directory_section(postgres.new_database())))
    data = tmp_path / "data"
    popguard = mail.command(sys.executable, "-m", "popguard", "--data", str(data))
    started = run([*popguard, "up", "--detach", "--config", str(config)], timeout=180)
    try:
        assert started.returncode == 0, started.stderr
        user = started.stdout.split("demo mailbox ")[1].split()[0]
        password = started.stdout.split("password ")[1].split()[0]
        ca = data / "tls" / "ca.pem"
        first = curl_retr(mail.command(), ca, user, password)
        assert first.returncode == 0 and "Welcome to popguard" in first.stdout, first.stderr

        network.cut("db")  # the directory's host is gone, silently: no refusal, no reset
        try:
            time.sleep(8)  # the keepalives and time-outs notice the loss
            during = curl_retr(mail.command(), ca, user, password)
            assert during.returncode == 0 and "Welcome" in during.stdout, during.stderr
            refused = run([*popguard, "get-server"], timeout=60)
            assert refused.returncode == 1
            assert "directory unreachable" in refused.stderr, refused.stderr
            assert refused.stderr.count("\n") == 1
        finally:
            network.mend("db")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            back = run([*popguard, "get-server"], timeout=60)
            if back.returncode == 0:
                break
            time.sleep(1)
        assert back.returncode == 0, back.stderr
        after = curl_retr(mail.command(), ca, user, password)
        assert after.returncode == 0 and "Welcome" in after.stdout, after.stderr
    finally:
        down = run([*popguard, "down"], timeout=120)
    assert down.returncode == 0, down.stderr


LMTP_TO = """
import smtplib, sys
with smtplib.LMTP(sys.argv[1], 2424, timeout=30) as client:
    client.ehlo("test.example")
    client.mail("sender@example.test")
    code, text = client.rcpt(sys.argv[2])
    assert code == 250, (code, text)
    code, text = client.data(sys.stdin.buffer.read())
    print(code, text.decode())
    sys.exit(0 if code == 250 else 1)
"""


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

    def popguard(self, name: str, *argv: str) -> str:
        done = subprocess.run(
            self.hosts[name].command(sys.executable, "-m", "popguard", "--data",
                                     str(self.folders[name]), *argv),
            capture_output=True, text=True, timeout=240, check=False,
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
            "--user", self.user, "--password", self.password,
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
        assert len(acknowledged) > 20, result
        inventory = subprocess.run(self.mail_load("inventory"), capture_output=True, text=True,
                                   timeout=120, check=False)  # fmt: skip
        assert inventory.returncode == 0, inventory.stderr
        held = Counter(json.loads(inventory.stdout))
        for number, tries in acknowledged.items():
            copies = held[f"load-{number}"]
            if number in deleted and tries == 1:
                assert copies == 0, f"load-{number} was deleted and came back"
            elif number not in deleted:
                assert copies >= 1, f"load-{number} was acknowledged and is lost"
                if tries == 1:
                    assert copies == 1, f"load-{number} is there {copies} times"
        print(f"{len(acknowledged)} acknowledged, {len(deleted)} deleted, all accounted for")
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
def three_hosts(tmp_path: Path, more_config: str = "") -> Iterator[ThreeHosts]:
    """PostgreSQL on a host of its own; a front end and two mailbox servers each on a
    host of its own, with its own data folder and its own `up --servers NAME`."""
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
            network, hosts, folders, "", "", folders["mbx1"] / "tls" / "ca.pem", postgres
        )
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
                    capture_output=True, timeout=120, check=False,
                )  # fmt: skip
            postgres.remove()


@pytest.mark.timeout(600)
def test_three_hosts_serve_move_and_take_mail_for_the_active_copy(tmp_path: Path) -> None:
    """The several-hosts issue's 'done when'."""
    with three_hosts(tmp_path) as org:
        assert "Welcome to popguard" in org.retr(1)
        org.wait_healthy("DB01\\mbx2")
        org.popguard("mbx1", "move-activemailboxdatabase", "DB01", "--activate-on-server",
                     "mbx2")  # fmt: skip
        shown = json.loads(org.popguard("cas1", "get-mailboxdatabase", "DB01", "--format",
                                        "json"))  # fmt: skip
        assert "mbx2" in json.dumps(shown), shown

        # Mail handed to mbx1 for a DB01 mailbox now lands in mbx2's active copy.
        handed = subprocess.run(
            org.hosts["mbx2"].command(sys.executable, "-c", LMTP_TO,
                                      org.hosts["mbx1"].address, org.user),
            input=b"Subject: handed to mbx1\r\n\r\nDB01 is active on mbx2 now.\r\n",
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert handed.returncode == 0, handed.stderr
        second = eventually(lambda: org.retr(2), 30)
        assert "Subject: handed to mbx1" in second
        assert "Welcome to popguard" in org.retr(1)
        health = json.loads(org.popguard("cas1", "get-serverhealth", "mbx2", "--format",
                                         "json"))  # fmt: skip
        assert health, "the health API of mbx2 answers a command run on cas1's host"


@pytest.mark.timeout(900)
def test_active_manager_fails_over_a_host_killed_whole(tmp_path: Path) -> None:
    """kill -9 of every process of mbx1's host under load: DB01 is served again through
    the front end from mbx2, with nobody typing a command and nothing acknowledged lost;
    the host comes back as a passive copy."""
    with three_hosts(tmp_path, "\n[active_manager]\nenabled = true\n") as org:
        assert "Welcome to popguard" in org.retr(1)
        org.wait_healthy("DB01\\mbx2")
        load = org.start_load(seconds=60)
        time.sleep(10)
        killed_at = time.monotonic()
        kill_host(org.hosts["mbx1"])
        welcome = eventually(lambda: org.retr(1), 90)
        served_after = time.monotonic() - killed_at
        assert "Welcome to popguard" in welcome
        print(f"DB01 served again {served_after:.1f} s after its host died")
        copies = json.loads(org.popguard("mbx2", "get-mailboxdatabasecopystatus",
                                         "--format", "json"))  # fmt: skip
        status = {row["Name"]: row["Status"] for row in copies}
        assert status["DB01\\mbx2"] == "Mounted", status
        assert status["DB01\\mbx1"] == "ServiceDown", status
        servers = json.loads(org.popguard("mbx2", "get-mailboxserver", "--format", "json"))
        lease = {row["Name"]: row["LeaseSecondsLeft"] for row in servers}
        assert lease["mbx1"] < 0 < lease["mbx2"], lease
        org.popguard("mbx1", "up", "--detach", "--servers", "mbx1")  # the host is back
        org.check_load(load)
        assert active_of(org, "DB01") == "mbx2"  # the returning host stays passive
        org.wait_healthy("DB01\\mbx1")


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


@pytest.mark.timeout(600)
def test_a_cut_off_host_fences_itself_and_the_other_side_fails_over(tmp_path: Path) -> None:
    with three_hosts(tmp_path, "\n[active_manager]\nenabled = true\n") as org:
        assert "Welcome to popguard" in org.retr(1)
        org.wait_healthy("DB01\\mbx2")
        mbx1 = org.hosts["mbx1"]
        assert lmtp_code(mbx1, mbx1.address, org.user) == 250
        load = org.start_load(seconds=60)
        time.sleep(5)
        org.network.cut("mbx1")
        try:
            # The cut-off side, alive, stops taking DB01's mail once its lease is stale.
            wait_until("mbx1 to fence itself",
                       lambda: lmtp_code(mbx1, mbx1.address, org.user) != 250, 30)  # fmt: skip
            assert lmtp_code(mbx1, mbx1.address, org.user) == 451
            welcome = eventually(lambda: org.retr(1), 90)  # the other side, from mbx2
            assert "Welcome to popguard" in welcome
        finally:
            org.network.mend("mbx1")
        time.sleep(5)  # mbx1 renews its lease again
        assert active_of(org, "DB01") == "mbx2"  # the returning host stays passive
        # Mail handed to the returned host goes to the active copy.
        assert lmtp_code(mbx1, mbx1.address, org.user) == 250
        org.check_load(load)
        org.wait_healthy("DB01\\mbx1")


@pytest.mark.timeout(600)
def test_a_paused_host_wakes_up_fenced_and_passive(tmp_path: Path) -> None:
    with three_hosts(tmp_path, "\n[active_manager]\nenabled = true\n") as org:
        assert "Welcome to popguard" in org.retr(1)
        org.wait_healthy("DB01\\mbx2")
        mbx1 = org.hosts["mbx1"]
        load = org.start_load(seconds=60)
        time.sleep(5)
        pids = [int(pid) for pid in run(["ip", "netns", "pids", mbx1.namespace]).stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        try:
            welcome = eventually(lambda: org.retr(1), 90)
            assert "Welcome to popguard" in welcome
            time.sleep(max(0.0, 20 - 10))
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        time.sleep(5)
        assert active_of(org, "DB01") == "mbx2"
        assert "Welcome to popguard" in org.retr(1)
        assert lmtp_code(mbx1, mbx1.address, org.user) == 250  # handed to mbx2
        org.check_load(load)
        subjects = json.loads(run(org.mail_load("inventory"), timeout=120).stdout)
        assert "on the cut-off side" in subjects  # handed over after the pause
        org.wait_healthy("DB01\\mbx1")


@pytest.mark.timeout(900)
def test_the_directory_stopped_for_30_s_moves_nothing_and_loses_nothing(tmp_path: Path) -> None:
    """PostgreSQL stopped for 30 s under load with Active Manager on: every server
    fences (nobody can renew), nobody fails over when it returns (every live server
    renews within a lease of its return), and nothing acknowledged is lost."""
    with three_hosts(tmp_path, "\n[active_manager]\nenabled = true\n") as org:
        assert "Welcome to popguard" in org.retr(1)
        org.wait_healthy("DB01\\mbx2")
        load = org.start_load(seconds=75)
        time.sleep(5)
        org.postgres.pg_ctl("stop")
        try:
            time.sleep(30)
        finally:
            org.postgres.pg_ctl("start")
        welcome = eventually(lambda: org.retr(1), 90)
        assert "Welcome to popguard" in welcome
        org.check_load(load)
        assert active_of(org, "DB01") == "mbx1"  # nobody failed over
