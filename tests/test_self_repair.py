"""The engine repairs by itself: a hung back end under `popguard up` is found,
restarted, and the recovery actions say so."""

from __future__ import annotations

import poplib
import time
from pathlib import Path

import pytest

from popguard import paths
from popguard.control.exit_listener import read_exits
from popguard.net import tls
from popguard.testing.organization import popguard

from .conftest import json_of, pid_alive, wait_for


def self_test(data: Path) -> str:
    rows = json_of(data, "get-serverhealth", "mbx1", "--health-set", "POP.Protocol")
    return str(next(r["AlertValue"] for r in rows if r["Name"] == "PopSelfTestMonitor"))


# A whole organization and several probe rounds: well over a minute on 2 cores.
@pytest.mark.timeout(300)
def test_a_hung_back_end_is_found_and_restarted_by_the_engine(detached_organization: Path) -> None:
    data = detached_organization
    wait_for("mbx1's self test to be Healthy", lambda: self_test(data) == "Healthy")
    (before,) = [
        r for r in json_of(data, "get-service", "--server", "mbx1") if r["Name"] == "pop3be"
    ]
    hung = popguard(
        data, "inject-fault", "--server", "mbx1", "--service", "pop3be", "--kind", "hang"
    )
    assert hung.returncode == 0, hung.stderr

    def restarted() -> bool:
        actions = json_of(data, "get-recoveryactions", "--server", "mbx1")
        return any(a["ActionId"] == "restart-service" and a["Result"] == "Succeeded"
                   for a in actions)  # fmt: skip

    detected = wait_for("the self test to go Unhealthy", lambda: self_test(data) == "Unhealthy")
    repaired = wait_for("a restart by the engine", restarted)
    wait_for("the self test to be Healthy again", lambda: self_test(data) == "Healthy")
    print(f"detected after {detected:.0f}s, restarted {repaired:.0f}s later")  # for the log

    (after,) = [
        r for r in json_of(data, "get-service", "--server", "mbx1") if r["Name"] == "pop3be"
    ]
    assert after["Status"] == "Running" and after["ProcessId"] != before["ProcessId"]
    assert not pid_alive(int(before["ProcessId"]))
    actions = json_of(data, "get-recoveryactions", "--server", "mbx1")
    done = [a for a in actions if a["Result"] == "Succeeded"]
    assert done and "pop3be" in done[0]["Context"] and "pid" in done[0]["Context"]
    # The other monitor saw the same outage: its restart was throttled, not repeated.
    assert all(a["Result"] in ("Succeeded", "Throttled", "Skipped") for a in actions), actions
    assert len([a for a in actions if a["Result"] == "Succeeded"]) == 1, actions
    # The fault commands are refused when the configuration does not enable them.
    (data / "popguard.toml").write_text("[faults]\nenabled = false\n")
    refused = popguard(data, "inject-fault", "--server", "mbx1", "--service", "pop3be",
                       "--kind", "crash")  # fmt: skip
    assert refused.returncode == 1 and "fault injection is off" in refused.stderr


def test_mail_is_served_and_delivered_with_every_health_service_stopped(
    detached_organization: Path,
) -> None:
    """Managed availability watches the mail service; it is never in its path."""
    data = detached_organization
    for server in ("cas1", "mbx1", "mbx2"):
        stopped = popguard(data, "stop-service", "health", "--server", server)
        assert stopped.returncode == 0, stopped.stderr
    for server in ("cas1", "mbx1", "mbx2"):
        (health,) = [
            r for r in json_of(data, "get-service", "--server", server) if r["Name"] == "health"
        ]
        assert health["Status"] != "Running"
    address, password = (data / "demo-mailbox.txt").read_text().split()
    message = data / "message.eml"
    message.write_bytes(b"Subject: while health sleeps\r\n\r\nstill delivered\r\n")
    sent = popguard(data, "send-message", "--to", address, "--file", str(message))
    assert sent.returncode == 0, sent.stderr
    cas1 = json_of(data, "get-server", "cas1")[0]
    context = tls.TlsMaterial.of(data).client_context()
    client = poplib.POP3_SSL(cas1["Address"], int(cas1["Ports"]["pop3-tls"]),
                             context=context, timeout=10)  # fmt: skip
    try:
        client.user(address)
        client.pass_(password)
        count, _ = client.stat()
        assert count >= 2  # the welcome message and this one
        _, lines, _ = client.retr(count)
        assert b"still delivered" in lines
    finally:
        client.quit()


# A whole organization and several probe rounds: well over a minute on 2 cores.
@pytest.mark.timeout(300)
def test_a_crash_loop_the_supervisor_hides_is_escalated(detached_organization: Path) -> None:
    """supervisord starts a killed back end again within seconds, so no probe sees it
    down; three starts in ten minutes are a crash loop all the same."""
    data = detached_organization

    def restarts() -> str:
        rows = json_of(data, "get-serverhealth", "mbx1", "--health-set", "POP.Protocol")
        found = [r for r in rows if r["Name"] == "PopProcessRestartsMonitor"
                 and r["TargetResource"] == "pop3be"]  # fmt: skip
        return str(found[0]["AlertValue"]) if found else ""

    wait_for("the process monitor's first readings", lambda: restarts() == "Healthy", 60)
    for _ in range(3):
        (before,) = [s for s in json_of(data, "get-service", "--server", "mbx1")
                     if s["Name"] == "pop3be"]  # fmt: skip
        crashed = popguard(data, "inject-fault", "--server", "mbx1", "--service", "pop3be",
                           "--kind", "crash")  # fmt: skip
        assert crashed.returncode == 0, crashed.stderr

        def started_again(old: object = before["ProcessId"]) -> bool:
            (now,) = [s for s in json_of(data, "get-service", "--server", "mbx1")
                      if s["Name"] == "pop3be"]  # fmt: skip
            return bool(now["Status"] == "Running" and now["ProcessId"] != old)

        wait_for("supervisord to start pop3be again", started_again, 30)
        time.sleep(6)  # one probe reading of the new process
    wait_for("the crash loop to be seen", lambda: restarts() not in ("Healthy", ""), 60)

    def escalated() -> bool:
        alerts = json_of(data, "get-alerts", "--server", "mbx1")
        return any(a["MonitorName"] == "PopProcessRestartsMonitor" for a in alerts)

    wait_for("the escalation", escalated, 120)
    actions = json_of(data, "get-recoveryactions", "--server", "mbx1")
    # No restart was tried: a restart does not mend a crash loop.
    assert not [a for a in actions if a["ActionId"] == "restart-service"], actions


# A whole organization and several probe rounds: well over a minute on 2 cores.
@pytest.mark.timeout(300)
def test_restarts_an_operator_asks_for_are_not_crashes(detached_organization: Path) -> None:
    """Three `restart-service pop3` in a row (the runbook's PopCTP steps) are stops and
    starts supervisord was asked for: no unexpected exit is counted and the crash-loop
    monitor stays Healthy. A kill from outside is counted."""
    data = detached_organization
    exits = paths.server_folder(data, "cas1").exits_file()

    def proxy_restarts() -> str:
        rows = json_of(data, "get-serverhealth", "cas1", "--health-set", "POP.Proxy")
        found = [r for r in rows if r["Name"] == "PopProxyRestartsMonitor"]
        return str(found[0]["AlertValue"]) if found else ""

    wait_for("the proxy process monitor's first readings", lambda: proxy_restarts() == "Healthy")
    for _ in range(3):
        restarted = popguard(data, "restart-service", "pop3", "--server", "cas1")
        assert restarted.returncode == 0, restarted.stderr
        time.sleep(6)  # one probe reading of the new process
    assert read_exits(exits).get("pop3", 0) == 0
    assert proxy_restarts() == "Healthy"
    assert not [a for a in json_of(data, "get-alerts", "--server", "cas1")
                if a["MonitorName"] == "PopProxyRestartsMonitor"]  # fmt: skip
    crashed = popguard(data, "inject-fault", "--server", "cas1", "--service", "pop3",
                       "--kind", "crash")  # fmt: skip
    assert crashed.returncode == 0, crashed.stderr
    wait_for("the crash to be counted", lambda: read_exits(exits).get("pop3", 0) == 1, 30)
