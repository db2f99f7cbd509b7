"""Health commands: get-serverhealth, get-healthreport, invoke-monitoringprobe,
get-monitoringitemidentity, get-monitoringitemhelp. All but the last ask the named
server's health service over its API."""

from __future__ import annotations

import fnmatch
from typing import Any

import click

from popguard.cli.context import AppContext, pass_app
from popguard.cli.render import format_option, render
from popguard.errors import UserError
from popguard.health import api_client
from popguard.health.results import RETENTION


def _ask(app: AppContext, server_name: str, method: str, path: str, body: Any = None) -> Any:
    with app.directory() as directory:
        return api_client.ask(app.data, directory, server_name, method, path, body)


def _ask_each(app: AppContext, server_name: str | None, path: str) -> list[dict[str, Any]]:
    with app.directory() as directory:
        return api_client.ask_each(app.data, directory, server_name, path)


def _render_or_say(rows: list[dict[str, Any]], output_format: str, nothing: str) -> None:
    """Rows, or for a person a line saying there are none (JSON stays `[]` for scripts)."""
    if not rows and output_format != "json":
        click.echo(nothing)
        return
    render(rows, output_format)


def _where(server: str | None) -> str:
    return f"on {server}" if server else "on any server"


@click.command("get-serverhealth")
@click.argument("server", required=False)
@click.option("--health-set", help="Only this health set (e.g. POP.Protocol).")
@click.option("--health-set-like", help="Only health sets matching this pattern (e.g. 'POP*').")
@format_option
@pass_app
def get_serverhealth(
    app: AppContext,
    server: str | None,
    health_set: str | None,
    health_set_like: str | None,
    output_format: str,
) -> None:
    """Each monitor of SERVER (default: every server) with its AlertValue, as
    Get-ServerHealth shows them."""
    rows = _ask_each(app, server, "serverhealth")
    # A server that did not answer has no health sets: its row stays, so it is not
    # mistaken for one without a match.
    if health_set:
        rows = [r for r in rows if "HealthSetName" not in r
                or r["HealthSetName"].lower() == health_set.lower()]  # fmt: skip
    if health_set_like:
        pattern = health_set_like.lower()
        rows = [r for r in rows if "HealthSetName" not in r
                or fnmatch.fnmatch(r["HealthSetName"].lower(), pattern)]  # fmt: skip
    if (health_set or health_set_like) and not any("HealthSetName" in r for r in rows):
        raise UserError(f"no health set {_where(server)} matches {health_set or health_set_like!r}")
    _render_or_say(rows, output_format, f"no monitors {_where(server)}")


@click.command("get-healthreport")
@click.argument("server", required=False)
@format_option
@pass_app
def get_healthreport(app: AppContext, server: str | None, output_format: str) -> None:
    """Each health set of SERVER (default: every server) and its state (the worst of
    its monitors)."""
    rows = _ask_each(app, server, "healthreport")
    _render_or_say(rows, output_format, f"no health sets {_where(server)}")


@click.command("invoke-monitoringprobe")
@click.argument("identity")
@click.option("--server", required=True, help="The server whose health service runs it.")
@format_option
@pass_app
def invoke_monitoringprobe(app: AppContext, identity: str, server: str, output_format: str) -> None:
    """Run a probe now (HEALTHSET\\PROBE[\\RESOURCE]) and show what it saw."""
    render(_ask(app, server, "POST", "invoke", body={"identity": identity}), output_format)


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
    # The health sets' models are loaded only by the command that reads them.
    from popguard.health.definitions import ProbeDefinition
    from popguard.health.loader import find_item

    found = find_item(identity)
    if found is None:
        raise UserError(f"no probe or monitor '{identity}' (names look like 'POP\\PopCTPMonitor')")
    health_set, item = found
    name = f"{health_set.name}\\{item.name}"
    if isinstance(item, ProbeDefinition):
        render([{"Identity": name, "ItemType": "Probe", "Recurrence": item.recurrence,
                 "Timeout": item.timeout, "Retries": item.retries,
                 "RetryInterval": item.retry_interval, "Description": item.description}],
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
@click.option("--server", help="Only this server (default: every server).")
@format_option
@pass_app
def get_recoveryactions(app: AppContext, server: str | None, output_format: str) -> None:
    """What the responders did, or why they did not: when, on what, the result."""
    rows = _ask_each(app, server, "recoveryactions")
    days = RETENTION / 86_400
    _render_or_say(
        rows, output_format, f"no recovery actions {_where(server)} in the last {days:g} days"
    )


@click.command("get-alerts")
@click.option("--server", help="Only this server (default: every server).")
@format_option
@pass_app
def get_alerts(app: AppContext, server: str | None, output_format: str) -> None:
    """Escalations: what failed, and every repair already tried."""
    rows = _ask_each(app, server, "alerts")
    _render_or_say(rows, output_format, f"no alerts {_where(server)}")


COMMANDS = [
    get_alerts,
    get_recoveryactions,
    get_serverhealth,
    get_healthreport,
    invoke_monitoringprobe,
    get_monitoringitemidentity,
    get_monitoringitemhelp,
]
