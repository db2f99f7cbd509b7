"""`popguard up` and `popguard down`: an organization on this machine, every service a
real process under supervisord.

One supervisord program per service and one group per logical server, so that
`restart-service` is a real restart with a new process id and `restart-server`
restarts every service of one server. Ctrl-C (or SIGTERM) stops it all; with
`--detach` it keeps running until `popguard down`.

The organization is the topology of DATA/popguard.toml (`--config FILE` installs
one there first), or the default one (cas1, mbx1, mbx2) when it lists no servers.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click

from popguard import paths
from popguard.cli.context import AppContext, pass_app
from popguard.control import permissions, service_user
from popguard.control.ports import Endpoint, held_by, in_use, listener_pids
from popguard.control.service_control import (
    SupervisorControl,
    services_of,
    supervisor_dir,
    write_supervisor_config,
)
from popguard.directory.config import Config, config_file, install_config, load_config, parse_config
from popguard.directory.directory import Directory, Server
from popguard.directory.location import (
    DirectoryLocation,
    SqliteLocation,
    directory_location,
    location_of,
)
from popguard.directory.organization import (
    DEFAULT_FRONTEND_ADDRESS,
    DEFAULT_MAILBOX_ADDRESS,
    DEFAULT_TOPOLOGY_SOURCE,
    SECOND_MAILBOX_ADDRESS,
    Organization,
    check_against_directory,
    check_default_demo,
    default_topology,
    ensure_topology,
    welcome_message,
)
from popguard.errors import UserError
from popguard.net import tls
from popguard.net.server_credentials import server_pairs
from popguard.services.lmtp_client import deliver
from popguard.web.address import listen_address, page_url
from popguard.web.first_operator import FIRST_OPERATOR, ensure_first_operator

STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0

ENDPOINTS = {
    "pop3be": "pop3be",
    "delivery": "lmtp",
    "replication": "replication",
    "pop3": "pop3",
    "health": "health",
    "web": "web",
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
                # Listening, but is it this service? A stranger on the same address and
                # port (another organization) must not pass for it.
                holders = listener_pids(host, port)
                if holders and not held_by(status.pid, holders):
                    raise UserError(
                        f"{server}/{service}: {host}:{port} is held by another process "
                        f"(pid {', '.join(map(str, sorted(holders)))}), not by this service"
                    )
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


def _listens_on(server: Server, service: str) -> str:
    # The web page stays on loopback unless told otherwise (serve web --listen).
    return listen_address(server.address) if service == "web" else server.address


def _web_lines(app: AppContext, running: list[Server]) -> list[str]:
    """Where the web page is and how to log in (a first operator, made now if none)."""
    pages = [s for s in running if "web" in services_of(s.roles)]
    if not pages:
        return []
    with app.directory() as directory:
        login = ensure_first_operator(directory, app.data)
    lines = []
    for server in pages:
        address = listen_address(server.address)
        lines.append(f"  web page    {page_url(address, server.port('web'))} (on {server.name})")
    if login is not None:
        lines.append(
            f"  web login   user {FIRST_OPERATOR}, password in {login.resolve()} "
            "(more users: popguard new-webuser NAME --role operator|viewer --password-stdin)"
        )
    else:
        lines.append("  web login   the users made with popguard new-webuser")
    return lines


def _read_config(path: Path) -> tuple[str, Config]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    return text, parse_config(text, str(path))


def _host(address: str) -> str:
    """`address` as the host part of a URL: an IPv6 address in brackets."""
    return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address


def _server_line(server: Server) -> str:
    parts = []
    if "frontend" in server.roles:
        parts.append(
            f"POP3 (STLS) port {server.port('pop3')}, POP3 over TLS port {server.port('pop3-tls')}"
        )
    if "mailbox" in server.roles:
        parts.append(
            f"back end ports {server.port('pop3be')} and {server.port('pop3be-tls')}, "
            f"LMTP {server.port('lmtp')} (from other mailbox servers {server.port('lmtp-peer')}), "
            f"replication {server.port('replication')}"
        )
    parts.append(f"health {server.port('health')}")
    kind = " and ".join(
        what
        for role, what in (("frontend", "front end"), ("mailbox", "mailbox server"))
        if role in server.roles
    )
    return f"  {kind} {server.name} on {server.address}: {', '.join(parts)}"


def _database_lines(org: Organization) -> list[str]:
    lines = []
    for name, copies in org.databases.items():
        active = [c.server for c in copies if c.is_active]
        passive = [c.server for c in copies if not c.is_active]
        where = f"active on {active[0]}" if active else "no active copy"
        rest = f" with passive copies on {', '.join(passive)}" if passive else " (no other copy)"
        lines.append(f"  database {name} {where}{rest}")
    return lines


def _summary(
    app: AppContext,
    org: Organization,
    running: list[Server],
    others: list[str],
    welcome: str,
    detach: bool,
    added: list[str] | None = None,
) -> str:
    """What runs where, and commands that name real servers of this organization."""
    here = {s.name.lower() for s in running}
    local_frontends = [s for s in org.frontends if s.name.lower() in here]
    local_mailboxes = [s for s in running if "mailbox" in s.roles]
    cas = (local_frontends or org.frontends)[0]
    mbx = (local_mailboxes or org.mailbox_servers)[0]
    demo = org.demo
    ca = tls.TlsMaterial.of(app.data).ca_certificate_file.resolve()
    pop3, pop3s = cas.port("pop3"), cas.port("pop3-tls")
    host = _host(cas.address)
    command = f"{shlex.quote(sys.argv[0])} --data {shlex.quote(str(app.data))}"
    credentials = f"'{demo.address}:{demo.password}'"
    if added is not None:
        lines = ["", f"popguard added {', '.join(added) or 'nothing'} to this host"]
    else:
        lines = ["", "popguard is up"]
    lines += [_server_line(server) for server in running]
    lines += _database_lines(org)
    topology = {s.name.lower() for s in org.servers}
    elsewhere = [name for name in others if name.lower() in topology]
    unlisted = [name for name in others if name.lower() not in topology]
    if elsewhere:
        lines.append(f"  not started here (for other hosts, --servers): {', '.join(elsewhere)}")
    if unlisted:
        lines.append(
            f"  not started (in the directory, not in the topology): {', '.join(unlisted)}"
        )
    lines += _web_lines(app, running)
    lines.append(f"  CA file     {ca}")
    if demo.here:
        lines.append(
            f"  demo mailbox {demo.address} (in {demo.database})  password {demo.password}{welcome}"
        )
    else:
        lines.append(
            f"  demo mailbox {demo.address} (in {demo.database}): kept by the host that runs "
            f"{demo.active_server}, where {demo.database} is active; not by this one"
        )
    lines.append("")
    if demo.here:
        if len(org.frontends) > 1:
            names = ", ".join(s.name for s in org.frontends)
            lines.append(
                f"Read the demo mailbox through front end {cas.name} (any of {names} serves "
                "it) with curl (list, then fetch message 1):"
            )
        else:
            lines.append(
                f"Read the demo mailbox through front end {cas.name} with curl "
                "(list, then fetch message 1):"
            )
        lines += [
            f"  curl --ssl-reqd --cacert {ca} -u {credentials} pop3://{host}:{pop3}/",
            f"  curl --cacert {ca} -u {credentials} pop3s://{host}:{pop3s}/1",
        ]
    lines += [
        "Deliver another message:",
        f"  {command} send-message --to {demo.address} --file message.eml",
        f"See the health of {mbx.name}'s POP3 service, and run a probe now:",
        f"  {command} get-serverhealth {mbx.name} --health-set-like 'POP*'",
        f"  {command} invoke-monitoringprobe 'POP\\PopCTPProbe' --server {cas.name} --format list",
    ]
    if len(org.mailbox_servers) > 1:
        lines += [
            f"See the copies, and move the databases active on {mbx.name} to their other "
            "copies (and back with false):",
            f"  {command} get-mailboxdatabasecopystatus",
            f"  {command} set-mailboxserver {mbx.name} "
            "--database-copy-activation-disabled-and-move-now true",
        ]
    else:
        lines += ["See the copies:", f"  {command} get-mailboxdatabasecopystatus"]
    restartable = (local_mailboxes or running or [mbx])[0]
    lines += [
        "Restart a service (a real restart: see the new process id), and see what the",
        "health engine repaired by itself, and the alerts it sent:",
        f"  {command} restart-service {services_of(restartable.roles)[0]} "
        f"--server {restartable.name}",
        f"  {command} get-recoveryactions --server {mbx.name}",
        f"  {command} get-alerts --server {mbx.name}",
        f"Stop it all: {command} down" if detach else "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)


@click.command("up")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A topology (and settings) file: checked, then installed as DATA/popguard.toml.",
)
@click.option(
    "--replace-config",
    is_flag=True,
    help="Replace a DATA/popguard.toml whose content differs from --config's.",
)
@click.option(
    "--servers",
    "server_names",
    metavar="NAME[,NAME...]",
    help="Run only these servers here (the others run on other hosts); on a host already "
    "up, add them. Default: every server of the topology.",
)
@click.option(
    "--frontend-address",
    help=f"cas1's [default: {DEFAULT_FRONTEND_ADDRESS}] (default organization only).",
)
@click.option(
    "--address", help=f"mbx1's [default: {DEFAULT_MAILBOX_ADDRESS}] (default organization only)."
)
@click.option(
    "--second-address",
    help=f"mbx2's [default: {SECOND_MAILBOX_ADDRESS}] (default organization only).",
)
@click.option(
    "--detach", is_flag=True, help="Return once everything runs; `popguard down` stops it."
)
@click.option(
    "--service-user",
    "service_user_name",
    envvar=service_user.SERVICE_USER_VARIABLE,
    default=service_user.DEFAULT_SERVICE_USER,
    show_default=True,
    help="Started as root: the user the services run as (made if missing; the data "
    "folder becomes its, the CA key stays root's). `root` keeps them root's. Also "
    f"${service_user.SERVICE_USER_VARIABLE}.",
)
@pass_app
def up(
    app: AppContext,
    config_path: Path | None,
    replace_config: bool,
    server_names: str | None,
    frontend_address: str | None,
    address: str | None,
    second_address: str | None,
    detach: bool,
    service_user_name: str,
) -> None:
    """Start the organization of DATA/popguard.toml, or by default a front end (cas1) and
    two mailbox servers (mbx1, mbx2); with a demo mailbox."""
    data = app.data.resolve()
    control = SupervisorControl(data)
    names = _parse_servers(server_names)
    already_up = control.alive()
    if already_up and not names:
        raise UserError(f"popguard is already up for {data} (`popguard down` stops it)")
    # A new data folder is made 0700 by the umask, once the configuration is checked.
    permissions.check_owner_only(data)
    user = _service_user(data, service_user_name) if os.geteuid() == 0 else None
    if replace_config and config_path is None:
        raise UserError("--replace-config needs --config FILE")
    if config_path is not None:
        text, config = _read_config(config_path)
        source = str(config_path)
    else:
        config, source = load_config(app.data), str(config_file(app.data))
    given = [
        option
        for option, value in (
            ("--frontend-address", frontend_address),
            ("--address", address),
            ("--second-address", second_address),
        )
        if value is not None
    ]
    if config.servers and given:
        raise UserError(
            f"{given[0]} is for the default organization; {source} lists its [[servers]] "
            "with their addresses"
        )
    if not config.servers:
        check_default_demo(config.demo, source)
    # A file that names another directory ([directory] path) is installed first, so
    # that the checks below read that directory; a refusal puts the old file back.
    checking = _config_for_checks(app.data, config_path, config, replace_config)
    with checking, app.directory() as directory:
        if config.servers:
            topology = config
        else:
            topology = default_topology(
                directory, frontend_address, address, second_address, config.demo
            )
            source = DEFAULT_TOPOLOGY_SOURCE
        # Everything is checked before anything is written.
        check_against_directory(directory, topology, source)
        in_directory = {s.name.lower(): s for s in directory.list_servers()}
        in_topology = {s.name.lower() for s in topology.servers}
        for name in names:
            if name.lower() not in in_topology | set(in_directory):
                raise UserError(
                    f"--servers: {name} is not a server of {source} nor of the directory"
                )
    with app.directory() as directory:
        if config_path is not None:
            install_config(app.data, text, str(config_path), replace=replace_config)
        here = {name.lower() for name in names} if names else None
        new_organization = not directory.list_servers()
        org = ensure_topology(directory, topology, source, here)
        if new_organization:
            # The host whose `up` makes the organization keeps its CA, wherever the
            # directory lives; other hosts get certificates from it (export/import).
            tls.TlsMaterial(paths.tls_dir(data)).ensure_ca()
        known = {s.name.lower(): s for s in directory.list_servers()}
        chosen = [known[name.lower()] for name in names] if names else org.servers
        chosen_names = {s.name.lower() for s in chosen}
        others = [s.name for s in directory.list_servers() if s.name.lower() not in chosen_names]
    # Mailbox servers first: the front ends' first logins find their back ends up.
    running = [s for s in chosen if "mailbox" in s.roles]
    running += [s for s in chosen if "mailbox" not in s.roles]
    if already_up:
        supervised = {name.lower() for name in control.servers()}
        running = [s for s in running if s.name.lower() not in supervised]
        if not running:
            raise UserError(
                f"popguard is already up for {data} with {', '.join(names)} "
                "(`popguard down` stops it)"
            )
    servers = {s.name: services_of(s.roles) for s in running}
    # Every address and port is checked before anything starts: a second organization on
    # addresses in use would otherwise crash-loop and be taken for the first.
    busy = [
        why
        for s in running
        for name, port in sorted(s.ports.items())
        if (why := in_use(Endpoint(s.name, name, s.address, port)))
    ]
    if busy:
        more = f" (and {len(busy) - 1} more)" if len(busy) > 1 else ""
        raise UserError(f"cannot start: {busy[0]}{more}")
    if user is not None:
        ports = [(f"{s.name}'s {name}", port) for s in running for name, port in s.ports.items()]
        service_user.check_ports(sorted(ports), user)
        if not user.is_root or data.stat().st_uid != 0:  # root's own folder: nothing to give
            _give_folder(data, running, user)
            control = SupervisorControl(data)  # its socket is in the new owner's folder
    endpoints = [
        (s.name, service, _listens_on(s, service), s.port(ENDPOINTS[service]))
        for s in running
        for service in servers[s.name]
    ]
    if already_up:
        added = control.add_servers(servers)
        _wait_until_up(control, None, endpoints)
        welcome = _welcome(app, org)
        click.echo(_summary(app, org, running, others, welcome, detach=True, added=added))
        return
    folder = supervisor_dir(data)
    supervisor_file = write_supervisor_config(data, servers, daemon=detach)
    # SIGTERM (from a script or a supervisor) stops everything as Ctrl-C does; and
    # Ctrl-C itself even when `up` was started from a shell's background job, which
    # starts its children with SIGINT ignored: `up` would then never stop.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    supervisord: subprocess.Popen[bytes] | None = None
    try:
        # As the folder's owner: every service is then that user's, and no process of
        # the organization is root's.
        owner = None if user is None or user.is_root else user
        supervisord = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(supervisor_file)],
            user=owner.uid if owner else None,
            group=owner.gid if owner else None,
            extra_groups=[] if owner else None,
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
        welcome = _welcome(app, org)
        click.echo(_summary(app, org, running, others, welcome, detach))
        if detach:
            return
        while supervisord is not None and supervisord.poll() is None:
            time.sleep(0.5)
        if supervisord is not None and supervisord.returncode == 0:
            # Stopped as asked (Ctrl-C reaches it too, or `popguard down`): no error.
            click.echo("\nsupervisord stopped every service")
            return
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


def _service_user(data: Path, name: str) -> service_user.ServiceUser:
    """Root's `up`: the user the services will run as. A user the operator named must
    be able to run them (one line if not); the default one falls back to root, saying
    why on stderr, when it could not (a clone and its data folder under /root), so that
    a first try as root still works."""
    user = service_user.ensure_service_user(name)
    if user.is_root:
        return user
    problem = service_user.why_unable(data, user)
    if problem is None:
        return user
    source = click.get_current_context().get_parameter_source("service_user_name")
    if source is not click.core.ParameterSource.DEFAULT:
        raise UserError(f"{problem}; or keep the services root's with --service-user root")
    click.echo(
        f"popguard: the services run as root, not {user.name}: {problem} (or say "
        "--service-user root)",
        err=True,
    )
    return service_user.ServiceUser("root", 0, 0)


def _give_folder(data: Path, running: list[Server], user: service_user.ServiceUser) -> None:
    """Root, before the services start as `user`: make the certificates they will show
    (they cannot sign: the CA key stays root's), then give `user` the data folder."""
    material = tls.TlsMaterial.of(data)
    if not user.is_root and material.ca_key_file.exists():
        with Directory(data) as directory:
            for server in running:
                settings, _ = directory.pop_settings(server.name)
                server_pairs(material, server.name, server.roles, server.address,
                             settings.X509CertificateName)  # fmt: skip
    if data.stat().st_uid != user.uid:
        os.chown(data, user.uid, user.gid)
    service_user.hand_over(data, user.uid, user.gid)


def _parse_servers(value: str | None) -> list[str]:
    """--servers NAME[,NAME...]: the names once each, in the order given."""
    if value is None:
        return []
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise UserError(f"--servers wants NAME[,NAME...], got {value!r}")
    return list({name.lower(): name for name in names}.values())


@contextlib.contextmanager
def _config_for_checks(
    data: Path, config_path: Path | None, config: Config, replace: bool
) -> Iterator[None]:
    """The new file in place while the checks run, when it moves the directory; the
    old one (or none) back if they refuse. A SQLite directory named elsewhere must
    exist: a host joins an organization that another host's `up` made."""
    current = directory_location(data)
    wanted = location_of(config.directory, data)
    if config_path is None or wanted == current:
        _check_directory_exists(data, current)
        yield
        return
    if not replace and config_file(data).exists():
        # install_config refuses this below anyway; say so before anything is written.
        install_config(data, config_path.read_text(), str(config_path), replace=False)
    _check_directory_exists(data, wanted, str(config_path))
    target = config_file(data)
    before = target.read_text() if target.exists() else None
    install_config(data, config_path.read_text(), str(config_path), replace=True)
    try:
        yield
    except BaseException:
        if before is None:
            target.unlink(missing_ok=True)
        else:
            install_config(data, before, str(target), replace=True)
        raise


def _check_directory_exists(
    data: Path, location: DirectoryLocation, source: str | None = None
) -> None:
    named = isinstance(location, SqliteLocation) and location.path != data / "directory.sqlite"
    if named and isinstance(location, SqliteLocation) and not location.path.exists():
        raise UserError(
            f"{source or config_file(data)}: directory.path: {location.path} does not exist: "
            "a host joins an organization that `popguard up` made on its first host"
        )


def _welcome(app: AppContext, org: Organization) -> str:
    """A first message for a demo mailbox made just now (on the host that keeps it)."""
    if not org.demo.new:
        return ""
    with app.directory() as directory:
        result = deliver(
            directory, org.demo.address, welcome_message(org.demo), "postmaster@popguard.test"
        )
    return f"\n  welcome message: {result.reply}"


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
