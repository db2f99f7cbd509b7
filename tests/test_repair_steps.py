"""The repair ladder's safety rules and the escalation channels, with an injected
clock: steps fire in order of their times and resume after a restart of the health
service; a server holding an active copy is never restarted; a database is never
left without an active copy; group throttles count every server of the role; an
alert is sent by e-mail and webhook, not again within the repeat interval, again
after it, and resolved when its monitor is Healthy."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popguard import paths
from popguard.directory.directory import Directory
from popguard.directory.passwords import hash_password
from popguard.health.clock import ManualClock
from popguard.health.definitions import LadderStep, MonitorDefinition
from popguard.health.diagnosis import marker_file
from popguard.health.engine import HealthEngine
from popguard.health.escalation import RESOLVED, AlertReport, email_text, webhook_payload
from popguard.health.incidents import Incident
from popguard.health.incidents import Outcome as IncidentOutcome
from popguard.health.loader import load_health_set
from popguard.health.monitors import exits_in_window
from popguard.health.probes import PROBE_KINDS, Outcome, ProbeFailure, Transcript
from popguard.health.responders import (
    RESPONDER_KINDS,
    RESTARTED_LISTEN,
    RESTARTED_SETTLE,
    check_restarted,
)
from popguard.health.results import ProbeResult, RecoveryAction, ResultsStore
from popguard.services.context import ServerContext
from popguard.testing.net import free_loopback_address

from .conftest import AlertSinks, Organization

SWITCHED = """
name = "Test.Ladder"
health_group = "ServiceComponents"
role = "mailbox"

[[probes]]
name = "SwitchProbe"
kind = "test-switch"
recurrence = 10
timeout = 5

[[monitors]]
name = "SwitchMonitor"
kind = "consecutive-failures"
probe = "SwitchProbe"
threshold = 1
ladder = [
    { state = "Degraded", after = 0 },
    { state = "Unhealthy", after = 10 },
    { state = "Unrecoverable", after = 300 },
]
help = "1. Look at it.\\n2. Escalate."
"""

LADDER = """
[[responders]]
name = "Away"
kind = "move-databases-away"
monitor = "SwitchMonitor"
state = "Unhealthy"
after = 30

[[responders]]
name = "Reboot"
kind = "restart-server"
monitor = "SwitchMonitor"
state = "Unhealthy"
after = 60

[[responders]]
name = "Back"
kind = "move-back"
monitor = "SwitchMonitor"
state = "Unhealthy"
after = 90

[[responders]]
name = "Escalate"
kind = "escalate"
monitor = "SwitchMonitor"
state = "Unrecoverable"
"""


class Switch:
    """The probe's outcome, set by the test."""

    failing = True

    async def probe(self, definition: Any, target: Any, transcript: Transcript) -> Outcome:
        if self.failing:
            raise ProbeFailure("POP3", "-ERR", "login: -ERR [SYS/TEMP] refused on purpose")
        return Outcome()


@pytest.fixture
def switch(monkeypatch: pytest.MonkeyPatch) -> Switch:
    found = Switch()
    monkeypatch.setitem(PROBE_KINDS, "test-switch", found.probe)
    return found


def two_mailbox_servers(tmp_path: Path, active_on: str = "mbx1") -> Path:
    """mbx1 and mbx2 in the directory (no processes), DB01 active on `active_on` with a
    copy on the other."""
    data = tmp_path / "data"
    with Directory(data) as directory:
        directory.new_server("mbx1", ["mailbox"], free_loopback_address())
        directory.new_server("mbx2", ["mailbox"], free_loopback_address())
        directory.new_database("DB01", active_on)
        directory.add_database_copy("DB01", "mbx2" if active_on == "mbx1" else "mbx1", 2)
    return data


async def step(engine: HealthEngine, clock: ManualClock, seconds: float) -> None:
    await clock.advance(seconds)
    engine.walk()
    await engine.settle()


def actions(engine: HealthEngine) -> list[tuple[str, str, str]]:
    return [(a.responder.split("\\")[1], a.result, a.detail) for a in engine.store.actions()]


async def test_steps_fire_in_order_never_unsafely_and_resume_after_a_restart(
    tmp_path: Path, switch: Switch
) -> None:
    data = two_mailbox_servers(tmp_path)
    health_set = load_health_set(SWITCHED + LADDER, "ladder.toml")
    clock = ManualClock(start=time.time())
    engine = HealthEngine(ServerContext.open(data, "mbx1"), clock, [health_set])
    probe = engine.probes()[0][1]
    await engine.run_now(health_set, probe)  # the first failure: the alert begins
    await step(engine, clock, 29)
    assert actions(engine) == []  # Unhealthy at 10 s, but the first step waits for 30 s
    await step(engine, clock, 1)
    ((name, result, detail),) = actions(engine)
    # mbx2's copy has never reported Healthy: DB01 stays active here, not orphaned.
    assert (name, result) == ("Away", "Failed") and "nothing moved" in detail
    with Directory(data) as directory:
        assert directory.active_server("DB01") == "mbx1"
        assert not directory.get_server("mbx1").activation_disabled
    engine.close()

    # The health service restarts mid-ladder: the same alert goes on, nothing repeats.
    engine = HealthEngine(ServerContext.open(data, "mbx1"), clock, [health_set])
    await step(engine, clock, 20)
    assert len(actions(engine)) == 1
    await step(engine, clock, 10)
    name, result, detail = actions(engine)[1]
    assert (name, result) == ("Reboot", "Skipped")
    assert "holds the active copy of DB01: a server is never restarted" in detail
    await step(engine, clock, 30)
    name, result, detail = actions(engine)[2]
    # Nothing moved, so nothing is owed back.
    assert (name, result) == ("Back", "Skipped") and "no database is owed back" in detail
    assert len({a.alert_started for a in engine.store.actions()}) == 1
    engine.close()


async def test_a_step_whose_probe_now_succeeds_does_nothing(tmp_path: Path, switch: Switch) -> None:
    data = two_mailbox_servers(tmp_path, active_on="mbx2")  # nothing active on mbx1
    health_set = load_health_set(SWITCHED + LADDER, "ladder.toml")
    clock = ManualClock(start=time.time())
    engine = HealthEngine(ServerContext.open(data, "mbx1"), clock, [health_set])
    await engine.run_now(health_set, engine.probes()[0][1])
    await step(engine, clock, 30)
    switch.failing = False  # it mends before the next step re-checks
    await step(engine, clock, 30)
    assert actions(engine)[0][:2] == ("Away", "Skipped")  # it holds no active copy
    # The re-run succeeded: no restart, the monitor is Healthy, the alert over.
    name, result, detail = actions(engine)[1]
    assert (name, result) == ("Reboot", "Skipped") and "succeeded when run again" in detail
    assert [r.alert_value for r in engine.monitor_rows()] == ["Healthy"]
    await step(engine, clock, 600)
    assert len(actions(engine)) == 2
    engine.close()


GROUP = """
[[responders]]
name = "Reboot"
kind = "restart-server"
monitor = "SwitchMonitor"
state = "Unhealthy"
throttle = { min_gap = 0, per_hour = 10, per_day = 10, group_per_day = 2, min_in_service = 1 }
"""


async def test_group_throttles_count_every_server_of_the_role(
    tmp_path: Path, switch: Switch
) -> None:
    data = two_mailbox_servers(tmp_path, active_on="mbx2")
    health_set = load_health_set(SWITCHED + GROUP, "group.toml")
    clock = ManualClock(start=time.time())
    with Directory(data) as directory:  # mbx2 was just restarted by its own engine
        directory.record_repair("mbx2", "mailbox", "restart-server", "", clock.now() - 60)
    engine = HealthEngine(ServerContext.open(data, "mbx1"), clock, [health_set])
    await engine.run_now(health_set, engine.probes()[0][1])
    await step(engine, clock, 10)
    ((_, result, detail),) = actions(engine)
    assert result == "Throttled" and "only 0 other mailbox server(s) in service" in detail
    engine.close()

    data = two_mailbox_servers(tmp_path / "second", active_on="mbx2")
    clock = ManualClock(start=time.time())
    with Directory(data) as directory:  # two in the last day, both long settled
        for hours in (20, 10):
            directory.record_repair(
                "mbx2", "mailbox", "restart-server", "", clock.now() - hours * 3600
            )
    engine = HealthEngine(ServerContext.open(data, "mbx1"), clock, [health_set])
    await engine.run_now(health_set, engine.probes()[0][1])
    await step(engine, clock, 10)
    ((_, result, detail),) = actions(engine)
    assert result == "Throttled" and "(group limit 2)" in detail
    engine.close()


ESCALATE_ONLY = """
[[responders]]
name = "Escalate"
kind = "escalate"
monitor = "SwitchMonitor"
state = "Unhealthy"
"""


def escalation_config(data: Path, sinks: AlertSinks) -> None:
    (data / "popguard.toml").write_text(
        f"[escalation]\nrepeat_interval = 600\n"
        f'[escalation.email]\nsmtp_host = "{sinks.host}"\nsmtp_port = {sinks.smtp_port}\n'
        f'to = ["oncall@example.test"]\n'
        f'[escalation.webhook]\nurl = "{sinks.webhook_url}"\n'
    )


async def test_an_alert_is_sent_repeated_no_sooner_than_configured_and_resolved(
    tmp_path: Path, switch: Switch, alert_sinks: AlertSinks
) -> None:
    received = alert_sinks
    data = two_mailbox_servers(tmp_path, active_on="mbx2")
    escalation_config(data, alert_sinks)
    health_set = load_health_set(SWITCHED + ESCALATE_ONLY, "escalate.toml")
    clock = ManualClock(start=time.time())
    engine = HealthEngine(ServerContext.open(data, "mbx1"), clock, [health_set])
    probe = engine.probes()[0][1]
    await engine.run_now(health_set, probe)
    await step(engine, clock, 10)
    (mail,) = received.mails
    assert mail["Subject"].startswith("[popguard ALERT] mbx1 SwitchMonitor on pop3be")
    payload = mail.get_payload(decode=True)
    assert isinstance(payload, bytes)
    body = payload.decode()
    assert "refused on purpose" in body and "1. Look at it." in body
    # Where users are served now, and what is left, with the real names.
    served = "  DB01 is active on mbx2\r\n  activation on mbx1 is allowed\r\n"
    assert served in body
    assert "popguard get-recoveryactions --server mbx1" in body and "SERVER" not in body
    (hook,) = received.hooks
    assert (
        hook["status"] == "firing" and hook["alerts"][0]["labels"]["alertname"] == "SwitchMonitor"
    )
    (alert,) = engine.store.alerts()
    assert (
        "e-mail to oncall@example.test sent" in alert.notification and "204" in alert.notification
    )

    await step(engine, clock, 300)  # within the repeat interval: not again
    assert len(received.mails) == 1
    await step(engine, clock, 300)  # 600 s after: sent again, as Alertmanager does
    assert len(received.mails) == 2

    # Another monitor's step on another resource is no part of this problem's history.
    now = clock.now()
    engine.store.add_action(RecoveryAction("POP\\PopCTPSkip", "POP\\PopCTPMonitor", "DB09",
                                           "restart-service", now, now, now, "Skipped",
                                           "unrelated"))  # fmt: skip
    switch.failing = False
    await engine.run_now(health_set, probe)
    await engine.settle()
    assert received.mails[-1]["Subject"].startswith("[popguard RESOLVED]")
    resolved_payload = received.mails[-1].get_payload(decode=True)
    assert isinstance(resolved_payload, bytes)
    resolved_body = resolved_payload.decode()
    # It says resolved, when and how; its fields line up with each other.
    assert resolved_body.startswith("Resolved: mbx1 Test.Ladder\\SwitchMonitor on pop3be is")
    assert "could not repair" not in resolved_body and "DB09" not in resolved_body
    lines = resolved_body.splitlines()[1:]  # after the first line, the fields
    fields = [line for line in lines if line.startswith(("Server:", "Resolved:"))]
    assert (
        len(fields) == 2 and len({len(f) - len(f.split(":", 1)[1].lstrip()) for f in fields}) == 1
    )
    assert received.hooks[-1]["status"] == "resolved"
    (alert,) = engine.store.alerts()
    assert alert.resolved == clock.now()

    # The problem returns after its resolution: a new firing, sent at once (as
    # Alertmanager), then repeated no sooner than the interval.
    switch.failing = True
    await engine.run_now(health_set, probe)
    await step(engine, clock, 10)
    assert len(received.mails) == 4 and len(engine.store.alerts()) == 2
    assert received.mails[-1]["Subject"].startswith("[popguard ALERT]")
    await step(engine, clock, 300)
    assert len(received.mails) == 4
    await step(engine, clock, 300)
    assert len(received.mails) == 5 and received.mails[-1]["Subject"].startswith("[popguard ALERT]")
    engine.close()


async def test_an_unreachable_mail_server_is_recorded_not_raised(
    tmp_path: Path, switch: Switch
) -> None:
    data = two_mailbox_servers(tmp_path, active_on="mbx2")
    host = free_loopback_address()
    with socket.socket() as closed:  # a port where nothing listens
        closed.bind((host, 0))
        port = closed.getsockname()[1]
    (data / "popguard.toml").write_text(
        f'[escalation.email]\nsmtp_host = "{host}"\nsmtp_port = {port}\nto = ["a@example.test"]\n'
    )
    health_set = load_health_set(SWITCHED + ESCALATE_ONLY, "escalate.toml")
    clock = ManualClock(start=time.time())
    engine = HealthEngine(ServerContext.open(data, "mbx1"), clock, [health_set])
    await engine.run_now(health_set, engine.probes()[0][1])
    await step(engine, clock, 10)
    (alert,) = engine.store.alerts()
    assert "e-mail to a@example.test failed" in alert.notification and alert.notified is None
    first_try = alert.attempted
    await step(engine, clock, 30)  # not yet: a failed send waits a minute
    assert engine.store.alerts()[0].attempted == first_try
    await step(engine, clock, 30)  # then it is tried again, as long as the alert lasts
    (alert,) = engine.store.alerts()
    assert first_try is not None and alert.attempted == first_try + 60
    engine.close()


@given(
    st.text(max_size=40),
    st.text(max_size=200),
    st.sampled_from(["Succeeded", "Failed", "Skipped", "Throttled"]),
    st.booleans(),
)
def test_any_alert_renders_as_an_email_and_an_alertmanager_payload(
    resource: str, error: str, result: str, resolved: bool
) -> None:
    report = AlertReport(
        status=RESOLVED if resolved else "firing",
        server="mbx1", health_set="POP.Protocol", monitor="PopDeepTestMonitor",
        probe="PopDeepTestProbe", resource=resource, failure_component="Store", error=error,
        started=1e9, raised=1e9 + 60, resolved=1e9 + 120 if resolved else None,
        results=(ProbeResult("POP.Protocol\\PopDeepTestProbe", resource, 1e9, 1e9 + 1,
                             "Failed", 1.0, error=error),),
        actions=(RecoveryAction("POP.Protocol\\X", "POP.Protocol\\PopDeepTestMonitor", resource,
                                "restart-service", 1e9, 1e9 + 5, 1e9 + 6, result, error),),
        runbook="1. Restart.",
    )  # fmt: skip
    text = email_text(report)
    # A resolved mail says how it ended; only an alert carries the runbook.
    assert "restart-service" in text and ("1. Restart." in text) != resolved
    payload = json.loads(json.dumps(webhook_payload(report, _WEBHOOK)))
    (alert,) = payload["alerts"]
    assert alert["labels"].get("resource", "") == resource and alert["status"] == report.status
    assert (alert["endsAt"] == "0001-01-01T00:00:00Z") != resolved


def _webhook() -> Any:
    from popguard.directory.config import WebhookEscalation

    return WebhookEscalation(url="http://127.0.0.1:9/")


_WEBHOOK = _webhook()


DIAGNOSED = """
name = "Test.CTP"
health_group = "CustomerTouchPoints"
role = "frontend"

[[probes]]
name = "LoginProbe"
kind = "pop3-login"
endpoint = "pop3"
tls = "stls"
per_database = true
recurrence = 30
timeout = 10

[[monitors]]
name = "LoginMonitor"
kind = "consecutive-failures"
probe = "LoginProbe"
threshold = 1
ladder = [{ state = "Degraded", after = 0 }]

[[responders]]
name = "Diagnose"
kind = "protocol-logging"
monitor = "LoginMonitor"
state = "Degraded"
service = "pop3"
"""


async def test_protocol_logging_keeps_the_failing_sessions_lines_then_goes_off(
    organization: Organization,
) -> None:
    health_set = load_health_set(DIAGNOSED, "ctp.toml")
    engine = HealthEngine(
        ServerContext.open(organization.data, "cas1"), ManualClock(start=time.time()), [health_set]
    )
    credentials = engine.ensure_health_mailboxes()
    with Directory(organization.data) as directory:  # DB01's health mailbox is refused
        directory.set_password_hash(credentials["db01"].address, hash_password("not it"))
    await engine.run_now(health_set, engine.probes()[0][1])
    await engine.settle()
    (action,) = engine.store.actions()
    assert (action.kind, action.result) == ("protocol-logging", "Succeeded"), action.detail
    assert "on for this probe, off again" in action.detail and "Auth" in action.detail
    lines = action.detail.split("\n")[1:]
    assert any(",PASS,****," in line for line in lines), lines  # the password never shows
    assert any(credentials["db01"].address in line for line in lines), lines
    with Directory(organization.data) as directory:
        assert directory.pop_settings("cas1")[0].ProtocolLogEnabled is False
    engine.close()

    # A health service stopped in the middle of the diagnosis: the next one turns
    # protocol logging off again.
    with Directory(organization.data) as directory:
        settings, _ = directory.pop_settings("cas1")
        directory.set_pop_settings("cas1", settings.with_changes({"ProtocolLogEnabled": True}))
    marker_file(paths.server_folder(organization.data, "cas1")).touch()
    engine = HealthEngine(
        ServerContext.open(organization.data, "cas1"), ManualClock(start=time.time()), [health_set]
    )
    with Directory(organization.data) as directory:
        assert directory.pop_settings("cas1")[0].ProtocolLogEnabled is False
    assert not marker_file(paths.server_folder(organization.data, "cas1")).exists()
    engine.close()


async def test_owed_databases_wait_for_a_healthy_server_or_an_operator(
    tmp_path: Path, switch: Switch
) -> None:
    data = two_mailbox_servers(tmp_path, active_on="mbx2")
    health_set = load_health_set(SWITCHED + LADDER, "ladder.toml")
    clock = ManualClock(start=time.time())
    engine = HealthEngine(ServerContext.open(data, "mbx1"), clock, [health_set])
    engine.store.owe("DB01", "mbx2", clock.now())
    engine.directory.set_mailbox_server("mbx1", activation_disabled=True)
    # No supervisor runs this test's services: mbx1 is not healthy, nothing moves,
    # and the periodic look records nothing (it would every 30 s).
    await step(engine, clock, 31)
    assert engine.store.actions() == [] and engine.store.owed() == {"DB01": 0.0}
    with Directory(data) as directory:
        assert directory.active_server("DB01") == "mbx2"
    # An operator allows activation again: the matter is theirs, nothing is owed.
    engine.directory.set_mailbox_server("mbx1", activation_disabled=False)
    await step(engine, clock, 31)
    (action,) = engine.store.actions()
    assert action.kind == "move-back" and "an operator allowed activation" in action.detail
    assert engine.store.owed() == {}
    engine.close()


def test_a_crash_is_a_rise_in_the_count_of_exits_the_supervisor_did_not_ask_for(
    tmp_path: Path,
) -> None:
    store = ResultsStore(tmp_path / "results.sqlite")
    monitor = MonitorDefinition(
        name="M", kind="exits-in-window", probe="P", threshold=2, window=600,
        ladder=(LadderStep(state="Degraded", after=0),),
    )  # fmt: skip
    # (time, unexpected exits so far): steady, then one crash, then two at once.
    for at, exits in [(0, 4), (5, 4), (10, 4), (15, 4), (20, 5), (25, 5), (30, 7)]:
        store.add(ProbeResult("S\\P", "pop3be", 1000 + at, 1000 + at, "Succeeded", exits))
    verdict = exits_in_window(monitor, store, "S\\P", "pop3be", 1030)
    assert verdict.is_alert and [r.started for r in verdict.failing] == [1020, 1030, 1030]
    # Ten minutes on, the crashes have left the window: the alert ends by itself.
    assert not exits_in_window(monitor, store, "S\\P", "pop3be", 1030 + 600).is_alert
    # A kill by popguard's own restart of a hung service is not a crash.
    store.add_action(RecoveryAction("S\\R", "S\\M", "pop3be", "restart-service", 1000, 1019,
                                    1021, "Succeeded", "restarted pop3be"))  # fmt: skip
    verdict = exits_in_window(monitor, store, "S\\P", "pop3be", 1030)
    assert verdict.is_alert and [r.started for r in verdict.failing] == [1030, 1030]
    store.close()


HURRIED = """
[[responders]]
name = "Fix"
kind = "test-fix"
monitor = "SwitchMonitor"
state = "Unhealthy"

[[responders]]
name = "Next"
kind = "test-note"
monitor = "SwitchMonitor"
state = "Unhealthy"
after = 200
hurry = true

[[responders]]
name = "Later"
kind = "test-note"
monitor = "SwitchMonitor"
state = "Unhealthy"
after = 250
"""


@pytest.mark.parametrize("fix_helped", [False, True])
async def test_a_step_may_hurry_when_the_one_before_it_did_not_help(
    tmp_path: Path, switch: Switch, monkeypatch: pytest.MonkeyPatch, fix_helped: bool
) -> None:
    """A restart whose probe, run again, still fails lets the next step (moving the
    databases away) act at once instead of waiting out its time; one that helped does
    not, and a step that may not hurry always waits."""

    async def fix(context: Any, responder: Any, incident: Any) -> IncidentOutcome:
        return IncidentOutcome("Succeeded", "fixed, supposedly", still_fails=not fix_helped)

    async def note(context: Any, responder: Any, incident: Any) -> IncidentOutcome:
        return IncidentOutcome("Succeeded", "noted")

    monkeypatch.setitem(RESPONDER_KINDS, "test-fix", fix)
    monkeypatch.setitem(RESPONDER_KINDS, "test-note", note)
    data = two_mailbox_servers(tmp_path)
    health_set = load_health_set(SWITCHED + HURRIED, "hurried.toml")
    clock = ManualClock(start=time.time())
    engine = HealthEngine(ServerContext.open(data, "mbx1"), clock, [health_set])
    await engine.run_now(health_set, engine.probes()[0][1])
    await step(engine, clock, 10)  # Unhealthy: the first step fires
    await step(engine, clock, 1)
    fired = [name for name, _, _ in actions(engine)]
    assert fired == (["Fix"] if fix_helped else ["Fix", "Next"])
    await step(engine, clock, 200)
    assert [name for name, _, _ in actions(engine)] == ["Fix", "Next"]
    await step(engine, clock, 50)
    assert [name for name, _, _ in actions(engine)] == ["Fix", "Next", "Later"]
    engine.close()


@pytest.mark.parametrize(
    ("answers", "runs", "fails"),
    [
        (["Networking", "Networking", ""], 3, False),  # listens after a few seconds: helped
        (["POP3"], 1, True),  # an answer (-ERR) from the new process: judged at once
        (["Networking"], int(RESTARTED_LISTEN / RESTARTED_SETTLE), True),  # never listens
    ],
)
async def test_a_restarted_service_is_judged_once_it_can_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answers: list[str], runs: int, fails: bool
) -> None:
    """A restart's probe, run again while the new process does not listen yet (a loaded
    machine), is run again rather than taken for "the restart did not help", which would
    let the next step move the databases away from a mended server."""
    seen: list[str] = []

    async def scripted(definition: Any, target: Any, transcript: Transcript) -> Outcome:
        component = answers[min(len(seen), len(answers) - 1)]
        seen.append(component)
        if component:
            raise ProbeFailure(component, "scripted", f"{component} failure on purpose")
        return Outcome()

    monkeypatch.setitem(PROBE_KINDS, "test-switch", scripted)
    data = two_mailbox_servers(tmp_path)
    clock = ManualClock(start=time.time())
    engine = HealthEngine(
        ServerContext.open(data, "mbx1"), clock, [load_health_set(SWITCHED, "switched.toml")]
    )
    incident = Incident("Test.Ladder", "SwitchMonitor", "SwitchProbe", "pop3be", clock.now(), "")
    task = asyncio.create_task(check_restarted(engine, incident))
    while not task.done():
        await clock.advance(0.5, step=0.5)
    again = task.result()
    assert again.fails is fails and len(seen) == runs, seen
    engine.close()


async def test_an_acknowledged_alert_is_not_repeated_and_is_over_when_its_monitor_recovers(
    tmp_path: Path, switch: Switch, alert_sinks: AlertSinks
) -> None:
    """An operator's acknowledgement (the web page) stops the repeats of that alert only:
    once its monitor recovers it is resolved, and the problem's return is a new alert,
    sent and repeated as before."""
    received = alert_sinks
    data = two_mailbox_servers(tmp_path, active_on="mbx2")
    escalation_config(data, alert_sinks)
    health_set = load_health_set(SWITCHED + ESCALATE_ONLY, "escalate.toml")
    clock = ManualClock(start=time.time())
    engine = HealthEngine(ServerContext.open(data, "mbx1"), clock, [health_set])
    probe = engine.probes()[0][1]
    await engine.run_now(health_set, probe)
    await step(engine, clock, 10)
    (alert,) = engine.store.alerts()
    assert len(received.mails) == 1
    assert not engine.store.acknowledge(alert.id + 1, clock.now(), "op", "no such alert")
    assert engine.store.acknowledge(alert.id, clock.now(), "operator", "on it")
    for _ in range(3):  # three repeat intervals: no repeat
        await step(engine, clock, 600)
    assert len(received.mails) == 1
    (acknowledged,) = engine.store.alerts()
    assert (acknowledged.acknowledged_by, acknowledged.acknowledgement) == ("operator", "on it")

    switch.failing = False
    await engine.run_now(health_set, probe)
    await step(engine, clock, 10)
    assert engine.store.alerts()[0].resolved is not None
    assert received.mails[-1]["Subject"].startswith("[popguard RESOLVED]")
    sent = len(received.mails)

    switch.failing = True
    await engine.run_now(health_set, probe)
    await step(engine, clock, 10)
    _, second = engine.store.alerts()
    assert second.acknowledged is None and second.resolved is None
    assert len(received.mails) == sent + 1
    await step(engine, clock, 600)
    assert len(received.mails) == sent + 2  # the new alert repeats
    engine.close()
