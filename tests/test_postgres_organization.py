"""A whole organization on a PostgreSQL directory: `popguard up` with [directory] url."""

from __future__ import annotations

import json
import poplib
import re
import ssl
import time
from pathlib import Path

import pytest

from popguard.testing.net import free_loopback_address
from popguard.testing.organization import popguard, three_server_topology
from popguard.testing.postgres import PostgresServer

from .conftest import processes_matching


def topology(addresses: list[str], directory_section: str) -> str:
    cas1, mbx1, mbx2 = addresses
    return three_server_topology(cas1, mbx1, mbx2, directory_section)


def read_all(address: str, ca: Path, user: str, password: str) -> list[bytes]:
    context = ssl.create_default_context(cafile=str(ca))
    client = poplib.POP3_SSL(address, 10995, context=context, timeout=15)
    try:
        client.user(user)
        client.pass_(password)
        count, _ = client.stat()
        return [b"\r\n".join(client.retr(n + 1)[1]) for n in range(count)]
    finally:
        client.quit()


def wait_healthy(data: Path, identity: str) -> dict[str, object]:
    deadline = time.monotonic() + 60
    row: dict[str, object] = {}
    while time.monotonic() < deadline:
        shown = popguard(data, "get-mailboxdatabasecopystatus", "--identity", identity,
                         "--format", "json")  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        row = json.loads(shown.stdout)[0]
        if row["Status"] == "Healthy" and row["CopyQueueLength"] == 0:
            return row
        time.sleep(0.5)
    raise AssertionError(f"{identity} never became Healthy: {row}")


@pytest.mark.timeout(300)
def test_an_organization_on_postgresql_serves_moves_and_delivers(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    addresses = [free_loopback_address() for _ in range(3)]
    cas1 = addresses[0]
    url = postgres.new_database()
    config = tmp_path / "organization.toml"
    config.write_text(topology(addresses, postgres.directory_section(url)))
    data = tmp_path / "data"
    started = popguard(data, "up", "--detach", "--config", str(config))
    try:
        assert started.returncode == 0, started.stderr
        assert not (data / "directory.sqlite").exists()  # the directory is PostgreSQL's
        match = re.search(r"demo mailbox (\S+) \(in DB01\)\s+password (\S+)", started.stdout)
        assert match, started.stdout
        user, password = match.groups()
        ca = data / "tls" / "ca.pem"
        (welcome,) = read_all(cas1, ca, user, password)
        assert b"Subject: Welcome to popguard" in welcome
        wait_healthy(data, "DB01\\mbx2")

        moved = popguard(data, "move-activemailboxdatabase", "DB01", "--activate-on-server",
                         "mbx2", "--format", "json")  # fmt: skip
        assert moved.returncode == 0, moved.stderr
        organization = popguard(data, "get-mailboxdatabase", "--format", "json")
        assert organization.returncode == 0, organization.stderr
        message = tmp_path / "message.eml"
        message.write_bytes(b"Subject: after the move\r\n\r\nDB01 now lives on mbx2.\r\n")
        sent = popguard(data, "send-message", "--to", user, "--file", str(message))
        assert sent.returncode == 0, sent.stderr
        # The front end follows the move (the directory's NOTIFY reached it).
        messages = read_all(cas1, ca, user, password)
        assert len(messages) == 2 and b"Subject: after the move" in messages[1]
        health = popguard(data, "get-serverhealth", "mbx1", "--format", "json")
        assert health.returncode == 0, health.stderr
    finally:
        down = popguard(data, "down")
    assert down.returncode == 0, down.stderr
    assert processes_matching(f"popguard --data {data} serve") == []


def lmtp_replies(address: str, recipients: list[str]) -> list[tuple[int, bytes]]:
    """One LMTP transaction straight to a delivery service; each recipient's code
    (RCPT's when it refused, else DATA's)."""
    import smtplib

    with smtplib.LMTP(address, 2424, timeout=15) as client:
        client.ehlo("test.example")
        client.mail("sender@example.test")
        replies: dict[str, tuple[int, bytes]] = {}
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            if code != 250:
                replies[recipient] = (code, text)
        accepted = [r for r in recipients if r not in replies]
        if accepted:
            code, text = client.data(b"Subject: in the outage\r\n\r\nstill here\r\n")
            for recipient in accepted:
                replies[recipient] = (code, text)
        return [replies[r] for r in recipients]


@pytest.mark.timeout(400)
def test_services_ride_out_a_directory_outage_and_resume_by_themselves(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    addresses = [free_loopback_address() for _ in range(3)]
    cas1, mbx1, _ = addresses
    url = postgres.new_database()
    config = tmp_path / "organization.toml"
    config.write_text(topology(addresses, postgres.directory_section(url)))
    data = tmp_path / "data"
    started = popguard(data, "up", "--detach", "--config", str(config))
    try:
        assert started.returncode == 0, started.stderr
        match = re.search(r"demo mailbox (\S+) \(in DB01\)\s+password (\S+)", started.stdout)
        assert match, started.stdout
        user, password = match.groups()
        ca = data / "tls" / "ca.pem"
        assert len(read_all(cas1, ca, user, password)) == 1
        services = processes_matching(f"popguard --data {data} serve")

        postgres.pg_ctl("stop")
        try:
            outage_ends = time.monotonic() + 45
            # A login this organization has seen before keeps working.
            assert len(read_all(cas1, ca, user, password)) == 1
            # Mail for a known mailbox is taken; for one never seen, 451, never 550.
            known, stranger = lmtp_replies(mbx1, [user, "stranger@popguard.test"])
            assert known[0] == 250, known
            assert stranger[0] == 451 and stranger[1].startswith(b"4.4.3"), stranger
            refused = popguard(data, "get-server")
            assert refused.returncode == 1
            assert "directory unreachable" in refused.stderr
            assert refused.stderr.count("\n") == 1, refused.stderr
            while time.monotonic() < outage_ends:
                time.sleep(5)
                assert len(read_all(cas1, ca, user, password)) == 2
        finally:
            postgres.pg_ctl("start")

        # Back by itself: a mailbox made now is served within seconds.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            made = popguard(data, "new-mailbox", "late@popguard.test", "--password-stdin",
                            stdin="a password long enough\n")  # fmt: skip
            if made.returncode == 0:
                break
            time.sleep(1)
        assert made.returncode == 0, made.stderr
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                read_all(cas1, ca, "late@popguard.test", "a password long enough")
                break
            except poplib.error_proto:
                time.sleep(1)
        assert read_all(cas1, ca, "late@popguard.test", "a password long enough") == []
        # Nothing restarted: the same processes serve as before the outage.
        assert processes_matching(f"popguard --data {data} serve") == services
    finally:
        down = popguard(data, "down")
    assert down.returncode == 0, down.stderr
