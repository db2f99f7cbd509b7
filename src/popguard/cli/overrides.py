"""Monitoring overrides and repairing flags: add-/get-/remove-servermonitoringoverride,
add-/get-/remove-globalmonitoringoverride, set-servermonitor."""

from __future__ import annotations

import time
from typing import Any

import click

from popguard.cli.context import AppContext, pass_app
from popguard.cli.render import format_option, render
from popguard.directory.directory import MonitoringOverride
from popguard.directory.exchange_values import parse_boolean
from popguard.errors import UserError
from popguard.health.api import when
from popguard.health.overrides import ITEM_TYPES, known_item, new_override


def override_row(override: MonitoringOverride) -> dict[str, Any]:
    return {
        "Identity": override.identity,
        "Server": override.server or "(global)",
        "ItemType": override.item_type,
        "PropertyName": override.property_name,
        "PropertyValue": override.property_value,
        "CreatedTime": when(override.created),
        "ExpirationTime": when(override.expires),
    }


def _options(function: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--item-type", required=True, type=click.Choice(ITEM_TYPES, case_sensitive=False)
            ),
            click.option(
                "--property-name", required=True, help="Enabled, Recurrence, Timeout, Threshold."
            ),
            click.option("--property-value", required=True),
            click.option("--duration", default="1.00:00:00", show_default=True, help="d.hh:mm:ss"),
        ]
    ):
        function = option(function)
    return function


def _add(
    app: AppContext,
    server: str | None,
    identity: str,
    item_type: str,
    property_name: str,
    property_value: str,
    duration: str,
) -> MonitoringOverride:
    override = new_override(
        server, identity, item_type, property_name, property_value, duration, time.time()
    )
    with app.directory() as directory:
        directory.add_monitoring_override(override)
    return override


@click.command("add-servermonitoringoverride")
@click.argument("identity")
@click.option("--server", required=True)
@_options
@format_option
@pass_app
def add_server_override(
    app: AppContext,
    identity: str,
    server: str,
    item_type: str,
    property_name: str,
    property_value: str,
    duration: str,
    output_format: str,
) -> None:
    """Change one property of a probe or monitor on one server, for a time."""
    with app.directory() as directory:
        server = directory.get_server(server).name
    override = _add(app, server, identity, item_type, property_name, property_value, duration)
    render([override_row(override)], output_format)


@click.command("add-globalmonitoringoverride")
@click.argument("identity")
@_options
@format_option
@pass_app
def add_global_override(
    app: AppContext,
    identity: str,
    item_type: str,
    property_name: str,
    property_value: str,
    duration: str,
    output_format: str,
) -> None:
    """Change one property of a probe or monitor on every server, for a time."""
    override = _add(app, None, identity, item_type, property_name, property_value, duration)
    render([override_row(override)], output_format)


@click.command("get-servermonitoringoverride")
@click.option("--server", required=True)
@format_option
@pass_app
def get_server_overrides(app: AppContext, server: str, output_format: str) -> None:
    """The unexpired overrides of a server (its own ones)."""
    with app.directory() as directory:
        name = directory.get_server(server).name
        overrides = directory.monitoring_overrides(name, time.time())
    render([override_row(o) for o in overrides if o.server is not None], output_format)


@click.command("get-globalmonitoringoverride")
@format_option
@pass_app
def get_global_overrides(app: AppContext, output_format: str) -> None:
    """The unexpired global overrides."""
    with app.directory() as directory:
        overrides = directory.monitoring_overrides(None, time.time())
    render([override_row(o) for o in overrides if o.server is None], output_format)


def _remove(app: AppContext, server: str | None, identity: str, item_type: str, prop: str) -> None:
    item_type = next(t for t in ITEM_TYPES if t.lower() == item_type.lower())
    identity = known_item(identity, item_type)
    with app.directory() as directory:
        removed = directory.remove_monitoring_override(server, identity, item_type, prop)
    if not removed:
        where = f"on {server}" if server else "globally"
        raise UserError(f"no {prop} override of {identity} {where}")
    click.echo(f"removed {removed} override(s) of {identity}")


@click.command("remove-servermonitoringoverride")
@click.argument("identity")
@click.option("--server", required=True)
@click.option("--item-type", required=True, type=click.Choice(ITEM_TYPES, case_sensitive=False))
@click.option("--property-name", required=True)
@pass_app
def remove_server_override(
    app: AppContext, identity: str, server: str, item_type: str, property_name: str
) -> None:
    """Remove a server's override before it expires."""
    with app.directory() as directory:
        server = directory.get_server(server).name
    _remove(app, server, identity, item_type, property_name)


@click.command("remove-globalmonitoringoverride")
@click.argument("identity")
@click.option("--item-type", required=True, type=click.Choice(ITEM_TYPES, case_sensitive=False))
@click.option("--property-name", required=True)
@pass_app
def remove_global_override(
    app: AppContext, identity: str, item_type: str, property_name: str
) -> None:
    """Remove a global override before it expires."""
    _remove(app, None, identity, item_type, property_name)


@click.command("set-servermonitor")
@click.argument("server")
@click.option("--name", "identity", required=True, help="The monitor, e.g. 'POP\\PopCTPMonitor'.")
@click.option("--repairing", required=True, metavar="true|false")
@pass_app
def set_server_monitor(app: AppContext, server: str, identity: str, repairing: str) -> None:
    """Mark a monitor as being repaired (its AlertValue shows Repairing while it alerts)."""
    flag = parse_boolean(repairing, "--repairing")
    identity = known_item(identity, "Monitor")
    with app.directory() as directory:
        directory.set_monitor_repairing(server, identity, flag)
    click.echo(f"{identity} on {server}: repairing {str(flag).lower()}")


COMMANDS = [
    add_server_override,
    add_global_override,
    get_server_overrides,
    get_global_overrides,
    remove_server_override,
    remove_global_override,
    set_server_monitor,
]
