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
from ..organization import WELCOME_MESSAGE, ensure_single_server_organization
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


@click.command("up")
@click.option("--address", default="127.0.2.1", show_default=True, help="Address of mbx1.")
@pass_app
def up(app: AppContext, address: str) -> None:
    """Start a mailbox server (POP3 back end and LMTP delivery) with a demo mailbox."""
    with app.directory() as directory:
        server, demo = ensure_single_server_organization(directory, address)
    app.data.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "popguard", "--data", str(app.data), "serve"]
    processes: dict[str, subprocess.Popen[bytes]] = {}
    # SIGTERM (from a script or a supervisor) stops everything as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        for service, endpoint in (("pop3be", "pop3be"), ("delivery", "lmtp")):
            processes[service] = subprocess.Popen([*base, service, "--server", server.name])
            _wait_for_port(server.address, server.port(endpoint), processes[service], service)
        welcome = ""
        if demo.new:
            with app.directory() as directory:
                result = deliver(
                    directory, demo.address, WELCOME_MESSAGE, "postmaster@popguard.test"
                )
            welcome = f"\n  welcome message: {result.reply}"
        ca = tls.ca_certificate_file(app.data).resolve()
        pop3, pop3s = server.port("pop3be"), server.port("pop3be-tls")
        command = f"{shlex.quote(sys.argv[0])} --data {shlex.quote(str(app.data))}"
        click.echo(
            f"""
popguard is up: mailbox server {server.name} on {server.address}
  POP3 (STLS) {server.address}:{pop3}   POP3 over TLS {server.address}:{pop3s}
  LMTP        {server.address}:{server.port("lmtp")}
  CA file     {ca}
  demo mailbox {demo.address}  password {demo.password}{welcome}

Read the demo mailbox with curl (list, then fetch message 1):
  curl --ssl-reqd --cacert {ca} -u '{demo.address}:{demo.password}' pop3://{server.address}:{pop3}/
  curl --cacert {ca} -u '{demo.address}:{demo.password}' pop3s://{server.address}:{pop3s}/1
Deliver another message:
  {command} send-message --to {demo.address} --file message.eml
Press Ctrl-C to stop.""",
        )
        while True:
            for service, process in processes.items():
                if process.poll() is not None:
                    raise UserError(f"{service} exited with status {process.returncode}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        click.echo("\nstopping ...")
    finally:
        _stop(processes)
    click.echo("stopped")


COMMANDS = [up]
