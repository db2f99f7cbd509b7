"""inject-fault and clear-fault: make a service hang or crash, for tests and
demonstrations. Off unless DATA/popguard.toml says `[faults] enabled = true`."""

from __future__ import annotations

import os
import signal
import tomllib

import click

from ..errors import UserError
from ..service_control import SERVICES, control_for
from .context import AppContext, pass_app

KINDS = ("hang", "crash")


def _faults_enabled(app: AppContext) -> None:
    path = app.data / "popguard.toml"
    try:
        config = tomllib.loads(path.read_text())
    except FileNotFoundError:
        config = {}
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    if config.get("faults", {}).get("enabled") is not True:
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
    help="hang: the process stops answering (SIGSTOP); crash: it dies (SIGKILL).",
)
@pass_app
def inject_fault(app: AppContext, server: str, service: str, kind: str) -> None:
    """Make a service hang or crash, to watch popguard find and repair it."""
    _faults_enabled(app)
    name, pid = _pid(app, server, service)
    os.kill(pid, signal.SIGSTOP if kind == "hang" else signal.SIGKILL)
    click.echo(f"{name}/{service} (pid {pid}): {kind}")


@click.command("clear-fault")
@click.option("--server", required=True)
@click.option("--service", required=True, type=click.Choice(SERVICES))
@pass_app
def clear_fault(app: AppContext, server: str, service: str) -> None:
    """Let a hung service run again (a crash needs no clearing: it is restarted)."""
    _faults_enabled(app)
    name, pid = _pid(app, server, service)
    os.kill(pid, signal.SIGCONT)
    click.echo(f"{name}/{service} (pid {pid}): running again")


COMMANDS = [inject_fault, clear_fault]
