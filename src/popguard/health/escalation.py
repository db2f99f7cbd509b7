"""Telling a person: an alert as an e-mail (SMTP) and as an Alertmanager webhook.

One `AlertReport` holds what the runbook asks an escalation to carry: the server,
health set, monitor, probe, failure component and reason, the last probe results,
every recovery action already taken, and the steps left to a person. Both channels
are rendered from it, so they always say the same thing. Sending never raises: what
happened on each channel is returned as text and stored with the alert.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any

import httpx

from popguard.directory.config import EmailEscalation, Escalation, WebhookEscalation
from popguard.health.results import ProbeResult, RecoveryAction

FIRING, RESOLVED = "firing", "resolved"
# Alertmanager's "no end yet".
ZERO_TIME = "0001-01-01T00:00:00Z"


@dataclass(frozen=True)
class AlertReport:
    status: str  # firing | resolved
    server: str
    health_set: str
    monitor: str
    probe: str
    resource: str
    failure_component: str
    error: str
    started: float  # the monitor's first alert
    raised: float  # when it was escalated
    resolved: float | None
    results: tuple[ProbeResult, ...]  # the newest first
    actions: tuple[RecoveryAction, ...]  # the actions on this problem since the alert began
    runbook: str  # the monitor's help, with this server's names in it
    served: tuple[str, ...] = ()  # where users are served now ("DB01 is active on mbx2")
    next_steps: tuple[str, ...] = ()  # the commands left to a person, with real names

    @property
    def identity(self) -> str:
        return f"{self.server} {self.health_set}\\{self.monitor} on {self.resource}"

    @property
    def fingerprint(self) -> str:
        key = f"{self.server}/{self.health_set}/{self.monitor}/{self.resource}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def _time(moment: float | None) -> str:
    if moment is None:
        return ZERO_TIME
    stamp = datetime.datetime.fromtimestamp(moment, datetime.UTC)
    return stamp.isoformat(timespec="seconds").replace("+00:00", "Z")


def history_lines(report: AlertReport) -> list[str]:
    lines = []
    for action in report.actions:
        ended = _time(action.ended) if action.ended is not None else "(under way)"
        lines.append(
            f"{_time(action.started)} .. {ended}  {action.responder} [{action.kind}] on "
            f"{action.resource}: {action.result}. {action.detail}"
        )
    return lines or ["none"]


def result_lines(report: AlertReport) -> list[str]:
    return [
        f"{_time(r.started)}  {r.result_type}"
        + (f"  {r.failure_component}: {r.error}" if not r.succeeded else "")
        for r in report.results
    ] or ["none"]


def how_resolved(report: AlertReport) -> str:
    """What mended it, as far as popguard knows: its last repair that worked, or none."""
    mended = [a for a in report.actions if a.result == "Succeeded" and a.kind != "escalate"]
    if not mended:
        return "no repair of popguard's ran after the escalation: mended by a person or by itself"
    last = mended[-1]
    return f"after {last.responder} [{last.kind}] on {last.resource}: {last.detail}"


def _fields(report: AlertReport) -> str:
    rows = [
        ("Server", report.server),
        ("Health set", report.health_set),
        ("Monitor", report.monitor),
        ("Probe", report.probe),
        ("Target resource", report.resource),
        ("Failure component", report.failure_component or "unknown"),
        ("Error", report.error or "none recorded"),
        ("First alert", _time(report.started)),
        ("Escalated", _time(report.raised)),
    ]
    if report.status == RESOLVED:
        rows.append(("Resolved", f"{_time(report.resolved)} (the monitor is Healthy again)"))
    width = max(len(label) for label, _ in rows) + 2
    return "".join(f"{label + ':':<{width}}{value}\n" for label, value in rows)


def email_text(report: AlertReport) -> str:
    if report.status == RESOLVED:
        return (
            f"Resolved: {report.identity} is Healthy again, {how_resolved(report)}.\n\n"
            + _fields(report)
            + "\nRecovery actions on this problem:\n  "
            + "\n  ".join(history_lines(report))
            + "\n"
        )
    served = "".join(f"  {line}\n" for line in report.served) or "  (no database copies here)\n"
    steps = "".join(f"  {line}\n" for line in report.next_steps) or "  see the runbook below\n"
    return (
        "popguard could not repair this by itself.\n\n"
        + _fields(report)
        + "\nLast probe results (newest first):\n  "
        + "\n  ".join(result_lines(report))
        + "\n"
        + "\nWhat popguard did:\n  "
        + "\n  ".join(history_lines(report))
        + "\n"
        + f"\nWhere users are served now:\n{served}"
        + f"\nWhat is left to a person:\n{steps}"
        + f"\nThe runbook for {report.monitor}, for reference:\n"
        + f"{report.runbook.strip() or 'no steps recorded'}\n"
    )


def email_message(report: AlertReport, config: EmailEscalation) -> EmailMessage:
    message = EmailMessage()
    prefix = "[popguard RESOLVED]" if report.status == RESOLVED else "[popguard ALERT]"
    # Short enough for one header line (78 octets): the health set is in the body.
    message["Subject"] = (
        f"{prefix} {report.server} {report.monitor} on {report.resource}: "
        f"{report.failure_component or 'failure'}"
    )
    message["From"] = config.sender
    message["To"] = ", ".join(config.to)
    message["Date"] = format_datetime(datetime.datetime.now(datetime.UTC))
    message["Message-ID"] = make_msgid(domain="popguard.local")
    message["X-Popguard-Fingerprint"] = report.fingerprint
    message.set_content(email_text(report))
    return message


def webhook_payload(report: AlertReport, config: WebhookEscalation) -> dict[str, Any]:
    """The JSON that Alertmanager's webhook receiver sends (version 4), so that a
    receiver written for Alertmanager reads popguard's alerts unchanged."""
    every_label = {
        "alertname": report.monitor,
        "server": report.server,
        "health_set": report.health_set,
        "probe": report.probe,
        "resource": report.resource,
        "failure_component": report.failure_component,
        "severity": "critical",
    }
    labels = {name: value for name, value in every_label.items() if value}  # as Alertmanager
    annotations = {
        "summary": f"{report.identity}: {report.failure_component or 'failure'}",
        "description": report.error,
        "recovery_actions": "\n".join(history_lines(report)),
        "last_results": "\n".join(result_lines(report)),
        "runbook": report.runbook.strip(),
        "served": "\n".join(report.served),
        "next_steps": "\n".join(report.next_steps),
    }
    alert = {
        "status": report.status,
        "labels": labels,
        "annotations": annotations,
        "startsAt": _time(report.started),
        "endsAt": _time(report.resolved) if report.status == RESOLVED else ZERO_TIME,
        "generatorURL": "",
        "fingerprint": report.fingerprint,
    }
    # One alert per group (each problem is its own group), so that a receiver keying
    # on groupKey resolves exactly this one.
    group = {k: labels[k] for k in ("alertname", "server", "resource") if k in labels}
    return {
        "version": "4",
        "groupKey": "{}:{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in group.items()) + "}",
        "truncatedAlerts": 0,
        "status": report.status,
        "receiver": config.receiver,
        "groupLabels": group,
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": "",
        "alerts": [alert],
    }


def _send_email(report: AlertReport, config: EmailEscalation) -> tuple[bool, str]:
    try:
        message = email_message(report, config)
        with smtplib.SMTP(config.smtp_host, config.smtp_port, timeout=config.timeout) as smtp:
            if config.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if config.username and config.password_file:
                password = config.password_file.read_text().strip()
                smtp.login(config.username, password)
            refused = smtp.send_message(message)
    except (OSError, ValueError, smtplib.SMTPException) as exc:
        return False, f"e-mail to {', '.join(config.to)} failed: {exc}"
    if refused:
        return True, f"e-mail refused for {', '.join(refused)}"
    return True, f"e-mail to {', '.join(config.to)} sent"


def shown_url(url: str) -> str:
    """A webhook URL as logs and e-mails show it: chat webhooks carry their secret in
    the path and query, so only the scheme and host are shown."""
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.netloc.decode()}/..."


async def _post_webhook(report: AlertReport, config: WebhookEscalation) -> tuple[bool, str]:
    where = shown_url(config.url)
    try:
        async with httpx.AsyncClient(timeout=config.timeout) as client:
            response = await client.post(config.url, json=webhook_payload(report, config))
    except httpx.HTTPError as exc:
        return False, f"webhook {where} failed: {type(exc).__name__}"
    if response.is_success:
        return True, f"webhook {where}: {response.status_code}"
    return False, f"webhook {where} failed: HTTP {response.status_code}"


async def send(report: AlertReport, escalation: Escalation) -> tuple[bool, str]:
    """Send on every configured channel: (any channel took it, what each one did)."""
    outcomes: list[str] = []
    delivered = False
    if escalation.email is not None:
        sent, outcome = await asyncio.to_thread(_send_email, report, escalation.email)
        delivered |= sent
        outcomes.append(outcome)
    if escalation.webhook is not None:
        sent, outcome = await _post_webhook(report, escalation.webhook)
        delivered |= sent
        outcomes.append(outcome)
    if not outcomes:
        return False, "not sent: no [escalation] channel in popguard.toml"
    return delivered, "; ".join(outcomes)
