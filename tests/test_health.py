"""The health services of a running organization, through the operator's commands."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from popguard.health.health_mailboxes import credentials_file
from popguard.testing.organization import popguard

from .conftest import Organization


def health(org: Organization, server: str, health_set: str) -> dict[str, dict[str, Any]]:
    shown = popguard(org.data, "get-serverhealth", server, "--health-set", health_set,
                     "--format", "json")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    return {row["Name"]: row for row in json.loads(shown.stdout)}


def wait_for_alert(
    org: Organization, server: str, health_set: str, monitor: str, value: str, timeout: float
) -> float:
    """Seconds until `monitor` shows `value`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        row = health(org, server, health_set).get(monitor)
        if row is not None and row["AlertValue"] == value:
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"{monitor} on {server} never became {value}: {row}")


def invoke(org: Organization, identity: str, server: str) -> dict[str, Any]:
    shown = popguard(org.data, "invoke-monitoringprobe", identity, "--server", server,
                     "--format", "json")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    result: dict[str, Any] = json.loads(shown.stdout)[0]
    return result


def test_a_paused_back_end_goes_degraded_then_unhealthy_and_back(
    watched_organization: Organization,
) -> None:
    org = watched_organization
    for monitor in ("PopSelfTestMonitor", "PopDeepTestMonitor"):
        wait_for_alert(org, "mbx1", "POP.Protocol", monitor, "Healthy", 60)
    back_end = org.mailbox["mbx1"].processes["pop3be"]
    back_end.send_signal(signal.SIGSTOP)
    try:
        wait_for_alert(org, "mbx1", "POP.Protocol", "PopSelfTestMonitor", "Degraded", 60)
        wait_for_alert(org, "mbx1", "POP.Protocol", "PopSelfTestMonitor", "Unhealthy", 60)
        row = health(org, "mbx1", "POP.Protocol")["PopSelfTestMonitor"]
        assert row["CurrentHealthSetState"] == "Unhealthy" and row["FirstAlertObservedTime"]
        assert "no answer within" in row["Error"]
        shown = popguard(org.data, "invoke-monitoringprobe", "POP.Protocol\\PopSelfTestProbe",
                         "--server", "mbx1", "--format", "list")  # fmt: skip
        assert "ResultType         : TimedOut" in shown.stdout, shown.stdout
        assert "Error              : no answer within 4s" in shown.stdout
        # A silent service is the service's failure, not TLS's, in whatever step.
        assert "FailureComponent   : POP3" in shown.stdout
        # The other servers' health is their own: mbx2's back end is fine.
        assert health(org, "mbx2", "POP.Protocol")["PopSelfTestMonitor"]["AlertValue"] == "Healthy"
    finally:
        back_end.send_signal(signal.SIGCONT)
    wait_for_alert(org, "mbx1", "POP.Protocol", "PopSelfTestMonitor", "Healthy", 60)
    report = json.loads(popguard(org.data, "get-healthreport", "mbx1", "--format", "json").stdout)
    assert {r["HealthSet"] for r in report} == {"POP", "POP.Protocol"}
    # MonitorCount counts the rows get-serverhealth shows (one per monitor and target).
    shown = json.loads(popguard(org.data, "get-serverhealth", "mbx1", "--format", "json").stdout)
    for row in report:
        rows = [r for r in shown if r["HealthSetName"] == row["HealthSet"]]
        assert row["MonitorCount"] == len(rows), (row, rows)


def test_failures_are_blamed_on_the_right_component(watched_organization: Organization) -> None:
    org = watched_organization
    # Through the front end, the customer touch point reads the probe message.
    ctp = invoke(org, "POP\\PopCTPProbe\\DB01", "cas1")
    assert ctp["ResultType"] == "Succeeded", ctp
    assert "C: RETR 1" in ctp["ExecutionContext"] and "C: PASS ****" in ctp["ExecutionContext"]

    # A wrong health-mailbox password is Auth, not a dead service.
    path: Path = credentials_file(org.data)
    saved = path.read_text()
    stored = json.loads(saved)
    stored["databases"]["db01"]["password"] = "not the password"
    path.write_text(json.dumps(stored))
    try:
        deep = invoke(org, "POP.Protocol\\PopDeepTestProbe", "mbx1")
        assert (deep["ResultType"], deep["FailureComponent"]) == ("Failed", "Auth"), deep
        assert deep["FailureReason"] == "AUTH" and "-ERR [AUTH]" in deep["Error"]
        assert "not the password" not in deep["ExecutionContext"]
        ctp = invoke(org, "POP\\PopCTPProbe\\DB01", "cas1")
        assert ctp["FailureComponent"] == "Auth", ctp
    finally:
        path.write_text(saved)

    # A stopped back end: nothing listens, which is Networking.
    org.mailbox["mbx1"].kill("pop3be")
    deep = invoke(org, "POP.Protocol\\PopDeepTestProbe", "mbx1")
    assert (deep["ResultType"], deep["FailureComponent"]) == ("Failed", "Networking"), deep
    assert "cannot connect" in deep["Error"]
    # Through the front end the same outage is the back end's, said so.
    ctp = invoke(org, "POP\\PopCTPProbe\\DB01", "cas1")
    assert (ctp["ResultType"], ctp["FailureComponent"]) == ("Failed", "Backend"), ctp
    assert "[SYS/TEMP]" in ctp["Error"]


def test_health_commands_refuse_bad_input_in_one_line(watched_organization: Organization) -> None:
    org = watched_organization
    cases = [
        (("invoke-monitoringprobe", "POP\\NoSuchProbe", "--server", "mbx1"), "no probe"),
        (("invoke-monitoringprobe", "PopCTPProbe", "--server", "cas1"), "HEALTHSET\\PROBE"),
        (("get-serverhealth", "mbx9"), "no server named 'mbx9'"),
        (("get-serverhealth", "mbx1", "--health-set", "IMAP"), "no health set on mbx1"),
        (("get-monitoringitemhelp", "POP\\Nothing"), "no probe or monitor"),
        (("get-monitoringitemidentity", "IMAP", "--server", "mbx1"), "no health set 'IMAP'"),
    ]
    for args, message in cases:
        shown = popguard(org.data, *args)
        assert shown.returncode == 1, (args, shown.stdout)
        assert message in shown.stderr and len(shown.stderr.strip().splitlines()) == 1, shown.stderr
    for command in ("get-alerts", "get-recoveryactions"):
        listed = popguard(org.data, command, "--server", "cas1", "--format", "json")
        assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stdout
    helped = popguard(org.data, "get-monitoringitemhelp", "POP\\PopCTPMonitor", "--format", "list")
    assert "protocol-logging-enabled true" in helped.stdout
    items = json.loads(popguard(org.data, "get-monitoringitemidentity", "POP.Protocol",
                                "--server", "mbx1", "--format", "json").stdout)  # fmt: skip
    assert {(i["Name"], i["ItemType"]) for i in items} >= {
        ("PopSelfTestProbe", "Probe"), ("PopDeepTestMonitor", "Monitor")
    }  # fmt: skip


def test_an_override_disables_a_monitor_at_once_until_removed(
    watched_organization: Organization,
) -> None:
    org = watched_organization
    monitor = "POP.Protocol\\PopSelfTestMonitor"
    added = popguard(org.data, "add-servermonitoringoverride", monitor, "--server", "mbx1",
                     "--item-type", "Monitor", "--property-name", "Enabled",
                     "--property-value", "$false", "--duration", "1.00:00:00")  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert health(org, "mbx1", "POP.Protocol")["PopSelfTestMonitor"]["AlertValue"] == "Disabled"
    assert health(org, "mbx2", "POP.Protocol")["PopSelfTestMonitor"]["AlertValue"] != "Disabled"
    listed = json.loads(popguard(org.data, "get-servermonitoringoverride", "--server", "mbx1",
                                 "--format", "json").stdout)  # fmt: skip
    assert [(o["Identity"], o["PropertyName"], o["PropertyValue"]) for o in listed] == [
        (monitor, "Enabled", "false")
    ]
    removed = popguard(org.data, "remove-servermonitoringoverride", monitor, "--server", "mbx1",
                       "--item-type", "Monitor", "--property-name", "Enabled")  # fmt: skip
    assert removed.returncode == 0, removed.stderr
    assert health(org, "mbx1", "POP.Protocol")["PopSelfTestMonitor"]["AlertValue"] != "Disabled"
    for args, message in [
        (("--property-name", "Colour", "--property-value", "red"), "may change Enabled"),
        (("--property-name", "Enabled", "--property-value", "perhaps"), "true or false"),
        (("--property-name", "Enabled", "--property-value", "false", "--duration", "1 day"),
         "d.hh:mm:ss"),
        (("--property-name", "Enabled", "--property-value", "false", "--duration", "61.00:00:00"),
         "at most 60 days"),
    ]:  # fmt: skip
        shown = popguard(org.data, "add-globalmonitoringoverride", monitor, "--item-type",
                         "Monitor", *args)  # fmt: skip
        assert shown.returncode == 1 and message in shown.stderr, shown.stderr
    unknown = popguard(org.data, "add-globalmonitoringoverride", "POP\\Nope", "--item-type",
                       "Monitor", "--property-name", "Enabled", "--property-value",
                       "false")  # fmt: skip
    assert unknown.returncode == 1 and "no monitor 'POP\\Nope'" in unknown.stderr


def test_metrics_for_prometheus_and_a_token_for_the_rest(
    watched_organization: Organization,
) -> None:
    org = watched_organization
    invoke(org, "POP.Protocol\\PopDeepTestProbe", "mbx1")
    address = org.mailbox["mbx1"].address
    # HTTPS with the organization's certificates: curl trusts the CA file alone.
    ca = str(org.data / "tls" / "ca.pem")
    metrics = subprocess.run(["curl", "-sS", "--cacert", ca, f"https://{address}:8480/metrics"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    assert metrics.returncode == 0, metrics.stderr
    wanted = 'popguard_probe_success{probe="POP.Protocol\\\\PopDeepTestProbe",resource="DB01",'
    assert wanted in metrics.stdout, metrics.stdout
    assert "popguard_monitor_alert_value{" in metrics.stdout
    assert "popguard_monitor_severity{" in metrics.stdout
    refused = subprocess.run(
        ["curl", "-sS", "--cacert", ca, "-o", "/dev/null", "-w", "%{http_code}",
         f"https://{address}:8480/v1/serverhealth"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert refused.stdout == "401"
    # Plain HTTP is not served: the token would travel in clear.
    plain = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
         f"http://{address}:8480/metrics"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert plain.stdout != "200", plain


def test_faults_that_outlast_a_restart_are_seen_for_what_they_are(
    watched_organization: Organization,
) -> None:
    org = watched_organization
    (org.data / "popguard.toml").write_text("[faults]\nenabled = true\n")

    def deep() -> dict[str, Any]:
        return invoke(org, "POP.Protocol\\PopDeepTestProbe", "mbx1")

    def inject(*args: str) -> None:
        done = popguard(org.data, "inject-fault", "--server", "mbx1", "--service", "pop3be", *args)
        assert done.returncode == 0, done.stderr
        time.sleep(1.5)  # the service reads its fault file every second

    inject("--kind", "refuse-auth")
    refused = deep()
    assert (refused["ResultType"], refused["FailureReason"]) == ("Failed", "SYS/TEMP"), refused
    # A running back end that refuses logins is the POP3 service's failure, not the store's.
    assert refused["FailureComponent"] == "POP3", refused
    assert "injected fault" in refused["Error"]
    # The restart a responder would do does not mend it: the fault is in a file.
    org.mailbox["mbx1"].kill("pop3be", signal.SIGTERM)
    org.mailbox["mbx1"].start("pop3be")
    assert deep()["ResultType"] == "Failed"
    inject("--kind", "slow", "--seconds", "6")
    slow = invoke(org, "POP.Protocol\\PopSelfTestProbe", "mbx1")
    assert (slow["ResultType"], slow["FailureComponent"]) == ("TimedOut", "POP3"), slow
    cleared = popguard(org.data, "clear-fault", "--server", "mbx1", "--service", "pop3be")
    assert cleared.returncode == 0, cleared.stderr
    # Sessions that were slowed down still hold the mailbox ([IN-USE]) until their
    # last delayed reply: the probe succeeds once they are gone.
    deadline = time.monotonic() + 30
    while (healed := deep())["ResultType"] != "Succeeded" and time.monotonic() < deadline:
        time.sleep(1)
    assert healed["ResultType"] == "Succeeded", healed["Error"]
    wrong = popguard(org.data, "inject-fault", "--server", "mbx1", "--service", "delivery",
                     "--kind", "slow")  # fmt: skip
    assert wrong.returncode == 1 and "fault of the POP3 services" in wrong.stderr
