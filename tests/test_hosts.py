"""Hosts that share nothing but the directory: `up --servers`, a data folder per host,
credentials exported from the CA's host and imported on another, and a server added to
a running host.

Two "hosts" here are two data folders on this machine, each with its own supervisord,
on loopback addresses of their own; the second one names the first one's directory
file in its `[directory]` section.
"""

from __future__ import annotations

import json
import os
import poplib
import re
import ssl
import time
from pathlib import Path

import pytest

from popguard.testing.net import free_loopback_address
from popguard.testing.organization import popguard

from .conftest import message, processes_matching

FRONTEND_PORTS = (10110, 10995, 8480, 8088)


def _addresses() -> tuple[str, str, str]:
    chosen: list[str] = []
    while len(chosen) < 3:
        address = free_loopback_address(FRONTEND_PORTS) if not chosen else free_loopback_address()
        if address not in chosen:
            chosen.append(address)
    return chosen[0], chosen[1], chosen[2]


def _topology(cas: str, mbx1: str, mbx2: str, directory: Path | None = None) -> str:
    text = ""
    if directory is not None:
        text += f'[directory]\npath = "{directory}"\n\n'
    for name, roles, address in (
        ("cas1", '["frontend"]', cas),
        ("mbx1", '["mailbox"]', mbx1),
        ("mbx2", '["mailbox"]', mbx2),
    ):
        text += f'[[servers]]\nname = "{name}"\nroles = {roles}\naddress = "{address}"\n\n'
    text += '[[databases]]\nname = "DB01"\ncopies = ["mbx1", "mbx2"]\n\n'
    text += '[[databases]]\nname = "DB02"\ncopies = ["mbx2", "mbx1"]\n'
    return text


def _json(data: Path, *args: str) -> list[dict[str, object]]:
    done = popguard(data, *args, "--format", "json")
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, object]] = json.loads(done.stdout)
    return rows


def _wait_healthy(data: Path, identity: str, timeout: float = 90.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        (row,) = _json(data, "get-mailboxdatabasecopystatus", "--identity", identity)
        if row["Status"] == "Healthy" or time.monotonic() > deadline:
            return row
        time.sleep(0.5)


DEEP_TEST = "POP.Protocol\\PopDeepTestProbe"


def _owner_only(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@pytest.mark.timeout(300)
def test_two_hosts_each_run_their_own_servers_and_share_the_directory(tmp_path: Path) -> None:
    cas, mbx1, mbx2 = _addresses()
    host_a, host_b = _owner_only(tmp_path / "a"), _owner_only(tmp_path / "b")
    config_a, config_b = tmp_path / "a.toml", tmp_path / "b.toml"
    config_a.write_text(_topology(cas, mbx1, mbx2))
    directory = (host_a / "directory.sqlite").resolve()
    config_b.write_text(_topology(cas, mbx1, mbx2, directory))

    unknown = popguard(host_a, "up", "--detach", "--config", str(config_a), "--servers", "mbx9")
    assert unknown.returncode == 1
    expected = f"--servers: mbx9 is not a server of {config_a} nor of the directory"
    assert unknown.stderr.strip().endswith(expected), unknown.stderr
    assert "\n" not in unknown.stderr.strip()
    assert not (host_a / "popguard.toml").exists() and not (host_a / "supervisor").exists()

    started_a = popguard(host_a, "up", "--detach", "--config", str(config_a),
                         "--servers", "cas1,mbx1")  # fmt: skip
    try:
        assert started_a.returncode == 0, started_a.stderr
        out = started_a.stdout
        assert f"front end cas1 on {cas}" in out and f"mailbox server mbx1 on {mbx1}" in out
        assert "mailbox server mbx2" not in out
        assert "not started here (for other hosts, --servers): mbx2" in out
        match = re.search(r"demo mailbox (\S+) \(in DB01\)\s+password (\S+)", out)
        assert match, out
        demo_user, demo_password = match.groups()
        # cas1: pop3, health, web; mbx1: pop3be, delivery, replication, health; and the
        # one worker (the suite's POPGUARD_WORKER_PROCESSES) of pop3, pop3be and delivery.
        assert len(processes_matching(f"popguard --data {host_a.resolve()} serve")) == 7 + 3

        # The second host: its configuration names the first one's directory. Before its
        # credentials are in, it has no CA and makes none.
        (host_b / "popguard.toml").write_text(config_b.read_text())
        no_tls = popguard(host_b, "export-server-credentials", "mbx2", "--out",
                          str(tmp_path / "x.json"))  # fmt: skip
        assert no_tls.returncode == 1 and "does not hold the organization's CA key" in no_tls.stderr
        bundle = tmp_path / "mbx2.credentials"
        unknown_server = popguard(host_a, "export-server-credentials", "mbx9", "--out", str(bundle))
        assert unknown_server.returncode == 1 and "no server named 'mbx9'" in unknown_server.stderr
        exported = popguard(host_a, "export-server-credentials", "mbx2", "--out", str(bundle))
        assert exported.returncode == 0, exported.stderr
        assert bundle.stat().st_mode & 0o777 == 0o600
        assert "BEGIN PRIVATE KEY" in bundle.read_text()
        ca_key = (host_a / "tls" / "ca.key").read_text()
        assert ca_key.split("-----")[2] not in bundle.read_text()  # the CA key stays home
        again = popguard(host_a, "export-server-credentials", "mbx2", "--out", str(bundle))
        assert again.returncode == 1 and "never written over a file" in again.stderr

        # Bad files: one line each, nothing installed.
        broken = tmp_path / "broken.credentials"
        broken.write_text("{not json")
        broken.chmod(0o600)
        refused = popguard(host_b, "import-server-credentials", str(broken))
        assert refused.returncode == 1 and "not a popguard credentials file" in refused.stderr
        stranger = json.loads(bundle.read_text())
        stranger["server"] = "mbx9"
        strange = tmp_path / "stranger.credentials"
        strange.write_text(json.dumps(stranger))
        strange.chmod(0o600)
        refused = popguard(host_b, "import-server-credentials", str(strange))
        assert refused.returncode == 1
        assert "server mbx9 is not in the directory" in refused.stderr, refused.stderr
        assert not (host_b / "tls").exists()

        imported = popguard(host_b, "import-server-credentials", str(bundle))
        assert imported.returncode == 0, imported.stderr
        assert (host_b / "tls" / "ca.pem").read_text() == (host_a / "tls" / "ca.pem").read_text()
        assert not (host_b / "tls" / "ca.key").exists()
        # A CA of another organization is refused once this host trusts one.
        other = _owner_only(tmp_path / "other")
        (other / "popguard.toml").write_text("")
        made = popguard(other, "new-server", "mbx2", "--role", "mailbox", "--address", mbx2)
        assert made.returncode == 0, made.stderr
        foreign = tmp_path / "foreign.credentials"
        assert popguard(other, "export-server-credentials", "mbx2", "--out",
                        str(foreign)).returncode == 0  # fmt: skip
        foreign_body = json.loads(foreign.read_text())
        foreign_body["organization"] = json.loads(bundle.read_text())["organization"]
        foreign.write_text(json.dumps(foreign_body))
        refused = popguard(host_b, "import-server-credentials", str(foreign))
        assert refused.returncode == 1 and "is not the one this host has" in refused.stderr

        started_b = popguard(host_b, "up", "--detach", "--servers", "mbx2")
        try:
            assert started_b.returncode == 0, started_b.stderr
            out_b = started_b.stdout
            assert f"mailbox server mbx2 on {mbx2}" in out_b and "front end cas1" not in out_b
            assert "kept by the host that runs mbx1" in out_b, out_b
            assert demo_password not in out_b
            # pop3be, delivery, replication, health, and the workers of pop3be and delivery.
            assert len(processes_matching(f"popguard --data {host_b.resolve()} serve")) == 4 + 2
            assert not (host_b / "servers" / "mbx1").exists()
            assert not (host_a / "servers" / "mbx2").exists()

            # mbx2 serves TLS that a client trusting only the organization's CA accepts.
            context = ssl.create_default_context(cafile=str(host_a / "tls" / "ca.pem"))
            client = poplib.POP3_SSL(mbx2, 1995, context=context, timeout=10)
            assert client.getwelcome().startswith(b"+OK")
            client.quit()

            # Mail for DB02 (active on host B's mbx2) through host A's front end.
            user = "ann@example.test"
            made = popguard(host_a, "new-mailbox", user, "--database", "DB02",
                            "--password-stdin", stdin="a long password\n")  # fmt: skip
            assert made.returncode == 0, made.stderr
            mail = tmp_path / "m.eml"
            mail.write_bytes(message("across hosts"))
            sent = popguard(host_a, "send-message", "--to", user, "--file", str(mail))
            assert sent.returncode == 0, sent.stderr
            client = poplib.POP3_SSL(cas, 10995, context=context, timeout=10)
            client.user(user)
            client.pass_("a long password")
            _, lines, _ = client.retr(1)
            assert b"Subject: across hosts" in lines
            client.quit()
            client = poplib.POP3_SSL(cas, 10995, context=context, timeout=10)
            client.user(demo_user)
            client.pass_(demo_password)
            assert client.stat()[0] >= 1
            client.quit()

            # Replication between the hosts, both ways.
            for identity in ("DB01\\mbx2", "DB02\\mbx1"):
                row = _wait_healthy(host_a, identity)
                assert row["Status"] == "Healthy", row
            # A command of one host asks the other's health service (the token came with
            # the credentials).
            health = _json(host_a, "get-serverhealth", "mbx2")
            assert health and all(r["Server"] == "mbx2" for r in health)
            # The health API speaks HTTPS: a command trusting another CA (a folder whose
            # directory also has an mbx2 at that address) gets no answer, nor the token.
            token = (host_a / "health" / "api-token").read_text()
            (other / "health").mkdir(mode=0o700, exist_ok=True)
            (other / "health" / "api-token").write_text(token)
            stranger_asks = popguard(other, "get-serverhealth", "mbx2")
            assert stranger_asks.returncode == 1
            assert "CERTIFICATE_VERIFY_FAILED" in stranger_asks.stderr, stranger_asks.stderr
            assert "\n" not in stranger_asks.stderr.strip()
            # Each host logs in with a health mailbox of its own: host B's start took
            # nothing from host A's probes.
            # (A health service makes its health mailboxes once it listens: the first
            # runs after a start may come before them.)
            for server in ("mbx1", "mbx2"):
                deadline = time.monotonic() + 60
                while True:
                    probes = _json(host_a, "invoke-monitoringprobe", DEEP_TEST, "--server", server)
                    succeeded = {p["ResultType"] for p in probes} == {"Succeeded"}
                    if (probes and succeeded) or time.monotonic() > deadline:
                        break
                    time.sleep(2)
                assert probes and {p["ResultType"] for p in probes} == {"Succeeded"}, probes

            # Each host's commands act on its own supervisor.
            services = _json(host_b, "get-service", "--server", "mbx2")
            assert {r["Name"] for r in services} == {"pop3be", "delivery", "replication", "health"}
            elsewhere = popguard(host_a, "get-service", "--server", "mbx2")
            assert elsewhere.returncode == 1
            assert (f"mbx2 runs on no supervisor of this host: the supervisord of "
                    f"{host_a.resolve()} runs cas1, mbx1") in elsewhere.stderr  # fmt: skip
            # mbx2's active copy of DB02 lives in host B's folder: host A does not start
            # an empty mbx2 of its own (its ports would be free once host B is down).
            restart = popguard(host_a, "restart-service", "pop3be", "--server", "mbx2")
            assert restart.returncode == 1
            assert "mbx2 runs on no supervisor of this host" in restart.stderr
            assert "holds the active copy of DB02 with no files in" in restart.stderr
            assert "\n" not in restart.stderr.strip()
            # cas1 holds no copy, but its ports are host A's.
            restart = popguard(host_b, "restart-service", "pop3", "--server", "cas1")
            assert restart.returncode == 1
            assert "cas1 runs on no supervisor of this host" in restart.stderr
            assert "cannot run here" in restart.stderr and "is in use by" in restart.stderr
            assert "\n" not in restart.stderr.strip()
            # A mailbox's messages are removed where its active copy's file is.
            refused = popguard(host_a, "remove-mailbox", user, "--no-confirm")
            assert refused.returncode == 1, refused.stdout
            assert "the active copy of DB02 is on mbx2, whose files are not in" in refused.stderr
            removed = popguard(host_b, "remove-mailbox", user, "--no-confirm")
            assert removed.returncode == 0, removed.stderr
            assert f"removed {user} and 1 messages" in removed.stdout
            assert not (host_a / "servers" / "mbx2").exists()
            again_up = popguard(host_b, "up", "--detach", "--servers", "mbx2")
            assert again_up.returncode == 1 and "already up" in again_up.stderr
        finally:
            down_b = popguard(host_b, "down")
        assert down_b.returncode == 0, down_b.stderr
        assert processes_matching(f"popguard --data {host_b.resolve()} serve") == []
        # The same 7 services and 3 workers.
        assert len(processes_matching(f"popguard --data {host_a.resolve()} serve")) == 7 + 3
    finally:
        down_a = popguard(host_a, "down")
    assert down_a.returncode == 0, down_a.stderr


def test_a_host_without_the_ca_key_makes_no_certificate(tmp_path: Path) -> None:
    """A joined host (its directory elsewhere) never makes a CA of its own, and one
    with the CA certificate alone never signs: one line naming the way out."""
    from popguard.errors import UserError
    from popguard.net.tls import TlsMaterial

    first = _owner_only(tmp_path / "first")
    material = TlsMaterial.of(first)
    material.replication_identity("mbx1", "127.0.0.1")
    joined = _owner_only(tmp_path / "joined")
    (joined / "popguard.toml").write_text(
        f'[directory]\npath = "{(first / "directory.sqlite").resolve()}"\n'
    )
    with pytest.raises(UserError, match="no organization CA certificate on this host"):
        TlsMaterial.of(joined).client_context()
    with pytest.raises(UserError, match="run `popguard import-server-credentials FILE`"):
        TlsMaterial.of(joined).replication_identity("mbx2", "127.0.0.2")
    (joined / "tls" / "ca.pem").write_bytes(material.ca_certificate_file.read_bytes())
    with pytest.raises(UserError) as error:
        TlsMaterial.of(joined).replication_identity("mbx2", "127.0.0.2")
    assert str(error.value).startswith(
        "no certificate for server mbx2 (replication) on this host"
    ), error.value
    assert "import-server-credentials" in str(error.value)
    assert sorted(os.listdir(joined / "tls")) == [".lock", "ca.pem"]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('[directory]\npath = "relative.sqlite"\n', "directory.path: an absolute path"),
        ("[directory]\npath = 3\n", "directory.path: Input is not a valid path"),
        ('directory = "x"\n', "directory: a table ([directory])"),
    ],
)
def test_a_bad_directory_section_is_one_line(tmp_path: Path, section: str, message: str) -> None:
    data = _owner_only(tmp_path / "data")
    (data / "popguard.toml").write_text(section)
    done = popguard(data, "get-server")
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert "\n" not in done.stderr.strip() and "Traceback" not in done.stderr


def test_a_missing_shared_directory_is_refused_before_anything_starts(tmp_path: Path) -> None:
    cas, mbx1, mbx2 = _addresses()
    data = _owner_only(tmp_path / "data")
    config = tmp_path / "b.toml"
    config.write_text(_topology(cas, mbx1, mbx2, tmp_path / "nowhere" / "directory.sqlite"))
    done = popguard(data, "up", "--detach", "--config", str(config), "--servers", "mbx2")
    assert done.returncode == 1 and "does not exist: a host joins an organization" in done.stderr
    assert not (data / "popguard.toml").exists() and not (tmp_path / "nowhere").exists()


@pytest.mark.timeout(300)
def test_a_server_added_later_starts_where_it_lives(tmp_path: Path) -> None:
    cas, mbx1, mbx2 = _addresses()
    mbx3 = free_loopback_address()
    data = _owner_only(tmp_path / "data")
    config = tmp_path / "org.toml"
    config.write_text(_topology(cas, mbx1, mbx2))
    started = popguard(data, "up", "--detach", "--config", str(config))
    try:
        assert started.returncode == 0, started.stderr
        made = popguard(data, "new-server", "mbx3", "--role", "mailbox", "--address", mbx3)
        assert made.returncode == 0, made.stderr
        added = popguard(data, "add-mailboxdatabasecopy", "DB01", "--server", "mbx3")
        assert added.returncode == 0, added.stderr
        not_yet = popguard(data, "get-service", "--server", "mbx3")
        assert not_yet.returncode == 1 and "mbx3 runs on no supervisor" in not_yet.stderr
        start = popguard(data, "start-service", "replication", "--server", "mbx3",
                         "--format", "json")  # fmt: skip
        assert start.returncode == 0, start.stderr
        assert "added mbx3 (pop3be, delivery, replication, health)" in start.stderr
        assert json.loads(start.stdout)[0]["Status"] == "Running"
        row = _wait_healthy(data, "DB01\\mbx3")
        assert row["Status"] == "Healthy", row
        services = _json(data, "get-service", "--server", "mbx3")
        assert {r["Status"] for r in services} == {"Running"}, services
        # supervisord's own file has it now: a restart of the host keeps it.
        assert "[group:mbx3]" in (data / "supervisor" / "supervisord.conf").read_text()
        # `up --servers` adds to a host already up, too.
        mbx4 = free_loopback_address()
        made = popguard(data, "new-server", "mbx4", "--role", "mailbox", "--address", mbx4)
        assert made.returncode == 0, made.stderr
        grown = popguard(data, "up", "--detach", "--servers", "mbx4")
        assert grown.returncode == 0, grown.stderr
        assert "popguard added mbx4 to this host" in grown.stdout
        assert f"mailbox server mbx4 on {mbx4}" in grown.stdout
        assert "mailbox server mbx1" not in grown.stdout
        assert {r["Status"] for r in _json(data, "get-service", "--server", "mbx4")} == {"Running"}
        again = popguard(data, "up", "--detach", "--servers", "mbx4,MBX3")
        assert again.returncode == 1 and "already up" in again.stderr
    finally:
        down = popguard(data, "down")
    assert down.returncode == 0, down.stderr
    assert processes_matching(f"popguard --data {data.resolve()} serve") == []
