"""Health commands: get-serverhealth, get-healthreport, invoke-monitoringprobe,
get-monitoringitemidentity, get-monitoringitemhelp. All but the last ask the named
server's health service over its API."""

from __future__ import annotations

import fnmatch
from typing import Any

import click
import httpx

from popguard.cli.context import AppContext, pass_app
from popguard.cli.render import format_option, render
from popguard.errors import UserError
from popguard.health.api import token_file
from popguard.health.definitions import ProbeDefinition
from popguard.health.loader import find_item

API_TIMEOUT = 10.0
INVOKE_TIMEOUT = 120.0


def _ask(app: AppContext, server_name: str, method: str, path: str, **kwargs: Any) -> Any:
    with app.directory() as directory:
        server = directory.get_server(server_name)
    try:
        token = token_file(app.data).read_text().strip()
    except OSError:
        raise UserError(
            f"no health API token in {token_file(app.data)}: has a health service ever run "
            "(popguard serve health)?"
        ) from None
    address, port = server.address, server.port("health")
    url = f"http://{address}:{port}/v1/{path}"
    timeout = INVOKE_TIMEOUT if path == "invoke" else API_TIMEOUT
    try:
        response = httpx.request(
            method, url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout, **kwargs
        )
    except httpx.TransportError as exc:
        raise UserError(
            f"the health service of {server.name} does not answer at {address}:{port} "
            f"({exc or type(exc).__name__}); is `popguard serve health --server {server.name}` "
            "running?"
        ) from None
    if response.status_code != 200:
        try:
            reason = response.json().get("error", response.text)
        except ValueError:
            reason = response.text
        raise UserError(f"{server.name}: {reason}")
    return response.json()


@click.command("get-serverhealth")
@click.argument("server")
@click.option("--health-set", help="Only this health set (e.g. POP.Protocol).")
@click.option("--health-set-like", help="Only health sets matching this pattern (e.g. 'POP*').")
@format_option
@pass_app
def get_serverhealth(
    app: AppContext,
    server: str,
    health_set: str | None,
    health_set_like: str | None,
    output_format: str,
) -> None:
    """Each monitor of SERVER with its AlertValue, as Get-ServerHealth shows them."""
    rows = _ask(app, server, "GET", "serverhealth")
    if health_set:
        rows = [r for r in rows if r["HealthSetName"].lower() == health_set.lower()]
    if health_set_like:
        rows = [
            r for r in rows if fnmatch.fnmatch(r["HealthSetName"].lower(), health_set_like.lower())
        ]
    if (health_set or health_set_like) and not rows:
        raise UserError(f"no health set on {server} matches {health_set or health_set_like!r}")
    render(rows, output_format)


@click.command("get-healthreport")
@click.argument("server")
@format_option
@pass_app
def get_healthreport(app: AppContext, server: str, output_format: str) -> None:
    """Each health set of SERVER and its state (the worst of its monitors)."""
    render(_ask(app, server, "GET", "healthreport"), output_format)


@click.command("invoke-monitoringprobe")
@click.argument("identity")
@click.option("--server", required=True, help="The server whose health service runs it.")
@format_option
@pass_app
def invoke_monitoringprobe(app: AppContext, identity: str, server: str, output_format: str) -> None:
    """Run a probe now (HEALTHSET\\PROBE[\\RESOURCE]) and show what it saw."""
    render(_ask(app, server, "POST", "invoke", json={"identity": identity}), output_format)


@click.command("get-monitoringitemidentity")
@click.argument("health_set")
@click.option("--server", required=True)
@format_option
@pass_app
def get_monitoringitemidentity(
    app: AppContext, health_set: str, server: str, output_format: str
) -> None:
    """The probes and monitors of a health set on SERVER, with their targets."""
    rows = [r for r in _ask(app, server, "GET", "items")
            if r["HealthSetName"].lower() == health_set.lower()]  # fmt: skip
    if not rows:
        raise UserError(f"no health set {health_set!r} on {server}")
    render(rows, output_format)


@click.command("get-monitoringitemhelp")
@click.argument("identity")
@format_option
def get_monitoringitemhelp(identity: str, output_format: str) -> None:
    """What a probe or monitor (HEALTHSET\\NAME) does, and for a monitor the runbook's steps."""
    found = find_item(identity)
    if found is None:
        raise UserError(f"no probe or monitor '{identity}' (names look like 'POP\\PopCTPMonitor')")
    health_set, item = found
    name = f"{health_set.name}\\{item.name}"
    if isinstance(item, ProbeDefinition):
        render([{"Identity": name, "ItemType": "Probe", "Recurrence": item.recurrence,
                 "Timeout": item.timeout, "Description": item.description}],
               output_format)  # fmt: skip
        return
    render(
        [
            {
                "Identity": name,
                "ItemType": "Monitor",
                "Probe": item.probe,
                "Rule": item.kind,
                "Threshold": item.threshold,
                "Ladder": [f"{s.state} at {s.after:g}s" for s in item.ladder],
                "Help": item.help.strip(),
            }
        ],
        output_format,
    )  # fmt: skip(f"no probe or monitor '{identity}' (names look like 'POP\\PopCTPMonitor')")


@click.command("get-recoveryactions")
@click.option("--server", required=True)
@format_option
@pass_app
def get_recoveryactions(app: AppContext, server: str, output_format: str) -> None:
    """What the responders of SERVER did, or why they did not: when, on what, the result."""
    render(_ask(app, server, "GET", "recoveryactions"), output_format)


@click.command("get-alerts")
@click.option("--server", required=True)
@format_option
@pass_app
def get_alerts(app: AppContext, server: str, output_format: str) -> None:
    """Escalations of SERVER: what failed, and every repair already tried."""
    render(_ask(app, server, "GET", "alerts"), output_format)


COMMANDS = [
    get_alerts,
    get_recoveryactions,
    get_serverhealth,
    get_healthreport,
    invoke_monitoringprobe,
    get_monitoringitemidentity,
    get_monitoringitemhelp,
]
