"""The runbook (../shared/seed), step by step, in popguard's syntax, against the
organization `popguard up` starts: each command does what the runbook expects."""

from __future__ import annotations

import time
from pathlib import Path

from popguard.testing.organization import popguard

from .conftest import json_of, wait_for


def active_on(data: Path, database: str) -> str:
    rows = json_of(data, "get-mailboxdatabasecopystatus")
    return next(str(r["ActiveDatabaseCopy"]) for r in rows if r["Name"].startswith(database))


def test_every_step_of_the_runbook(detached_organization: Path) -> None:
    data = detached_organization
    # Get-ServerHealth <server> | ?{$_.HealthSetName -like "POP*"}
    wait_for(
        "every POP monitor of mbx1 to have a result",
        lambda: all(r["AlertValue"] == "Healthy" for r in json_of(
            data, "get-serverhealth", "mbx1", "--health-set-like", "POP*")),
        120,
    )  # fmt: skip
    sets = {r["HealthSetName"] for r in json_of(data, "get-serverhealth", "cas1",
                                                 "--health-set-like", "POP*")}  # fmt: skip
    assert sets == {"POP", "POP.Proxy"}
    # Invoke-MonitoringProbe POP\PopCTPProbe -Server <cas> | Format-List
    probe = popguard(data, "invoke-monitoringprobe", "POP\\PopCTPProbe", "--server", "cas1",
                     "--format", "list")  # fmt: skip
    assert probe.returncode == 0 and "ResultType" in probe.stdout and "Succeeded" in probe.stdout
    assert "Failed" not in probe.stdout, probe.stdout

    # Set-PopSettings -Server <cas> -ProtocolLoggingEnabled $true; Get-PopSettings shows
    # where the log is; a session through the front end lands in it.
    on = popguard(data, "set-popsettings", "--server", "cas1", "--protocol-logging-enabled",
                  "$true")  # fmt: skip
    assert on.returncode == 0, on.stderr
    (settings,) = json_of(data, "get-popsettings", "--server", "cas1")
    assert settings["ProtocolLogEnabled"] is True
    # The effective folder, the default one here: shown, never empty.
    assert settings["LogFileLocation"] == str((data / "servers/cas1/logs/pop3").resolve())
    folder = Path(settings["LogFileLocation"])
    time.sleep(2)  # the services read their settings every second
    logged = popguard(data, "invoke-monitoringprobe", "POP\\PopCTPProbe", "--server", "cas1")
    assert logged.returncode == 0, logged.stderr
    wait_for("a protocol log line", lambda: any(
        "USER" in p.read_text() for p in folder.glob("*.LOG")), 30)  # fmt: skip
    off = popguard(data, "set-popsettings", "--server", "cas1", "--protocol-logging-enabled",
                   "$false")  # fmt: skip
    assert off.returncode == 0, off.stderr

    # Set-MailboxServer <mbx> -DatabaseCopyActivationDisabledAndMoveNow $true
    assert active_on(data, "DB01") == "mbx1"
    away = popguard(data, "set-mailboxserver", "mbx1",
                    "--database-copy-activation-disabled-and-move-now", "$true")  # fmt: skip
    assert away.returncode == 0, away.stderr
    assert active_on(data, "DB01") == "mbx2"
    # Get-MailboxDatabaseCopyStatus -Server <mbx> | group status: nothing Mounted there
    grouped = json_of(data, "get-mailboxdatabasecopystatus", "--server", "mbx1",
                      "--group-by", "status")  # fmt: skip
    assert "Mounted" not in {row["Name"] for row in grouped}, grouped
    # Restart the server, now that it holds no active copy.
    restarted = popguard(data, "restart-server", "mbx1")
    assert restarted.returncode == 0, restarted.stderr
    assert all(s["Status"] == "Running" for s in json_of(data, "get-service", "--server", "mbx1"))
    # Re-run the probe after the restart: no database is active on mbx1, so the deep test
    # says why it has nothing to probe and what answers "is mbx1 fit to take them back?".
    wait_for("mbx1's health service", lambda: popguard(
        data, "get-serverhealth", "mbx1").returncode == 0, 60)  # fmt: skip
    deep = popguard(data, "invoke-monitoringprobe", "POP.Protocol\\PopDeepTestProbe",
                    "--server", "mbx1")  # fmt: skip
    assert deep.returncode == 1 and "nothing to probe" in deep.stderr, deep.stderr
    assert "DB01, DB02 have passive copies here" in deep.stderr, deep.stderr
    assert "PopSelfTestProbe' --server mbx1" in deep.stderr, deep.stderr
    # Set-MailboxServer <mbx> -DatabaseCopyActivationDisabledAndMoveNow $false
    back = wait_for("the move back", lambda: popguard(
        data, "set-mailboxserver", "mbx1", "--database-copy-activation-disabled-and-move-now",
        "$false").returncode == 0, 90)  # fmt: skip
    assert back >= 0 and active_on(data, "DB01") == "mbx1"

    # Test-PopConnectivity -ClientAccessServer <cas>: every scenario succeeds.
    rows = json_of(data, "test-popconnectivity", "--client-access-server", "cas1",
                   "--trust-any-ssl-certificate")  # fmt: skip
    assert rows and all(r["Result"] == "Success" for r in rows), rows
