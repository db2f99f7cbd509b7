"""The web page's parts that need no browser: the transcript parser, the feed's
numbering and replay, what the watcher records, where the page listens, and the
login redirect's target."""

from __future__ import annotations

import asyncio
import time

from hypothesis import given
from hypothesis import strategies as st

from popguard.health.probes import STEP_MARK, Transcript
from popguard.web.address import listen_address, page_url
from popguard.web.app import _local
from popguard.web.events import EventLog, Snapshot, changes
from popguard.web.screens import transcript_steps


def test_a_transcript_is_cut_into_steps_with_their_latencies() -> None:
    text = "\n".join([
        "@ 0.5 ms connect [Networking]", "-- connecting to 127.0.0.1:995 (tls)",
        "@ 2.0 ms TLS handshake [TLS]", "-- TLS established",
        "@ 9.5 ms USER [Auth]", "C: USER a@b.test", "S: +OK",
    ])  # fmt: skip
    steps = transcript_steps(text, 12.0)
    assert [(s.name, s.component, s.latency_ms) for s in steps] == [
        ("connect", "Networking", 1.5), ("TLS handshake", "TLS", 7.5), ("USER", "Auth", 2.5)
    ]  # fmt: skip
    assert steps[2].lines == ["C: USER a@b.test", "S: +OK"]
    # Without the run's latency the last step's own is not known.
    assert transcript_steps(text, None)[-1].latency_ms is None


def test_the_probes_transcript_marks_each_step() -> None:
    transcript = Transcript()
    transcript.at("greeting", "POP3")
    transcript.received(b"+OK ready\r\n")
    (step,) = transcript_steps(transcript.text(), 5.0)
    assert step.name == "greeting" and step.component == "POP3" and step.lines == ["S: +OK ready"]


MARKED = st.builds(lambda t: STEP_MARK + t, st.text(max_size=30))


@given(st.lists(st.one_of(st.text(max_size=40), MARKED)),
       st.one_of(st.none(), st.floats(min_value=0, max_value=1e6)))  # fmt: skip
def test_any_transcript_parses_and_keeps_every_line(lines: list[str], total: float | None) -> None:
    text = "\n".join(lines)
    steps = transcript_steps(text, total)
    kept = [line for step in steps for line in step.lines]
    plain = [line for line in text.splitlines() if not line.startswith(STEP_MARK)]
    assert all(line in kept for line in plain)
    assert all(s.latency_ms is None or s.latency_ms >= 0 for s in steps)


def test_the_feed_replays_exactly_what_came_after_an_id() -> None:
    log = EventLog(capacity=5)
    ids = [log.add("operator", f"event {n}").id for n in range(8)]
    assert ids == sorted(ids) and len(set(ids)) == 8
    replay = log.after(6)
    assert replay is not None and [e.id for e in replay] == [7, 8]
    assert log.after(8) == []
    assert log.after(1) is None  # older than the log keeps: the page reloads
    assert log.after(99) is None  # an id of another run of the service
    assert [e.id for e in log.newest_first(2)] == [8, 7]


async def test_a_waiting_stream_wakes_for_a_new_event() -> None:
    log = EventLog()
    waiting = asyncio.create_task(log.wait(0, 30))
    await asyncio.sleep(0)
    log.add("state", "changed")
    await log.notify()
    await asyncio.wait_for(waiting, 5)


def snapshot(
    value: str, active: str, operator: dict[int, dict[str, str]], *steps: tuple[str, str, str]
) -> Snapshot:
    set_changes = [
        {"Server": "mbx1", "Id": number, "HealthSet": "POP.Protocol", "Was": was,
         "AlertValue": now, "Time": at}
        for number, (was, now, at) in enumerate(steps, 1)
    ]  # fmt: skip
    return Snapshot({("mbx1", "POP.Protocol"): value}, {}, {}, {"DB01": active}, operator,
                    set_changes)  # fmt: skip


def test_the_watcher_records_history_first_then_changes() -> None:
    log = EventLog()
    action = {"User": "op", "Action": "restart-service", "Target": "pop3be on mbx1",
              "Reason": "why", "Result": "Running",
              "Time": "2026-01-01T00:00:00+00:00"}  # fmt: skip
    first = snapshot("Healthy", "mbx1", {1: action})
    assert changes(None, first, log) == 1  # the stored operator action, no state change
    # Two looks apart, the cell is Healthy again: the steps between are in the changes.
    second = snapshot("Healthy", "mbx2", {1: action},
                      ("Healthy", "Degraded", "2026-01-01T00:00:01+00:00"),
                      ("Degraded", "Unhealthy", "2026-01-01T00:00:06+00:00"),
                      ("Unhealthy", "Healthy", "2026-01-01T00:00:08+00:00"))  # fmt: skip
    assert changes(first, second, log) == 4
    texts = [e.text for e in reversed(log.newest_first(10))]
    assert texts[-4:] == [
        "mbx1 POP.Protocol: Healthy -> Degraded",
        "mbx1 POP.Protocol: Degraded -> Unhealthy",
        "mbx1 POP.Protocol: Unhealthy -> Healthy",
        "DB01: active copy moved from mbx1 to mbx2",
    ]
    assert log.newest_first(10)[2].data == {
        "server": "mbx1", "health_set": "POP.Protocol", "value": "Unhealthy", "was": "Degraded"
    }  # fmt: skip
    assert changes(second, snapshot("Healthy", "mbx2", {1: action}), log) == 0


def _action(server: str, number: int, start: str) -> dict[str, object]:
    return {"Server": server, "Id": number, "ResponderName": "PopSelfTestRestart",
            "ActionId": "RestartService", "TargetResource": "pop3be", "Result": "Succeeded",
            "Context": "", "StartTime": start}  # fmt: skip


def _look(actions: list[dict[str, object]], answered: set[str], unanswered: set[str]) -> Snapshot:
    return Snapshot({}, {(str(a["Server"]), int(str(a["Id"]))): a for a in actions}, {}, {}, {},
                    answered=frozenset(answered), unanswered=frozenset(unanswered))  # fmt: skip


def test_a_health_service_that_was_away_brings_history_not_news() -> None:
    """A server whose health service did not answer one look is not news when it
    answers again: its actions the feed already has are not added twice, and one that
    answers for the first time (down when the watcher started) brings its stored
    actions at their own times, not stamped now."""
    log = EventLog()
    old_one = _action("mbx1", 1, "2026-01-01T00:00:00+00:00")
    assert changes(None, first := _look([old_one], {"mbx1"}, {"mbx2"}), log) == 1
    mbx2_history = _action("mbx2", 7, "2026-01-01T00:00:05+00:00")
    second = _look([mbx2_history], {"mbx2"}, {"mbx1"})  # mbx1's health service restarts
    assert changes(first, second, log) == 1
    (event,) = log.newest_first(1)
    assert event.text.startswith("mbx2: PopSelfTestRestart") and event.at == 1767225605.0
    new_one = _action("mbx1", 2, "2026-01-01T00:10:00+00:00")
    third = _look([old_one, new_one, mbx2_history], {"mbx1", "mbx2"}, set())
    before = time.time()
    assert changes(second, third, log) == 1  # only mbx1's new action, as news
    (event,) = log.newest_first(1)
    assert event.text.startswith("mbx1: PopSelfTestRestart") and event.at >= before
    assert (
        changes(third, _look([old_one, new_one, mbx2_history], {"mbx1", "mbx2"}, set()), log) == 0
    )


def test_the_page_stays_on_loopback_unless_told() -> None:
    assert listen_address("127.0.1.1") == "127.0.1.1"
    assert listen_address("192.0.2.10") == "127.0.0.1"
    assert listen_address("192.0.2.10", "192.0.2.10") == "192.0.2.10"
    assert page_url("127.0.1.1", 8088) == "http://127.0.1.1:8088/"
    assert page_url("192.0.2.10", 8088) == "https://192.0.2.10:8088/"
    assert page_url("::1", 8088) == "http://[::1]:8088/"


@given(st.text(max_size=60))
def test_a_login_sends_nowhere_but_this_site(target: str) -> None:
    local = _local(target)
    assert local.startswith("/") and not local.startswith("//") and "\\" not in local
