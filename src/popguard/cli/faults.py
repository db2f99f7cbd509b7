"""inject-fault and clear-fault: make a service hang, crash, go slow or refuse logins,
for tests and demonstrations. Off unless DATA/popguard.toml says
`[faults] enabled = true`. Slow and refuse-auth outlast a restart (they live in a
file the POP3 services read every second): a fault that a restart does not fix."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import click

from popguard import paths
from popguard.cli.context import AppContext, pass_app
from popguard.control.faults import Fault, read_fault, write_fault
from popguard.control.service_control import SERVICES, control_for
from popguard.directory.config import config_file, load_config
from popguard.errors import UserError

KINDS = ("hang", "crash", "slow", "refuse-auth")
POP3_SERVICES = ("pop3be", "pop3")
KINDS_IN_FILES = ("slow", "refuse-auth")


def _faults_enabled(app: AppContext) -> None:
    if not load_config(app.data).faults.enabled:
        path = config_file(app.data)
        raise UserError(f"fault injection is off: set `[faults] enabled = true` in {path}")


def _pid(app: AppContext, server: str, service: str) -> tuple[str, int]:
    with app.directory() as directory:
        name = directory.get_server(server).name
    (status,) = control_for(app.data).status(name, [service])
    if status.pid is None:
        raise UserError(f"{name}/{service} is not running ({status.state})")
    return name, status.pid


@click.command("inject-fault")
@click.option("--server", required=True)
@click.option("--service", required=True, type=click.Choice(SERVICES))
@click.option(
    "--kind",
    required=True,
    type=click.Choice(KINDS),
    help="hang: the process stops answering (SIGSTOP); crash: it dies (SIGKILL); "
    "slow: every reply waits --seconds; refuse-auth: logins get -ERR [SYS/TEMP].",
)
@click.option("--seconds", type=click.FloatRange(0, 600), default=5.0, show_default=True,
              help="For slow: how long each reply waits.")  # fmt: skip
@pass_app
def inject_fault(app: AppContext, server: str, service: str, kind: str, seconds: float) -> None:
    """Make a service fail, to watch popguard find and repair it."""
    _faults_enabled(app)
    if kind in KINDS_IN_FILES:
        if service not in POP3_SERVICES:
            raise UserError(f"{kind} is a fault of the POP3 services (pop3be, pop3), not {service}")
        with app.directory() as directory:
            name = directory.get_server(server).name
        write_fault(paths.server_folder(app.data, name).fault_file(service), Fault(kind, seconds))
        click.echo(f"{name}/{service}: {kind} (within a second; until clear-fault)")
        return
    name, pid = _pid(app, server, service)
    os.kill(pid, signal.SIGSTOP if kind == "hang" else signal.SIGKILL)
    click.echo(f"{name}/{service} (pid {pid}): {kind}")


def _stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal (state T in /proc), as hang leaves it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may hold spaces.
    return stat.rpartition(")")[2].split()[0] == "T"


@click.command("clear-fault")
@click.option("--server", required=True)
@click.option("--service", required=True, type=click.Choice(SERVICES))
@pass_app
def clear_fault(app: AppContext, server: str, service: str) -> None:
    """End a fault: a hung service runs again, slow and refuse-auth stop (a crash needs
    no clearing: the supervisor starts the service again)."""
    _faults_enabled(app)
    with app.directory() as directory:
        name = directory.get_server(server).name
    fault_file = paths.server_folder(app.data, name).fault_file(service)
    in_file = read_fault(fault_file)
    fault_file.unlink(missing_ok=True)
    ended = []
    if in_file is not None:
        ended.append(f"slow ({in_file.seconds:g}s a reply)" if in_file.kind == "slow"
                     else in_file.kind)  # fmt: skip
    try:
        name, pid = _pid(app, server, service)
    except UserError:  # not under a supervisor, or not running: nothing hangs
        pid = None
    if pid is not None:
        was_stopped = _stopped(pid)
        os.kill(pid, signal.SIGCONT)  # harmless on a running process
        if was_stopped:
            ended.append("hang")
    where = f"{name}/{service}" + (f" (pid {pid})" if pid is not None else "")
    click.echo(f"{where}: ended {' and '.join(ended)}" if ended else f"{where}: no fault to end")


COMMANDS = [inject_fault, clear_fault]
