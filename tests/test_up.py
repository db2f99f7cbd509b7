"""`popguard up` as a new user runs it: start, read the demo mailbox, Ctrl-C."""

from __future__ import annotations

import ipaddress
import json
import os
import poplib
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popguard.control.service_control import WORKER_SERVICES
from popguard.directory.config import install_config, parse_config
from popguard.directory.directory import Directory
from popguard.directory.organization import Organization, default_topology, ensure_topology
from popguard.errors import UserError
from popguard.net.workers import WORKER_COUNT_VARIABLE
from popguard.testing.net import free_loopback_address
from popguard.testing.organization import popguard

from .conftest import json_of, pid_alive, processes_matching, wait_for


def test_up_serves_the_demo_mailbox_and_stops_cleanly(tmp_path: Path) -> None:
    frontend, mailbox, second = (free_loopback_address() for _ in range(3))
    data = tmp_path / "data"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "popguard",
            "--data",
            str(data),
            "up",
            "--frontend-address",
            frontend,
            "--address",
            mailbox,
            "--second-address",
            second,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # The default a new user gets: a worker per core (conftest sets one for the rest).
        env={k: v for k, v in os.environ.items() if k != WORKER_COUNT_VARIABLE},
    )
    try:
        assert process.stdout is not None
        output = ""
        deadline = time.monotonic() + 60
        while "Press Ctrl-C to stop." not in output and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output += line
        assert "Press Ctrl-C to stop." in output, output
        match = re.search(r"demo mailbox (\S+) \(in DB01\)\s+password (\S+)", output)
        assert match, output
        user, password = match.groups()
        assert f"curl --ssl-reqd --cacert {data.resolve()}/tls/ca.pem" in output
        context = ssl.create_default_context(cafile=str(data / "tls" / "ca.pem"))
        # Through the front end, as the printed commands do.
        assert f"pop3s://{frontend}:10995/1" in output
        client = poplib.POP3_SSL(frontend, 10995, context=context, timeout=10)
        client.user(user)
        client.pass_(password)
        _, lines, _ = client.retr(1)
        assert b"Subject: Welcome to popguard" in lines
        client.quit()
        children = processes_matching(f"popguard --data {data} serve")
        # pop3be, delivery, replication, health twice; pop3, health and web: 11 processes
        # the supervisor runs, and the workers of each master (pop3be, delivery, pop3).
        rows = [row for server in ("cas1", "mbx1", "mbx2")
                for row in json_of(data, "get-service", "--server", server)]  # fmt: skip
        masters = [int(row["ProcessId"]) for row in rows]
        workers = [int(pid) for row in rows for pid in (row["Workers"] or "").split()]
        assert len(masters) == 11, rows
        cores = len(os.sched_getaffinity(0))
        assert all(len(row["Workers"].split()) == cores
                   for row in rows if row["Name"] in WORKER_SERVICES), rows  # fmt: skip
        assert sorted(children) == sorted(masters + workers), (children, rows)
        # mbx2's copy of DB01 follows mbx1's: the welcome message is there too.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            shown = popguard(data, "get-mailboxdatabasecopystatus", "--identity", "DB01\\mbx2",
                             "--format", "json")  # fmt: skip
            if json.loads(shown.stdout)[0]["Status"] == "Healthy":
                break
            time.sleep(0.5)
        assert json.loads(shown.stdout)[0]["CopyQueueLength"] == 0, shown.stdout
        process.send_signal(signal.SIGINT)
        # Bounded, not timed: every service gets stopwaitsecs, and a loaded machine is slow.
        rest, _ = process.communicate(timeout=120)
    finally:
        # However the checks above went, nothing of this test may outlive it:
        # Ctrl-C is how `up` stops its services.
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(30)
    assert process.returncode == 0, rest
    assert "stopped" in rest
    assert "Traceback" not in output + rest
    assert not [pid for pid in children if pid_alive(pid)]


def test_services_run_under_supervisord_and_restart_for_real(tmp_path: Path) -> None:
    frontend, mailbox, second = (free_loopback_address() for _ in range(3))
    data = tmp_path / "data"
    started = popguard(data, "up", "--detach", "--frontend-address", frontend, "--address",
                       mailbox, "--second-address", second)  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr
        assert re.search(r"Stop it all: \S+ --data \S+ down", started.stdout), started.stdout

        def services(server: str) -> dict[str, dict[str, object]]:
            shown = popguard(data, "get-service", "--server", server, "--format", "json")
            assert shown.returncode == 0, shown.stderr
            return {row["Name"]: row for row in json.loads(shown.stdout)}

        before = services("mbx1")
        assert set(before) == {"pop3be", "delivery", "replication", "health"}
        assert all(row["Status"] == "Running" for row in before.values()), before
        restarted = popguard(data, "restart-service", "pop3be", "--server", "mbx1",
                             "--format", "json")  # fmt: skip
        (row,) = json.loads(restarted.stdout)
        # pop3be is a master and its workers: the workers are new, the master (which
        # holds the ports, so no connection was refused) is the same.
        old_workers = [int(pid) for pid in str(before["pop3be"]["Workers"]).split()]
        new_workers = [int(pid) for pid in (row["Workers"] or "").split()]
        assert row["Status"] == "Running" and row["ProcessId"] == before["pop3be"]["ProcessId"]
        assert old_workers and new_workers and not set(old_workers) & set(new_workers)
        wait_for(  # they finish their sessions (none here) and stop
            "the old workers stopped", lambda: not any(pid_alive(p) for p in old_workers), 30
        )
        # A crashed service is started again by the supervisor.
        os.kill(int(row["ProcessId"]), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = services("mbx1")["pop3be"]
            if now["Status"] == "Running" and now["ProcessId"] != row["ProcessId"]:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"pop3be was not started again: {now}")
        refused = popguard(data, "restart-server", "mbx1")
        assert refused.returncode == 1 and "holds the active copy of DB01" in refused.stderr
        # Rebooting the host is off unless the configuration allows it, and even then
        # only under systemd (a supervisord of `up` has no host to reboot).
        no_reboot = popguard(data, "restart-server", "cas1", "--reboot-host")
        assert no_reboot.returncode == 1 and "allow_reboot = true" in no_reboot.stderr
        (data / "popguard.toml").write_text("[host]\nallow_reboot = true\n")
        no_reboot = popguard(data, "restart-server", "cas1", "--reboot-host")
        assert no_reboot.returncode == 1 and "only where systemd runs" in no_reboot.stderr
        (data / "popguard.toml").unlink()
        stopped = popguard(data, "stop-service", "health", "--server", "cas1", "--format", "json")
        assert json.loads(stopped.stdout)[0]["Status"] == "Stopped"
        wrong = popguard(data, "restart-service", "pop3be", "--server", "cas1")
        assert wrong.returncode == 1 and "cas1 runs pop3, health, web; not pop3be" in wrong.stderr
        again = popguard(data, "up", "--detach")
        assert again.returncode == 1 and "already up" in again.stderr
    finally:
        down = popguard(data, "down")
    assert down.returncode == 0, down.stderr
    assert processes_matching(f"popguard --data {data} serve") == []


# Other topologies: DATA/popguard.toml's [[servers]], [[databases]] and [demo] ----------


def _topology_toml(servers: list[tuple[str, list[str], str]], databases: dict[str, list[str]],
                   demo_database: str | None = None) -> str:  # fmt: skip
    lines = []
    for name, roles, address in servers:
        lines += ["[[servers]]", f"name = {json.dumps(name)}", f"roles = {json.dumps(roles)}",
                  f"address = {json.dumps(address)}", ""]  # fmt: skip
    for name, copies in databases.items():
        lines += [
            "[[databases]]",
            f"name = {json.dumps(name)}",
            f"copies = {json.dumps(copies)}",
            "",
        ]
    if demo_database is not None:
        lines += ["[demo]", f"database = {json.dumps(demo_database)}", ""]
    return "\n".join(lines)


def _distinct_free_addresses(count: int) -> list[str]:
    addresses: list[str] = []
    while len(addresses) < count:
        address = free_loopback_address()
        if address not in addresses:
            addresses.append(address)
    return addresses


def test_up_starts_the_topology_of_a_config_file(tmp_path: Path) -> None:
    # Names unlike the default ones, so the summary cannot name cas1 or mbx1 by habit.
    fe_a, fe_b, store1, store2, store3 = _distinct_free_addresses(5)
    servers = [
        ("fe-a", ["frontend"], fe_a),
        ("fe-b", ["frontend"], fe_b),
        ("store1", ["mailbox"], store1),
        ("store2", ["mailbox"], store2),
        ("store3", ["mailbox"], store3),
    ]
    databases = {"SALES": ["store1", "store2"], "STAFF": ["store3", "store1", "store2"]}
    text = _topology_toml(servers, databases, demo_database="STAFF")
    config = tmp_path / "organization.toml"
    config.write_text(text)
    data = tmp_path / "data"
    started = popguard(data, "up", "--detach", "--config", str(config))
    try:
        assert started.returncode == 0, started.stderr
        output = started.stdout
        assert (data / "popguard.toml").read_text() == text
        for name, roles, address in servers:
            kind = "front end" if roles == ["frontend"] else "mailbox server"
            assert f"  {kind} {name} on {address}: " in output, output
        assert "database SALES active on store1 with passive copies on store2" in output
        assert "database STAFF active on store3 with passive copies on store1, store2" in output
        assert "--server fe-a" in output and "--server store1" in output
        assert f"pop3s://{fe_a}:10995/1" in output
        assert "cas1" not in output and "mbx1" not in output, output
        for name, roles, _ in servers:
            shown = popguard(data, "get-service", "--server", name, "--format", "json")
            assert shown.returncode == 0, shown.stderr
            rows = {row["Name"]: row["Status"] for row in json.loads(shown.stdout)}
            expected = (
                {"pop3", "health", "web"} if roles == ["frontend"]
                else {"pop3be", "delivery", "replication", "health"}
            )  # fmt: skip
            assert rows == dict.fromkeys(expected, "Running"), (name, rows)
        match = re.search(r"demo mailbox (\S+) \(in STAFF\)\s+password (\S+)", output)
        assert match, output
        user, password = match.groups()
        # Through the second front end: it finds STAFF's active copy on store3 as well.
        context = ssl.create_default_context(cafile=str(data / "tls" / "ca.pem"))
        client = poplib.POP3_SSL(fe_b, 10995, context=context, timeout=10)
        client.user(user)
        client.pass_(password)
        _, lines, _ = client.retr(1)
        assert b"Subject: Welcome to popguard" in lines
        assert b"This message was delivered through LMTP into mailbox database STAFF." in lines
        client.quit()
    finally:
        down = popguard(data, "down")
    assert down.returncode == 0, down.stderr
    assert processes_matching(f"popguard --data {data} serve") == []


TWO_SERVERS = """
[[servers]]
name = "cas1"
roles = ["frontend"]
address = "127.0.1.1"

[[servers]]
name = "mbx1"
roles = ["mailbox"]
address = "127.0.2.1"
"""
ONE_DATABASE = '\n[[databases]]\nname = "DB01"\ncopies = ["mbx1"]\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[servers]]\nname = 'cas1'\nroles = ['frontend']\naddress = '127.0.1.1'\n"
         + ONE_DATABASE, "servers: no mailbox server"),
        ("[[servers]]\nname = 'mbx1'\nroles = ['mailbox']\naddress = '127.0.2.1'\n"
         + ONE_DATABASE, "servers: no front end"),
        (TWO_SERVERS + "[[servers]]\nname = 'MBX1'\nroles = ['mailbox']\naddress = '127.0.3.1'\n"
         + ONE_DATABASE, "servers.2.name: server MBX1 is named twice"),
        (TWO_SERVERS.replace("127.0.2.1", "127.0.1.1") + ONE_DATABASE,
         "servers.1.address: mbx1's address 127.0.1.1 is also cas1's"),
        (TWO_SERVERS.replace("127.0.2.1", "127.0.2.300") + ONE_DATABASE,
         "servers.1.address: not an IP address: '127.0.2.300'"),
        (TWO_SERVERS.replace("127.0.2.1", "mbx1.example.test") + ONE_DATABASE,
         "not an IP address: 'mbx1.example.test'"),
        (TWO_SERVERS.replace('"mailbox"', '"archive"') + ONE_DATABASE, "servers.1.roles.0"),
        (TWO_SERVERS, "databases: no [[databases]]: the demo mailbox needs one"),
        (TWO_SERVERS + ONE_DATABASE.replace('["mbx1"]', '["mbx9"]'),
         "databases.0.copies: mbx9 is not a server of this file"),
        (TWO_SERVERS + ONE_DATABASE.replace('["mbx1"]', '["cas1"]'),
         "databases.0.copies: cas1 is not a mailbox server"),
        (TWO_SERVERS + ONE_DATABASE.replace('["mbx1"]', '["mbx1", "MBX1"]'),
         "databases.0.copies: DB01 has two copies on MBX1"),
        (TWO_SERVERS + ONE_DATABASE.replace('["mbx1"]', "[]"), "databases.0.copies"),
        (TWO_SERVERS + ONE_DATABASE + ONE_DATABASE.replace("DB01", "db01"),
         "databases.1.name: database db01 is named twice"),
        (TWO_SERVERS + ONE_DATABASE + "[demo]\ndatabase = 'DB02'\n",
         "demo.database: DB02 is not a database of this file"),
        (TWO_SERVERS + ONE_DATABASE + "[demo]\naddress = 'demo'\n",
         "demo.address: not a valid mailbox address"),
        (ONE_DATABASE, "databases: [[databases]] need the [[servers]]"),
        (TWO_SERVERS + ONE_DATABASE + "[[servers]]\nname = 'x'\n",
         "servers.2.roles: Field required"),
        (TWO_SERVERS.replace("roles", "port = 1\nroles") + ONE_DATABASE,
         "servers.0.port: Extra inputs are not permitted"),
        ("[[servers]\n", "not valid TOML"),
    ],
)  # fmt: skip
def test_a_topology_that_cannot_run_is_one_line_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(UserError) as error:
        parse_config(text, "org.toml")
    assert str(error.value).startswith("org.toml: "), error.value
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_topology_may_mix_roles_and_spell_names_in_any_case() -> None:
    text = (
        TWO_SERVERS.replace('["mailbox"]', '["mailbox", "frontend"]').replace("127.0.2.1", "::1")
        + ONE_DATABASE.replace('["mbx1"]', '["MBX1"]')
        + "[demo]\ndatabase = 'db01'\n"
    )
    config = parse_config(text, "org.toml")
    assert [s.name for s in config.servers] == ["cas1", "mbx1"]


@pytest.mark.parametrize(
    ("text", "on"),
    [
        ("", False),  # SQLite, one machine
        ("[directory]\nurl = 'postgresql://popguard@198.18.0.1/popguard'\n", True),
        ("[directory]\nurl = 'postgresql://popguard@198.18.0.1/popguard'\n"
         "[active_manager]\nenabled = false\n", False),
        ("[active_manager]\nenabled = true\n", True),
    ],
)  # fmt: skip
def test_active_manager_is_on_by_default_with_a_postgresql_directory(text: str, on: bool) -> None:
    assert parse_config(text, "org.toml").active_manager_on is on


def _make(data: Path, text: str) -> Organization:
    with Directory(data) as directory:
        return ensure_topology(directory, parse_config(text, "org.toml"), "org.toml")


def test_a_directory_grows_but_does_not_change_a_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = _make(data, TWO_SERVERS + ONE_DATABASE)
    assert [s.name for s in first.frontends] == ["cas1"]
    assert first.demo.new and first.demo.database == "DB01"
    # A later run adds a server, a database and a copy; what exists stays.
    grown = TWO_SERVERS + (
        "[[servers]]\nname = 'mbx2'\nroles = ['mailbox']\naddress = '127.0.3.1'\n"
        + ONE_DATABASE.replace('["mbx1"]', '["mbx2", "mbx1"]')
        + '[[databases]]\nname = "DB02"\ncopies = ["mbx2", "mbx1"]\n'
    )
    second = _make(data, grown)
    assert [s.name for s in second.mailbox_servers] == ["mbx1", "mbx2"]
    assert not second.demo.new and second.demo.password == first.demo.password
    db01 = [(c.server, c.activation_preference, c.is_active) for c in second.databases["DB01"]]
    assert db01 == [("mbx1", 1, True), ("mbx2", 2, False)]
    db02 = [(c.server, c.is_active) for c in second.databases["DB02"]]
    assert db02 == [("mbx2", True), ("mbx1", False)]
    moved = grown.replace("127.0.3.1", "127.0.3.9")
    with pytest.raises(UserError, match=r"org.toml: server mbx2 has address 127.0.3.9, but the "
                       r"directory of .* has mbx2 at 127.0.3.1"):  # fmt: skip
        _make(data, moved)
    other_roles = grown.replace("['mailbox']", "['mailbox', 'frontend']")
    with pytest.raises(UserError, match=r"server mbx2 has roles frontend, mailbox, but the "
                       r"directory of .* has mbx2 with roles mailbox"):  # fmt: skip
        _make(data, other_roles)
    with Directory(data) as directory:
        directory.new_server("mbx7", ["mailbox"], "127.0.7.1")
        assert sorted(s.name for s in directory.list_servers()) == ["cas1", "mbx1", "mbx2", "mbx7"]
    squatter = grown + "[[servers]]\nname = 'mbx8'\nroles = ['mailbox']\naddress = '127.0.7.1'\n"
    with pytest.raises(UserError, match=r"server mbx8's address 127\.0\.7\.1 is mbx7's"):
        _make(data, squatter)
    with Directory(data) as directory:
        assert sorted(s.name for s in directory.list_servers()) == ["cas1", "mbx1", "mbx2", "mbx7"]


def test_the_default_organization_keeps_the_addresses_a_folder_has(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Directory(data) as directory:
        made = ensure_topology(
            directory, default_topology(directory, "127.0.9.1", "127.0.9.2", "127.0.9.3"), "d"
        )
        assert [s.address for s in made.servers] == ["127.0.9.1", "127.0.9.2", "127.0.9.3"]
        again = default_topology(directory)
        assert [s.address for s in again.servers] == ["127.0.9.1", "127.0.9.2", "127.0.9.3"]
        with pytest.raises(UserError, match=r"server mbx1 has address 127\.0\.2\.1"):
            ensure_topology(directory, default_topology(directory, None, "127.0.2.1"), "d")


def test_install_config_keeps_a_different_file_unless_told(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = TWO_SERVERS + ONE_DATABASE
    assert install_config(data, first, "a.toml") == data / "popguard.toml"
    assert install_config(data, first, "a.toml").read_text() == first  # the same: nothing to do
    with pytest.raises(UserError, match=r"popguard.toml already exists and differs from b.toml "
                       r"\(--replace-config replaces it\)"):  # fmt: skip
        install_config(data, first + "\n[faults]\nenabled = true\n", "b.toml")
    assert (data / "popguard.toml").read_text() == first
    install_config(data, "[faults]\nenabled = true\n", "b.toml", replace=True)
    assert (data / "popguard.toml").read_text() == "[faults]\nenabled = true\n"
    assert [p.name for p in data.iterdir()] == ["popguard.toml"]


def test_up_refuses_a_bad_or_conflicting_config_before_starting_anything(tmp_path: Path) -> None:
    data = tmp_path / "data"
    bad = tmp_path / "bad.toml"
    bad.write_text(TWO_SERVERS)
    refused = popguard(data, "up", "--detach", "--config", str(bad))
    assert refused.returncode == 1
    assert (
        refused.stderr
        == f"popguard: {bad}: databases: no [[databases]]: the demo mailbox needs one\n"
    )
    assert not data.exists()
    data.mkdir()
    (data / "popguard.toml").write_text("[faults]\nenabled = true\n")
    good = tmp_path / "good.toml"
    good.write_text(TWO_SERVERS + ONE_DATABASE)
    refused = popguard(data, "up", "--detach", "--config", str(good))
    assert refused.returncode == 1
    assert refused.stderr == (
        f"popguard: {data / 'popguard.toml'} already exists and differs from {good} "
        "(--replace-config replaces it)\n"
    )
    (data / "popguard.toml").write_text(TWO_SERVERS + ONE_DATABASE)
    refused = popguard(data, "up", "--detach", "--address", "127.0.2.9")
    assert refused.returncode == 1
    assert refused.stderr == (
        f"popguard: --address is for the default organization; {data / 'popguard.toml'} lists "
        "its [[servers]] with their addresses\n"
    )
    refused = popguard(data, "up", "--replace-config")
    assert refused.stderr == "popguard: --replace-config needs --config FILE\n"
    assert processes_matching(f"popguard --data {data} serve") == []


# Random TOML-ish text: the parser says what is wrong in one line, or gives a topology
# that keeps every rule above; it never raises anything else.

NAMES = st.sampled_from(["cas1", "CAS1", "mbx1", "mbx2", "Mbx2", "DB01", "db01", "DB02", "x",
                         "", "1bad", "a b", "ä", "a\nb", "mbx1\t"])  # fmt: skip
ADDRESSES = st.sampled_from(["127.0.1.1", "127.0.2.1", "127.0.2.01", "::1", "0:0::1", "fe80::1%1",
                             "300.0.0.1", "", "localhost", "127.0.2.1 "])  # fmt: skip
ROLES = st.lists(st.sampled_from(["frontend", "mailbox", "Mailbox", "archive"]), max_size=3)
SCALARS = st.one_of(NAMES, ADDRESSES, st.integers(-2, 70000), st.booleans(), st.text(max_size=12))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), ROLES, st.lists(NAMES, max_size=4))
KEYS = st.sampled_from(["name", "roles", "address", "copies", "database", "enabled", "to",
                        "url", "from", "smtp_port", "repeat_interval", "bogus", '"a.b"',
                        '"a\\nb"', "a\nb"])  # fmt: skip
HEADERS = st.sampled_from(["[[servers]]", "[[databases]]", "[demo]", "[faults]", "[escalation]",
                           "[escalation.email]", "[escalation.webhook]", "[servers]", "[[demo]]",
                           "[other]", "[[servers]"])  # fmt: skip


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


ENTRY = st.tuples(KEYS, VALUES).map(lambda kv: f"{kv[0]} = {_toml_value(kv[1])}")
SERVER = st.tuples(NAMES, ROLES, ADDRESSES).map(
    lambda s: (
        f"[[servers]]\nname = {json.dumps(s[0])}\nroles = {json.dumps(s[1])}\n"
        f"address = {json.dumps(s[2])}"
    )
)
DATABASE = st.tuples(NAMES, st.lists(NAMES, max_size=3)).map(
    lambda d: f"[[databases]]\nname = {json.dumps(d[0])}\ncopies = {json.dumps(d[1])}"
)
DEMO = st.tuples(st.sampled_from(["demo@popguard.test", "nope", "a@b.test"]), NAMES).map(
    lambda d: f"[demo]\naddress = {json.dumps(d[0])}\ndatabase = {json.dumps(d[1])}"
)
SERVER_POOL = {
    "cas1": (["frontend"], "127.0.1.1"),
    "cas2": (["frontend"], "127.0.1.2"),
    "both": (["frontend", "mailbox"], "127.0.4.1"),
    "mbx1": (["mailbox"], "127.0.2.1"),
    "mbx2": (["mailbox"], "::1"),
}
MISTAKES = st.sampled_from([
    "", "[[servers]]\nname = 'MBX1'\nroles = ['mailbox']\naddress = '127.0.9.9'",
    "[[servers]]\nname = 'mbx9'\nroles = ['mailbox']\naddress = '127.0.2.1'",
    "[[servers]]\nname = 'mbx9'\nroles = ['mailbox']\naddress = '127.0.2.300'",
    "[[databases]]\nname = 'DB09'\ncopies = ['cas1']",
    "[[databases]]\nname = 'db01'\ncopies = ['mbx1']",
    "[[databases]]\nname = 'DB09'\ncopies = ['mbx1', 'MBX1']",
    "[demo]\ndatabase = 'DB77'", "[demo]\naddress = 'nobody'", "[faults]\nenabled = 'yes'",
])  # fmt: skip


@st.composite
def likely_topologies(draw: st.DrawFn) -> str:
    """A valid topology, now and then with one mistake added."""
    frontends = draw(st.lists(st.sampled_from(["cas1", "cas2", "both"]), min_size=1, unique=True))
    mailbox = [*(["both"] if "both" in frontends else []), "mbx1", "mbx2"]
    mailbox = draw(st.lists(st.sampled_from(mailbox), min_size=1, unique=True))
    lines = []
    for name in dict.fromkeys([*frontends, *mailbox]):
        roles, address = SERVER_POOL[name]
        spelled = name.upper() if draw(st.booleans()) else name
        lines.append(f"[[servers]]\nname = {json.dumps(spelled)}\nroles = {json.dumps(roles)}"
                     f"\naddress = {json.dumps(address)}")  # fmt: skip
    for number in range(1, draw(st.integers(1, 3)) + 1):
        copies = draw(st.lists(st.sampled_from(mailbox), min_size=1, unique=True))
        lines.append(f"[[databases]]\nname = 'DB0{number}'\ncopies = {json.dumps(copies)}")
    lines.append(draw(MISTAKES))
    return "\n".join(lines)


DOCUMENTS = st.one_of(
    likely_topologies(),
    st.lists(st.one_of(SERVER, DATABASE, DEMO), max_size=7).map("\n".join),
    st.lists(st.one_of(SERVER, DATABASE, DEMO, HEADERS, ENTRY), max_size=12).map("\n".join),
    st.lists(st.one_of(HEADERS, ENTRY, st.text(max_size=30)), max_size=10).map("\n".join),
    st.text(max_size=200),
)


@settings(max_examples=400, deadline=None)
@given(DOCUMENTS)
def test_the_config_parser_gives_a_topology_or_one_line(text: str) -> None:
    try:
        config = parse_config(text, "org.toml")
    except UserError as error:
        assert str(error).startswith("org.toml: ") and "\n" not in str(error), str(error)
        return
    if not config.servers:
        assert not config.databases
        return
    names = {s.name.lower(): s for s in config.servers}
    assert len(names) == len(config.servers)
    assert len({ipaddress.ip_address(s.address) for s in config.servers}) == len(config.servers)
    assert any("frontend" in s.roles for s in config.servers)
    assert config.databases
    for database in config.databases:
        copies = [c.lower() for c in database.copies]
        assert len(set(copies)) == len(copies)
        assert all("mailbox" in names[c].roles for c in copies)
    databases = {d.name.lower() for d in config.databases}
    assert (config.demo.database or config.databases[0].name).lower() in databases


def test_every_command_up_prints_works(tmp_path: Path) -> None:
    """As a new user would: run `popguard up` (the installed command), then each command
    it prints, as printed, in a shell."""
    addresses = [free_loopback_address() for _ in range(3)]
    data = tmp_path / "data"
    installed = str(Path(sys.executable).parent / "popguard")
    started = subprocess.run(
        [installed, "--data", str(data), "up", "--detach", "--frontend-address", addresses[0],
         "--address", addresses[1], "--second-address", addresses[2]],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr
        commands = [
            line.strip()
            for line in started.stdout.splitlines()
            if line.startswith("  ") and line.strip().split(" ", 1)[0] in ("curl", installed)
        ]
        assert len(commands) >= 9, started.stdout
        (tmp_path / "message.eml").write_bytes(b"Subject: hello\r\n\r\nfrom the README\r\n")
        for command in commands:
            ran = subprocess.run(
                ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120
            )
            assert ran.returncode == 0, (command, ran.stdout, ran.stderr)
            assert "Traceback" not in ran.stderr
            if "pop3s://" in command:
                assert "Welcome to popguard" in ran.stdout
    finally:
        subprocess.run([installed, "--data", str(data), "down"], capture_output=True, timeout=120)


def test_a_second_up_on_addresses_in_use_refuses_before_starting_anything(
    detached_organization: Path, tmp_path: Path
) -> None:
    """A second organization on the first one's addresses: one line naming the address
    and its holder, exit 1, nothing started, nothing delivered into the first."""
    first = detached_organization
    cas1 = json.loads(popguard(first, "get-server", "cas1", "--format", "json").stdout)[0]
    mbx1 = json.loads(popguard(first, "get-server", "mbx1", "--format", "json").stdout)[0]
    mbx2 = json.loads(popguard(first, "get-server", "mbx2", "--format", "json").stdout)[0]
    address, password = (first / "demo-mailbox.txt").read_text().split()

    def demo_messages() -> int:
        context = ssl.create_default_context(cafile=str(first / "tls" / "ca.pem"))
        client = poplib.POP3_SSL(cas1["Address"], int(cas1["Ports"]["pop3-tls"]),
                                 context=context, timeout=10)  # fmt: skip
        try:
            client.user(address)
            client.pass_(password)
            return int(client.stat()[0])
        finally:
            client.quit()

    before = demo_messages()
    second = tmp_path / "second"
    addresses = ["--frontend-address", cas1["Address"], "--address", mbx1["Address"],
                 "--second-address", mbx2["Address"]]  # fmt: skip
    refused = popguard(second, "up", "--detach", *addresses)
    assert refused.returncode == 1, refused.stdout
    line = refused.stderr.strip()
    assert "\n" not in line and line.startswith("popguard: cannot start: "), line
    assert re.search(r"in use by pid \d+ \(.*popguard", line), line
    assert not (second / "supervisor" / "supervisord.conf").exists()
    assert demo_messages() == before
