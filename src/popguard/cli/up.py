"""`popguard up` and `popguard down`: an organization on this machine, every service a
real process under supervisord.

One supervisord program per service and one group per logical server, so that
`restart-service` is a real restart with a new process id and `restart-server`
restarts every service of one server. Ctrl-C (or SIGTERM) stops it all; with
`--detach` it keeps running until `popguard down`.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import click

from .. import tls
from ..errors import UserError
from ..lmtp_client import deliver
from ..organization import (
    DEFAULT_FRONTEND_ADDRESS,
    DEFAULT_MAILBOX_ADDRESS,
    SECOND_MAILBOX_ADDRESS,
    WELCOME_MESSAGE,
    ensure_demo_organization,
)
from ..service_control import (
    SupervisorControl,
    services_of,
    supervisor_config,
    supervisor_dir,
)
from .context import AppContext, pass_app

STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0

ENDPOINTS = {
    "pop3be": "pop3be",
    "delivery": "lmtp",
    "replication": "replication",
    "pop3": "pop3",
    "health": "health",
}


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _wait_until_up(
    control: SupervisorControl,
    supervisord: subprocess.Popen[bytes] | None,
    endpoints: list[tuple[str, str, str, int]],
) -> None:
    """Every service Running and listening, or one line saying which is not."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    pending = list(endpoints)
    while pending and time.monotonic() < deadline:
        if supervisord is not None and supervisord.poll() not in (None, 0):
            raise UserError(f"supervisord exited with status {supervisord.returncode}")
        server, service, host, port = pending[0]
        if control.alive():
            (status,) = control.status(server, [service])
            if status.state == "Failed":
                raise UserError(
                    f"{server}/{service} failed to start: {status.detail or 'see its log'}"
                )
            if status.state == "Running" and _listening(host, port):
                pending.pop(0)
                continue
        time.sleep(0.1)
    if pending:
        server, service, host, port = pending[0]
        raise UserError(
            f"{server}/{service} did not listen on {host}:{port} in {STARTUP_TIMEOUT:.0f}s"
        )


def _stop_supervisord(
    control: SupervisorControl, supervisord: subprocess.Popen[bytes] | None
) -> None:
    if supervisord is not None and supervisord.poll() is None:
        supervisord.terminate()  # supervisord stops every program, then itself
        try:
            supervisord.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            supervisord.kill()
            supervisord.wait()
    elif control.alive():
        control.shutdown()


@click.command("up")
@click.option(
    "--frontend-address", default=DEFAULT_FRONTEND_ADDRESS, show_default=True, help="cas1's."
)
@click.option("--address", default=DEFAULT_MAILBOX_ADDRESS, show_default=True, help="mbx1's.")
@click.option("--second-address", default=SECOND_MAILBOX_ADDRESS, show_default=True, help="mbx2's.")
@click.option(
    "--detach", is_flag=True, help="Return once everything runs; `popguard down` stops it."
)
@pass_app
def up(
    app: AppContext, frontend_address: str, address: str, second_address: str, detach: bool
) -> None:
    """Start a front end (cas1) and two mailbox servers (mbx1, mbx2) with a demo mailbox."""
    data = app.data.resolve()
    with app.directory() as directory:
        org = ensure_demo_organization(directory, frontend_address, address, second_address)
    cas, demo = org.frontend, org.demo
    control = SupervisorControl(data)
    if control.alive():
        raise UserError(f"popguard is already up for {data} (`popguard down` stops it)")
    servers = {s.name: services_of(s.roles) for s in [*org.mailbox_servers, cas]}
    folder = supervisor_dir(data)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    config = folder / "supervisord.conf"
    config.write_text(supervisor_config(data, servers, daemon=detach))
    endpoints = [
        (s.name, service, s.address, s.port(ENDPOINTS[service]))
        for s in [*org.mailbox_servers, cas]
        for service in servers[s.name]
    ]
    # SIGTERM (from a script or a supervisor) stops everything as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    supervisord: subprocess.Popen[bytes] | None = None
    try:
        supervisord = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(config)]
        )
        if detach:
            # It forks into the background and returns; a failure to start is its status.
            if supervisord.wait(STARTUP_TIMEOUT) != 0:
                raise UserError(
                    f"supervisord could not start (status {supervisord.returncode}); "
                    f"see {folder / 'supervisord.log'}"
                )
            supervisord = None
        _wait_until_up(control, supervisord, endpoints)
        welcome = ""
        if demo.new:
            with app.directory() as directory:
                result = deliver(
                    directory, demo.address, WELCOME_MESSAGE, "postmaster@popguard.test"
                )
            welcome = f"\n  welcome message: {result.reply}"
        ca = tls.ca_certificate_file(app.data).resolve()
        pop3, pop3s = cas.port("pop3"), cas.port("pop3-tls")
        command = f"{shlex.quote(sys.argv[0])} --data {shlex.quote(str(app.data))}"
        credentials = f"'{demo.address}:{demo.password}'"
        mailbox_lines = "\n".join(
            f"  mailbox server {m.name} on {m.address}: back end ports {m.port('pop3be')} and "
            f"{m.port('pop3be-tls')}, LMTP {m.port('lmtp')}, replication {m.port('replication')}"
            for m in org.mailbox_servers
        )
        click.echo(
            f"""
popguard is up
  front end {cas.name} on {cas.address}: POP3 (STLS) port {pop3}, POP3 over TLS port {pop3s}
{mailbox_lines}
  DB01 is active on mbx1 with a copy on mbx2; DB02 the reverse
  CA file     {ca}
  demo mailbox {demo.address} (in DB01)  password {demo.password}{welcome}

Read the demo mailbox through the front end with curl (list, then fetch message 1):
  curl --ssl-reqd --cacert {ca} -u {credentials} pop3://{cas.address}:{pop3}/
  curl --cacert {ca} -u {credentials} pop3s://{cas.address}:{pop3s}/1
Deliver another message:
  {command} send-message --to {demo.address} --file message.eml
See the health of mbx1's POP3 service, and run a probe now:
  {command} get-serverhealth mbx1 --health-set-like 'POP*'
  {command} invoke-monitoringprobe 'POP\\PopCTPProbe' --server {cas.name} --format list
See the copies, and move mbx1's databases to mbx2 (and back with false):
  {command} get-mailboxdatabasecopystatus
  {command} set-mailboxserver mbx1 --database-copy-activation-disabled-and-move-now true
Restart a service (a real restart: see the new process id):
  {command} restart-service pop3be --server mbx1
{"`popguard down` stops it." if detach else "Press Ctrl-C to stop."}""",
        )
        if detach:
            return
        while supervisord is not None and supervisord.poll() is None:
            time.sleep(0.5)
        raise UserError(
            f"supervisord exited with status {supervisord.returncode if supervisord else '?'}"
        )
    except KeyboardInterrupt:
        click.echo("\nstopping ...")
    except BaseException:
        _stop_supervisord(control, supervisord)
        raise
    _stop_supervisord(control, supervisord)
    click.echo("stopped")


@click.command("down")
@pass_app
def down(app: AppContext) -> None:
    """Stop what `popguard up --detach` started: every service, then supervisord."""
    data = app.data.resolve()
    control = SupervisorControl(data)
    if not control.alive():
        raise UserError(f"popguard is not up for {data}")
    pid = control.pid()
    control.shutdown()
    # supervisord stops every service first, then exits: wait for the process itself.
    deadline = time.monotonic() + STOP_TIMEOUT
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        raise UserError(f"supervisord (pid {pid}) did not stop within {STOP_TIMEOUT:.0f}s")
    click.echo("stopped")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


COMMANDS = [up, down]
