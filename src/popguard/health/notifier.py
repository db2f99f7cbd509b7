"""When and what to send for each stored alert: Alertmanager's rules, per problem.

A problem (health set, monitor, resource) is sent when it is escalated, unless the
same problem was sent within `repeat_interval`; while it stays open it is sent again
each `repeat_interval`; a send that reached no channel is tried again after
RETRY_AFTER; when its monitor is Healthy again a `resolved` message follows (if it
had been sent). One send per alert at a time. The channels live in escalation.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from popguard.control.service_control import SERVICES
from popguard.directory.config import Escalation, load_escalation
from popguard.directory.directory import Directory
from popguard.errors import UserError
from popguard.health.clock import Clock
from popguard.health.escalation import FIRING, RESOLVED, AlertReport, send
from popguard.health.results import Alert, MonitorState, ResultsStore

log = logging.getLogger("popguard.health")


def with_names(runbook: str, server: str, resource: str) -> str:
    """The runbook's placeholders replaced by this alert's names: SERVER by the server,
    SERVICE by the resource when it is a service."""
    text = re.sub(r"\bSERVER\b", server, runbook)
    if resource in SERVICES:
        text = re.sub(r"\bSERVICE\b", resource, text)
    return text


RETRY_AFTER = 60.0  # seconds before a send that reached no channel is tried again
# The health set of alerts about an event rather than a monitor (Active Manager's
# failovers, health/failover_decisions.py): sent once, then over.
EVENT_ALERTS = "ActiveManager"
CHECK_EVERY = 10.0  # seconds between two looks for alerts to send or resolve


class Notifier:
    def __init__(
        self,
        data: Path,
        server: str,
        directory: Directory,
        store: ResultsStore,
        clock: Clock,
        runbook_of: Callable[[str], str],
    ) -> None:
        self.data, self.server, self.store, self.clock = data, server, store, clock
        self.directory = directory
        self._runbook_of = runbook_of  # 'HealthSet\\Monitor' -> its help text
        self._sending: dict[int, asyncio.Task[None]] = {}
        self._checked = -1e18

    def escalation(self) -> Escalation | None:
        try:
            return load_escalation(self.data)
        except UserError as exc:
            log.error("alerts cannot be sent: %s", exc)
            return None

    def raised(self, alert: Alert) -> str:
        """Store a new alert and start sending it if its time has come; says which."""
        alert = replace(alert, id=self.store.add_alert(alert))
        escalation = self.escalation()
        if escalation is None:
            return self._note(alert, "not sent yet: popguard.toml's [escalation] cannot be read")
        wait = self._wait(alert, self.store.alerts(), escalation, self.clock.now())
        if wait > 0:
            return self._note(
                alert,
                f"not sent yet: the same problem was sent within repeat_interval "
                f"({escalation.repeat_interval:g}s); sent in {wait:.0f}s if it lasts",
            )
        self._start(alert, FIRING, escalation)
        return "sending"

    def _note(self, alert: Alert, notification: str) -> str:
        self.store.mark_notified(alert.id, None, notification)
        return notification

    def _wait(self, alert: Alert, alerts: list[Alert], escalation: Escalation, now: float) -> float:
        """Seconds before this open alert may be sent (0: now)."""
        # As Alertmanager: repeat_interval spaces the sends of one open problem; a problem
        # that returns after its resolution is a new firing, sent at once.
        sent = [
            a.notified
            for a in alerts
            if a.key == alert.key and a.notified is not None and a.resolved is None
        ]
        wait = 0.0
        if sent:
            wait = max(wait, max(sent) + escalation.repeat_interval - now)
        if alert.attempted is not None and alert.notified is None:
            wait = max(wait, alert.attempted + RETRY_AFTER - now)
        return wait

    def _start(self, alert: Alert, status: str, escalation: Escalation) -> None:
        if alert.id in self._sending:
            return
        task = asyncio.create_task(self._send(alert, status, escalation))
        self._sending[alert.id] = task

        def done(finished: asyncio.Task[None]) -> None:
            if self._sending.get(alert.id) is finished:
                del self._sending[alert.id]

        task.add_done_callback(done)

    async def _send(self, alert: Alert, status: str, escalation: Escalation) -> None:
        report = self._report(alert, status)
        now = self.clock.now()
        try:
            delivered, notification = await send(report, escalation)
        except Exception as exc:  # a channel must never take the engine down
            log.exception("sending %s failed", report.identity)
            delivered, notification = False, f"sending failed: {exc!r}"
        log.warning("alert %s %s: %s", report.identity, status, notification)
        if status == RESOLVED:
            self.store.mark_notified(alert.id, None, f"{alert.notification}; resolved: "
                                     f"{notification}")  # fmt: skip
        else:
            self.store.mark_notified(alert.id, now if delivered else None, notification, now)

    def _report(self, alert: Alert, status: str) -> AlertReport:
        started = alert.alert_started or alert.raised
        monitor_key = f"{alert.health_set}\\{alert.monitor}"
        # This problem's actions: on its resource, by its monitor, or server-wide (a
        # move back); not another monitor's repair of another resource.
        actions = tuple(
            a for a in self.store.actions(since=started)
            if a.resource == alert.resource or a.monitor == monitor_key or not a.resource
        )  # fmt: skip
        served, next_steps = self._where_and_next(alert)
        return AlertReport(
            status=status,
            server=self.server,
            health_set=alert.health_set,
            monitor=alert.monitor,
            probe=alert.probe,
            resource=alert.resource,
            failure_component=alert.failure_component,
            error=alert.error,
            started=started,
            raised=alert.raised,
            resolved=alert.resolved,
            results=tuple(
                self.store.recent(f"{alert.health_set}\\{alert.probe}", alert.resource, 5)
            ),
            actions=actions,
            runbook=with_names(self._runbook_of(monitor_key), self.server, alert.resource),
            served=served,
            next_steps=next_steps,
        )

    def _where_and_next(self, alert: Alert) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Where this server's databases are served now, and the commands left to a
        person, with the real names."""
        name = self.server
        steps = [
            f"popguard get-serverhealth {name} --health-set {alert.health_set}",
            f"popguard get-recoveryactions --server {name}",
            f"popguard invoke-monitoringprobe '{alert.health_set}\\{alert.probe}' --server {name}"
            "  (once mended: it must succeed)",
        ]
        try:
            server = self.directory.get_server(name)
            copies = [
                c for c in self.directory.database_copies()
                if c.server.lower() == name.lower()
            ]  # fmt: skip
            served = [
                f"{c.database} is active on {self.directory.active_server(c.database)}"
                for c in copies
            ]
        except (UserError, sqlite3.Error) as exc:
            return (f"the directory cannot be read: {exc}",), tuple(steps)
        if "mailbox" in server.roles:
            if server.activation_disabled:
                served.append(f"activation on {name} is disabled: no database moves onto it")
                steps.append(
                    f"popguard set-mailboxserver {name} "
                    "--database-copy-activation-disabled-and-move-now false"
                    "  (once mended: its databases move back)"
                )
            else:
                served.append(f"activation on {name} is allowed")
        return tuple(served), tuple(steps)

    def check(self, states: dict[tuple[str, str], MonitorState]) -> None:
        """Send what is due, resolve what is over; at most every CHECK_EVERY seconds."""
        now = self.clock.now()
        if now - self._checked < CHECK_EVERY:
            return
        self._checked = now
        every = self.store.alerts()
        open_alerts = [a for a in every if a.resolved is None]
        if not open_alerts:
            return
        escalation = self.escalation()
        for alert in open_alerts:
            if alert.health_set == EVENT_ALERTS:  # no monitor will say it is over
                if alert.notified is not None:
                    self.store.mark_resolved(alert.id, now)
                elif escalation is not None and self._wait(alert, every, escalation, now) <= 0:
                    self._start(alert, FIRING, escalation)
                continue
            state = states.get((f"{alert.health_set}\\{alert.monitor}", alert.resource))
            if state is None or not state.is_alert or state.first_alert != alert.alert_started:
                self.resolve(alert, escalation)
            elif escalation is not None and self._wait(alert, every, escalation, now) <= 0:
                self._start(alert, FIRING, escalation)

    def resolved(self, monitor: str, resource: str) -> None:
        """The monitor is Healthy again: its open alerts are over."""
        health_set, name = monitor.split("\\", 1)
        escalation = None
        for alert in self.store.alerts(open_only=True):
            if (alert.health_set, alert.monitor, alert.resource) == (health_set, name, resource):
                escalation = escalation or self.escalation()
                self.resolve(alert, escalation)

    def resolve(self, alert: Alert, escalation: Escalation | None) -> None:
        now = self.clock.now()
        self.store.mark_resolved(alert.id, now)
        sending = self._sending.pop(alert.id, None)
        if sending is not None:  # a repeat under way is not sent after the resolution
            sending.cancel()
        if escalation is not None and escalation.send_resolved and alert.notified is not None:
            self._start(replace(alert, resolved=now), RESOLVED, escalation)

    async def settle(self) -> None:
        while self._sending:
            await asyncio.gather(*self._sending.values(), return_exceptions=True)

    def cancel(self) -> None:
        for task in self._sending.values():
            task.cancel()
