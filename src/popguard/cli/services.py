"""start-service, stop-service, restart-service, get-service, restart-server."""

from __future__ import annotations

import datetime
import subprocess
from typing import Any

import click

from popguard.cli.context import AppContext, pass_app
from popguard.cli.render import format_option, render
from popguard.control.service_control import (
    SERVICES,
    ServiceStatus,
    SupervisorControl,
    SystemdControl,
    control_for,
    services_of,
)
from popguard.directory.config import config_file, load_config
from popguard.errors import UserError

FRONTEND_ROLE = "frontend"  # one of directory.ROLES: the servers clients connect to


def status_row(status: ServiceStatus, supervisor: str) -> dict[str, Any]:
    uptime = status.uptime_seconds
    return {
        "Server": status.server,
        "Name": status.service,
        "Status": status.state,
        "ProcessId": status.pid,
        "Uptime": str(datetime.timedelta(seconds=int(uptime))) if uptime is not None else "",
        "Supervisor": supervisor,
        "Detail": status.detail,
    }


def _service_of(app: AppContext, server: str, service: str) -> str:
    with app.directory() as directory:
        host = directory.get_server(server)
    if service not in services_of(host.roles):
        raise UserError(f"{host.name} runs {', '.join(services_of(host.roles))}; not {service}")
    return host.name


def _action(verb: str, help_text: str) -> click.Command:
    @click.command(f"{verb}-service", help=help_text)
    @click.argument("service", type=click.Choice(SERVICES))
    @click.option("--server", required=True)
    @format_option
    @pass_app
    def command(app: AppContext, service: str, server: str, output_format: str) -> None:
        server = _service_of(app, server, service)
        control = control_for(app.data)
        status = getattr(control, verb)(server, service)
        render([status_row(status, control.name)], output_format)

    return command


start_service = _action("start", "Start one service of a server.")
stop_service = _action("stop", "Stop one service of a server.")
restart_service = _action(
    "restart", "Restart one service of a server (a new process; the old one stops cleanly)."
)


@click.command("get-service")
@click.option("--server", required=True)
@format_option
@pass_app
def get_service(app: AppContext, server: str, output_format: str) -> None:
    """Each service of a server: running or not, process id, uptime."""
    with app.directory() as directory:
        host = directory.get_server(server)
    control = control_for(app.data)
    statuses = control.status(host.name, services_of(host.roles))
    render([status_row(s, control.name) for s in statuses], output_format)


@click.command("restart-server")
@click.argument("server")
@click.option(
    "--force", is_flag=True, help="Even while it holds active copies or is the only front end."
)
@click.option(
    "--reboot-host",
    is_flag=True,
    help="Reboot the machine instead (systemd only, and only with [host] allow_reboot = true).",
)
@format_option
@pass_app
def restart_server(
    app: AppContext, server: str, force: bool, reboot_host: bool, output_format: str
) -> None:
    """Restart every service of a logical server, once it holds no active copy and is
    not the only front end."""
    with app.directory() as directory:
        host = directory.get_server(server)
        active = [
            c.database
            for c in directory.database_copies()
            if c.is_active and c.server.lower() == host.name.lower()
        ]
        front_ends = [s.name for s in directory.list_servers() if FRONTEND_ROLE in s.roles]
    if active and not force:
        raise UserError(
            f"{host.name} holds the active copy of {', '.join(active)}: move them first "
            f"(set-mailboxserver {host.name} --database-copy-activation-disabled-and-move-now "
            "true), or --force"
        )
    if reboot_host:  # its own opt-in, [host] allow_reboot: the whole machine goes down
        _reboot(app, control_for(app.data))
        return
    if front_ends == [host.name] and not force:
        raise UserError(
            f"{host.name} is the only front end: no client reaches any mailbox while it "
            "restarts; add another front end first, or --force"
        )
    control = control_for(app.data)
    services = services_of(host.roles)
    for service in services:
        control.stop(host.name, service)
    statuses = [control.start(host.name, service) for service in services]
    render([status_row(s, control.name) for s in statuses], output_format)


def _reboot(app: AppContext, control: SupervisorControl | SystemdControl) -> None:
    if not load_config(app.data).host.allow_reboot:
        raise UserError(
            f"rebooting the host is off: set `[host] allow_reboot = true` in "
            f"{config_file(app.data)} (every logical server on this machine goes down with it)"
        )
    if not isinstance(control, SystemdControl):
        raise UserError("the host is rebooted only where systemd runs popguard's services")
    done = subprocess.run(["systemctl", "reboot"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise UserError(f"systemctl reboot failed: {done.stderr.strip()}")
    click.echo("rebooting the host")


COMMANDS = [start_service, stop_service, restart_service, get_service, restart_server]
