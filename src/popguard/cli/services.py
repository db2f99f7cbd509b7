"""start-service, stop-service, restart-service, get-service, restart-server."""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

import click

from popguard import paths
from popguard.cli.context import AppContext, pass_app
from popguard.cli.render import format_option, render
from popguard.control.ports import Endpoint, in_use
from popguard.control.service_control import (
    SERVICES,
    SupervisorControl,
    SystemdControl,
    control_for,
    services_of,
)
from popguard.control.service_rows import status_row
from popguard.directory.config import config_file, load_config
from popguard.errors import UserError

if TYPE_CHECKING:
    from popguard.directory.directory import Server

FRONTEND_ROLE = "frontend"  # one of directory.ROLES: the servers clients connect to


def _service_of(app: AppContext, server: str, service: str) -> Server:
    with app.directory() as directory:
        host = directory.get_server(server)
    if service not in services_of(host.roles):
        raise UserError(f"{host.name} runs {', '.join(services_of(host.roles))}; not {service}")
    return host


def control_here(
    app: AppContext, server: Server, add: bool = False
) -> SupervisorControl | SystemdControl:
    """The supervisor of this host, which must run `server`.

    A host runs only its own servers (`up --servers`): one its supervisord does not
    run is another host's, said in one line, unless `add` and it can run here (its
    address is this machine's and its ports are free): a server made after `up`
    (new-server) then joins this host's supervisord, all its services with it.
    """
    control = control_for(app.data)
    if not isinstance(control, SupervisorControl) or control.runs(server.name):
        return control
    data = app.data.resolve()
    mine = ", ".join(control.servers()) or "no server"
    not_here = (
        f"{server.name} runs on no supervisor of this host: the supervisord of {data} runs {mine}"
    )
    if not add:
        raise UserError(f"{not_here} (start it here with start-service, or on its own host)")
    with app.directory() as directory:
        active = [
            c.database
            for c in directory.database_copies()
            if c.is_active and c.server.lower() == server.name.lower()
        ]
    if active and not paths.server_folder(app.data, server.name).root.exists():
        # Its active copies' files are on the host it ran on: started here, it would
        # serve empty databases.
        raise UserError(
            f"{not_here}, and it holds the active copy of {', '.join(active)} with no files "
            f"in {data}: start it on its own host (`popguard up --servers {server.name}` there)"
        )
    busy = [
        why
        for endpoint, port in sorted(server.ports.items())
        if (why := in_use(Endpoint(server.name, endpoint, server.address, port)))
    ]
    if busy:
        raise UserError(f"{not_here}, and it cannot run here: {busy[0]}")
    control.add_servers({server.name: services_of(server.roles)})
    click.echo(f"added {server.name} ({', '.join(services_of(server.roles))}) to {data}", err=True)
    return control


def _action(verb: str, help_text: str) -> click.Command:
    @click.command(f"{verb}-service", help=help_text)
    @click.argument("service", type=click.Choice(SERVICES))
    @click.option("--server", required=True)
    @format_option
    @pass_app
    def command(app: AppContext, service: str, server: str, output_format: str) -> None:
        host = _service_of(app, server, service)
        control = control_here(app, host, add=verb in ("start", "restart"))
        status = getattr(control, verb)(host.name, service)
        render([status_row(status, control.name)], output_format)

    return command


start_service = _action("start", "Start one service of a server.")
stop_service = _action("stop", "Stop one service of a server.")
restart_service = _action(
    "restart",
    "Restart one service of a server: pop3, pop3be and delivery start new workers and "
    "the old ones finish their sessions (no connection refused); the others are a new "
    "process, the old one stopping cleanly.",
)


@click.command("get-service")
@click.option("--server", required=True)
@format_option
@pass_app
def get_service(app: AppContext, server: str, output_format: str) -> None:
    """Each service of a server: running or not, process id, uptime."""
    with app.directory() as directory:
        host = directory.get_server(server)
    control = control_here(app, host)
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
    control = control_here(app, host)
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
