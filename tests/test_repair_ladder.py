"""The runbook's whole ladder, taken by the engine on its own under `popguard up`: a
fault that a restart cannot fix (mbx1's back end refuses every login) makes the
engine restart pop3be, move mbx1's databases to mbx2 (clients keep reading their
mail through cas1), restart mbx1, move the databases back, and at last send an
alert, by e-mail to a real SMTP server and to an Alertmanager-style webhook, that
holds the whole history. Clearing the fault resolves the alert."""

from __future__ import annotations

import poplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from popguard.net import tls
from popguard.testing.net import free_loopback_address
from popguard.testing.organization import popguard

from .conftest import AlertSinks, json_of, wait_for


@pytest.fixture
def organization(tmp_path: Path, alert_sinks: AlertSinks) -> Iterator[Path]:
    host, port, url = alert_sinks.host, alert_sinks.smtp_port, alert_sinks.webhook_url
    data = tmp_path / "data"
    data.mkdir()
    (data / "popguard.toml").write_text(
        f"""
[faults]
enabled = true

[escalation]
repeat_interval = 3600

[escalation.email]
smtp_host = "{host}"
smtp_port = {port}
from = "popguard@monitoring.test"
to = ["oncall@example.test"]

[escalation.webhook]
url = "{url}"
"""
    )
    addresses = [free_loopback_address() for _ in range(3)]
    started = popguard(data, "up", "--detach", "--frontend-address", addresses[0], "--address",
                       addresses[1], "--second-address", addresses[2])  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr
        yield data
    finally:
        popguard(data, "down")


def deep_test(data: Path) -> str:
    rows = json_of(data, "get-serverhealth", "mbx1", "--health-set", "POP.Protocol")
    found = [r["AlertValue"] for r in rows if r["Name"] == "PopDeepTestMonitor"]
    return str(found[0]) if found else ""


def active_server(data: Path, database: str) -> str:
    rows = json_of(data, "get-mailboxdatabasecopystatus")
    return next(str(r["ActiveDatabaseCopy"]) for r in rows if r["Name"].startswith(database))


def read_demo_mailbox(data: Path) -> bool:
    """Log in to the demo mailbox (in DB01) through cas1 and read message 1."""
    address, password = (data / "demo-mailbox.txt").read_text().split()
    cas1 = json_of(data, "get-server", "cas1")[0]
    context = tls.TlsMaterial.of(data).client_context()
    try:
        client = poplib.POP3_SSL(
            cas1["Address"], int(cas1["Ports"]["pop3-tls"]), context=context, timeout=10
        )
        try:
            client.user(address)
            client.pass_(password)
            client.retr(1)
        finally:
            client.quit()
    except (OSError, poplib.error_proto):
        return False
    return True


@pytest.mark.timeout(720)
def test_a_fault_a_restart_cannot_fix_runs_the_whole_ladder(
    organization: Path, alert_sinks: AlertSinks
) -> None:
    data, found = organization, alert_sinks
    wait_for("DB01's deep test on mbx1", lambda: deep_test(data) == "Healthy", 180)
    assert active_server(data, "DB01") == "mbx1"
    assert read_demo_mailbox(data)
    refused = popguard(data, "inject-fault", "--server", "mbx1", "--service", "pop3be",
                       "--kind", "refuse-auth")  # fmt: skip
    assert refused.returncode == 0, refused.stderr
    injected = time.monotonic()

    # While DB01 is on mbx2, the demo mailbox is read through cas1 as before.
    wait_for("DB01 to move to mbx2", lambda: active_server(data, "DB01") == "mbx2", 180)
    assert read_demo_mailbox(data)
    wait_for("the alert e-mail", lambda: bool(found.mails), 420)
    took = time.monotonic() - injected
    print(f"alert e-mail {took:.0f}s after the fault")  # for the log

    actions = json_of(data, "get-recoveryactions", "--server", "mbx1")
    steps = [
        (a["ActionId"], a["Result"]) for a in actions if a["Result"] in ("Succeeded", "Failed")
    ]
    ladder = [
        ("restart-service", "Succeeded"),
        ("move-databases-away", "Succeeded"),
        ("restart-server", "Succeeded"),
        # mbx1 looked healthy (every service up, its self test fine): DB01 went back,
        # failed its deep test there at once, and went to mbx2 again to wait.
        ("move-back", "Failed"),
        ("escalate", "Succeeded"),
    ]
    assert [s for s in steps if s in ladder] == ladder, actions
    back = next(a for a in actions if a["ActionId"] == "move-back")
    assert "sent away again (DB01 -> mbx2)" in back["Context"], back
    assert active_server(data, "DB01") == "mbx2"
    assert read_demo_mailbox(data)  # mail is still served through cas1
    for service in json_of(data, "get-service", "--server", "mbx1"):
        assert service["Status"] == "Running", service

    (mail,) = found.mails
    assert mail["Subject"] == "[popguard ALERT] mbx1 PopDeepTestMonitor on DB01: POP3"
    payload = mail.get_payload(decode=True)
    assert isinstance(payload, bytes)
    body = payload.decode()
    for kind, result in ladder[:-1]:
        assert f"[{kind}] on DB01: {result}" in body, body
    assert "Failure component: POP3" in body and "SYS/TEMP" in body
    assert "What is left to a person" in body and "restart-server" in body
    (hook,) = [h for h in found.hooks if h["status"] == "firing"]
    assert hook["version"] == "4" and hook["alerts"][0]["labels"]["server"] == "mbx1"
    assert "move-databases-away" in hook["alerts"][0]["annotations"]["recovery_actions"]
    alerts = json_of(data, "get-alerts", "--server", "mbx1")
    assert len(alerts) == 1 and "e-mail to oncall@example.test sent" in alerts[0]["Notification"]

    # A person mends mbx1 and takes the runbook's last step: DB01 comes back, its
    # monitor is Healthy, and the alert is resolved, once, on both channels.
    cleared = popguard(data, "clear-fault", "--server", "mbx1", "--service", "pop3be")
    assert cleared.returncode == 0, cleared.stderr
    moved = popguard(data, "set-mailboxserver", "mbx1",
                     "--database-copy-activation-disabled-and-move-now", "$false")  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    assert active_server(data, "DB01") == "mbx1"
    wait_for("the resolved e-mail", lambda: len(found.mails) == 2, 120)
    assert found.mails[1]["Subject"].startswith("[popguard RESOLVED]")
    wait_for("the resolved webhook", lambda: len(found.hooks) == 2, 30)  # sent after the mail
    assert [h["status"] for h in found.hooks] == ["firing", "resolved"]
