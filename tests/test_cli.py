"""The `popguard` command as a user types it: output formats and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from popguard.testing.net import free_loopback_address
from popguard.testing.organization import popguard


@pytest.fixture
def organization(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    address = free_loopback_address()
    assert (
        popguard(data, "new-server", "mbx1", "--role", "mailbox", "--address", address).returncode
        == 0
    )
    assert popguard(data, "new-mailboxdatabase", "DB01", "--server", "mbx1").returncode == 0
    return data


def test_get_server_json_has_exchange_keys(organization: Path) -> None:
    result = popguard(organization, "get-server", "--format", "json")
    assert result.returncode == 0, result.stderr
    (server,) = json.loads(result.stdout)
    assert set(server) == {"Name", "Roles", "Address", "Ports"}
    assert server["Roles"] == ["mailbox"]
    assert server["Ports"] == {
        "pop3be": 1110,
        "pop3be-tls": 1995,
        "lmtp": 2424,
        "lmtp-peer": 2425,
        "replication": 64327,
        "health": 8480,
    }


def test_mailbox_lifecycle(organization: Path) -> None:
    created = popguard(organization, "new-mailbox", "Zoe@Example.test", "--database", "DB01",
                       "--format", "json")  # fmt: skip
    assert created.returncode == 0, created.stderr
    (row,) = json.loads(created.stdout)
    assert row["PrimarySmtpAddress"] == "zoe@example.test"
    assert len(row["Password"]) >= 16  # generated, shown once
    listed = json.loads(popguard(organization, "get-mailbox", "--format", "json").stdout)
    assert [m["PrimarySmtpAddress"] for m in listed] == ["zoe@example.test"]
    assert "Password" not in listed[0]
    changed = popguard(organization, "set-mailbox", "zoe@example.test", "--password-stdin",
                       stdin="new secret\n")  # fmt: skip
    assert changed.returncode == 0, changed.stderr
    directory_bytes = (organization / "directory.sqlite").read_bytes()
    assert b"new secret" not in directory_bytes and row["Password"].encode() not in directory_bytes
    removed = popguard(organization, "remove-mailbox", "zoe@example.test")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(popguard(organization, "get-mailbox", "--format", "json").stdout) == []


def test_list_format(organization: Path) -> None:
    result = popguard(organization, "get-popsettings", "--server", "mbx1")
    assert result.returncode == 0
    assert "LoginType                         : SecureLogin" in result.stdout
    assert "MaxCommandSize                    : 512" in result.stdout


def test_set_popsettings_with_the_runbook_spelling(organization: Path) -> None:
    result = popguard(
        organization, "set-popsettings", "--server", "mbx1",
        "--protocol-logging-enabled", "$true", "--authenticated-connection-timeout", "00:15:00",
        "--log-per-file-size-quota", "5MB", "--format", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (settings,) = json.loads(result.stdout)
    assert settings["ProtocolLogEnabled"] is True
    assert settings["AuthenticatedConnectionTimeout"] == 900
    assert settings["LogPerFileSizeQuota"] == 5 * 1024 * 1024
    assert "apply it within seconds" in result.stderr


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (("new-mailbox", "a@b.test", "--database", "NOPE"), None, "no database named 'NOPE'"),
        (("new-mailbox", "not-an-address", "--database", "DB01"), None, "not a valid mailbox"),
        (("new-mailbox", "a@b.test", "--database", "DB01", "--password-stdin"), "", "no password"),
        (("get-server", "mbx9"), None, "no server named 'mbx9'"),
        (
            ("new-server", "mbx1", "--role", "mailbox", "--address", "127.0.0.9"),
            None,
            "server mbx1 already exists",
        ),
        (("new-server", "x", "--role", "mailbox", "--address", "nowhere"), None, "not an IP"),
        (
            ("set-popsettings", "--server", "mbx1", "--login-type", "Telnet"),
            None,
            "invalid LoginType",
        ),
        (
            ("set-popsettings", "--server", "mbx1", "--max-command-size", "5"),
            None,
            "invalid MaxCommandSize",
        ),
        (("set-popsettings", "--server", "mbx1"), None, "nothing to change"),
        (
            ("set-popsettings", "--server", "mbx1", "--protocol-log-enabled", "maybe"),
            None,
            "invalid ProtocolLogEnabled",
        ),
        (("get-popsettings",), None, "Missing option '--server'"),
        (
            ("set-popsettings", "--server", "mbx1", "--x509-certificate-name", "../x"),
            None,
            "invalid X509CertificateName",
        ),
        (
            ("set-popsettings", "--server", "mbx1", "--x509-certificate-name", "é"),
            None,
            "invalid X509CertificateName",
        ),
        (
            ("new-server", "x", "--role", "mailbox", "--address", "127.0.0.9", "--port", "lmtp=²"),
            None,
            "--port wants ENDPOINT=NUMBER",
        ),
        (("no-such-command",), None, "No such command"),
        (
            ("send-message", "--to", "ghost@example.test", "--file", "/nonexistent"),
            None,
            "cannot read /nonexistent",
        ),
        (("remove-mailbox", "ghost@example.test"), None, "no mailbox 'ghost@example.test'"),
        (
            ("get-mailboxdatabasecopystatus", "--identity", "DB01"),
            None,
            "a copy is named DATABASE\\SERVER",
        ),
        (("get-mailboxdatabasecopystatus", "--identity", "DB01\\mbx9"), None, "no copy DB01"),
        (("get-mailboxdatabasecopystatus", "--server", "mbx9"), None, "no server named 'mbx9'"),
        (
            ("move-activemailboxdatabase", "DB01", "--activate-on-server", "mbx9"),
            None,
            "has no copy on mbx9",
        ),
        (
            ("move-activemailboxdatabase", "DB99", "--activate-on-server", "mbx1"),
            None,
            "no database named 'DB99'",
        ),
        (
            (
                "set-mailboxserver",
                "mbx1",
                "--database-copy-activation-disabled-and-move-now",
                "yes",
            ),
            None,
            "expected true or false",
        ),
        (("set-mailboxserver", "mbx1"), None, "nothing to set"),
        (
            ("set-mailboxserver", "mbx1", "--database-copy-auto-activation-policy", "Sometimes"),
            None,
            "Invalid value",
        ),
        (("add-mailboxdatabasecopy", "DB01", "--server", "mbx1"), None, "already has a copy"),
        (("add-mailboxdatabasecopy", "DB01", "--server", "mbx9"), None, "no server named"),
        (("remove-mailboxdatabasecopy", "DB01\\mbx1"), None, "is the active copy"),
        (("remove-mailboxdatabasecopy", "DB01"), None, "a copy is named DATABASE"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    organization: Path, args: tuple[str, ...], stdin: str | None, message: str
) -> None:
    # The duplicate-address case needs the mailbox to exist first.
    popguard(organization, "new-mailbox", "a@b.test", "--database", "DB01")
    result = popguard(organization, *args, stdin=stdin)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_duplicate_mailbox(organization: Path) -> None:
    assert popguard(organization, "new-mailbox", "dup@b.test", "--database", "DB01").returncode == 0
    again = popguard(organization, "new-mailbox", "dup@b.test", "--database", "DB01")
    assert again.returncode == 1
    assert again.stderr.strip() == "popguard: mailbox dup@b.test already exists"


def test_data_folder_from_environment(tmp_path: Path) -> None:
    env_data = tmp_path / "from-env"
    result = subprocess.run(
        [sys.executable, "-m", "popguard", "new-server", "mbx1", "--role", "mailbox",
         "--address", "127.0.0.5"],
        capture_output=True, text=True, timeout=60,
        env={"POPGUARD_DATA": str(env_data), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (env_data / "directory.sqlite").exists()


def test_serve_on_a_port_in_use_says_so_in_one_line(organization: Path) -> None:
    import socket

    (server,) = json.loads(popguard(organization, "get-server", "--format", "json").stdout)
    with socket.socket() as squatter:
        squatter.bind((server["Address"], server["Ports"]["pop3be"]))
        squatter.listen()
        result = popguard(organization, "serve", "pop3be", "--server", "mbx1")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("popguard: cannot listen for pop3be on")
    assert "Traceback" not in result.stderr


def test_serve_an_unknown_server(organization: Path) -> None:
    result = popguard(organization, "serve", "delivery", "--server", "mbx7")
    assert result.returncode == 1
    assert result.stderr.strip() == "popguard: no server named 'mbx7'"


def test_the_health_api_on_an_address_this_machine_lacks_is_one_line(organization: Path) -> None:
    # Any address: the API speaks HTTPS, so it may face a network (other hosts' commands).
    added = popguard(organization, "new-server", "far", "--role", "mailbox",
                     "--address", "192.0.2.10")  # fmt: skip
    assert added.returncode == 0, added.stderr
    refused = popguard(organization, "serve", "health", "--server", "far")
    assert refused.returncode == 1
    assert "192.0.2.10" in refused.stderr and "loopback" not in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
