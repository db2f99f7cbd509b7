"""`popguard up`: start an organization on this machine and keep it running.

Each service is its own OS process (`popguard serve ...`), so restarting one is
a real restart. Ctrl-C (or SIGTERM) stops them all.
"""

from __future__ import annotations

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
from .context import AppContext, pass_app

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def _wait_for_port(host: str, port: int, process: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"{name} exited during start-up with status {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise UserError(f"{name} did not listen on {host}:{port} within {STARTUP_TIMEOUT:.0f}s")


def _stop(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for process in processes.values():
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


ENDPOINTS = {
    "pop3be": "pop3be",
    "delivery": "lmtp",
    "replication": "replication",
    "pop3": "pop3",
    "health": "health",
}


@click.command("up")
@click.option(
    "--frontend-address", default=DEFAULT_FRONTEND_ADDRESS, show_default=True, help="cas1's."
)
@click.option("--address", default=DEFAULT_MAILBOX_ADDRESS, show_default=True, help="mbx1's.")
@click.option("--second-address", default=SECOND_MAILBOX_ADDRESS, show_default=True, help="mbx2's.")
@pass_app
def up(app: AppContext, frontend_address: str, address: str, second_address: str) -> None:
    """Start a front end (cas1) and two mailbox servers (mbx1, mbx2) with a demo mailbox."""
    with app.directory() as directory:
        org = ensure_demo_organization(directory, frontend_address, address, second_address)
    cas, demo = org.frontend, org.demo
    base = [sys.executable, "-m", "popguard", "--data", str(app.data), "serve"]
    processes: dict[str, subprocess.Popen[bytes]] = {}
    # SIGTERM (from a script or a supervisor) stops everything as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        services = [
            (mbx, service)
            for mbx in org.mailbox_servers
            for service in ("pop3be", "delivery", "replication", "health")
        ]
        for server, service in [*services, (cas, "pop3"), (cas, "health")]:
            name = f"{server.name}/{service}"
            processes[name] = subprocess.Popen([*base, service, "--server", server.name])
            _wait_for_port(server.address, server.port(ENDPOINTS[service]), processes[name], name)
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
Press Ctrl-C to stop.""",
        )
        while True:
            for name, process in processes.items():
                if process.poll() is not None:
                    raise UserError(f"{name} exited with status {process.returncode}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        click.echo("\nstopping ...")
    finally:
        _stop(processes)
    click.echo("stopped")


COMMANDS = [up]
