"""Starting, stopping and restarting popguard's services: one interface, two real
implementations.

`popguard up` runs every service under supervisord (from PyPI), one program per
service and one group per logical server, controlled over XML-RPC on a Unix
socket. Production hosts use the systemd units in `deploy/systemd/`
(`popguard-SERVICE@SERVER.service`, all of a server's under `popguard@SERVER.target`),
controlled with systemctl. The commands and the responders use whichever runs here.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from supervisor.xmlrpc import SupervisorTransport

from popguard import paths
from popguard.control import permissions, service_user
from popguard.control.exit_listener import SUBSCRIBED, read_exits
from popguard.errors import UserError

SERVICES = ("pop3be", "delivery", "replication", "pop3", "health", "web")
ROLE_SERVICES = {
    "mailbox": ("pop3be", "delivery", "replication", "health"),
    "frontend": ("pop3", "health", "web"),
}

KILL_RESTART_TIMEOUT = 15.0  # seconds for supervisord to start a killed process again
# The services that are a master and its workers (net/workers.py): restarting one
# restarts its workers (SIGHUP to the master), which refuses no connection.
WORKER_SERVICES = ("pop3be", "delivery", "pop3")
WORKER_RESTART_TIMEOUT = 40.0  # seconds for new workers to serve and the old to stop
# The master publishes its workers with its counters every second.
WORKERS_FRESH = 5.0


def worker_pids(data: Path, server: str, service: str, master: int | None) -> tuple[int, ...]:
    """The worker processes of `master`, as its counters last said (none if stale)."""
    if master is None or service not in WORKER_SERVICES:
        return ()
    try:
        published = json.loads(paths.server_folder(data, server).counters_file(service).read_text())
    except (OSError, ValueError):
        return ()
    if (
        not isinstance(published, dict)
        or published.get("ProcessId") != master
        or time.time() - float(published.get("Updated", 0)) > WORKERS_FRESH
    ):
        return ()
    return tuple(int(pid) for pid in published.get("WorkerProcessIds", []))


def services_of(roles: tuple[str, ...]) -> list[str]:
    wanted = [s for role in roles for s in ROLE_SERVICES[role]]
    return [s for s in SERVICES if s in wanted]


@dataclass(frozen=True)
class ServiceStatus:
    server: str
    service: str
    state: str  # Running | Stopped | Starting | Failed | ...
    pid: int | None
    uptime_seconds: float | None
    detail: str = ""
    # Exits the supervisor did not ask for (crashes), counted since the supervisor began.
    unexpected_exits: int | None = None
    workers: tuple[int, ...] = ()  # the master's worker processes (WORKER_SERVICES)


class ServiceControl(Protocol):
    name: str

    def status(self, server: str, services: list[str]) -> list[ServiceStatus]: ...

    def start(self, server: str, service: str) -> ServiceStatus: ...

    def stop(self, server: str, service: str) -> ServiceStatus: ...

    def restart(self, server: str, service: str) -> ServiceStatus: ...

    def kill(self, server: str, service: str) -> ServiceStatus: ...


# supervisord -------------------------------------------------------------------------


def supervisor_dir(data: Path) -> Path:
    return data / "supervisor"


def supervisor_socket(data: Path) -> Path:
    """Short enough for a Unix socket path (108 octets) wherever the data folder is, in
    a private folder of the data folder's owner (supervisord runs as that user: root
    gives the folder to the service user, control/service_user.py)."""
    try:
        owner = data.stat().st_uid
    except FileNotFoundError:  # `up` makes it as this user
        owner = os.getuid()
    folder = Path(tempfile.gettempdir()) / f"popguard-{owner}"
    if os.geteuid() in (0, owner):
        folder.mkdir(mode=0o700, exist_ok=True)
        made_by_root = folder.stat().st_uid == 0 and not any(folder.iterdir())
        if os.geteuid() == 0 and owner != 0 and made_by_root:
            # Made here by root for the service user; never one someone else made.
            os.chown(folder, owner, data.stat().st_gid)
    status = folder.stat() if folder.exists() else None
    if status is None or status.st_uid != owner or status.st_mode & 0o077:
        raise UserError(
            f"{folder} is not the private folder of the data folder's owner (uid {owner}): "
            "remove it and try again"
        )
    digest = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:16]
    return folder / f"{digest}.sock"


def program_name(server: str, service: str) -> str:
    return f"{server}-{service}"


def supervisor_config(data: Path, servers: dict[str, list[str]], daemon: bool = False) -> str:
    """supervisord's configuration: one program per service, one group per server."""
    data = data.resolve()
    folder = supervisor_dir(data)
    lines = [
        "[unix_http_server]",
        f"file={supervisor_socket(data)}",
        "chmod=0700",
        "",
        "[supervisord]",
        f"logfile={folder / 'supervisord.log'}",
        f"pidfile={folder / 'supervisord.pid'}",
        f"childlogdir={folder / 'logs'}",
        f"nodaemon={'false' if daemon else 'true'}",
        "silent=true",
        # supervisord's own default is 022: its logs and the services' output logs
        # would be readable by any local user.
        f"umask={permissions.OWNER_ONLY_UMASK:03o}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{supervisor_socket(data)}",
        "",
    ]
    for server, services in servers.items():
        for service in services:
            log = data / "servers" / server / "logs" / f"{service}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            lines += [
                f"[program:{program_name(server, service)}]",
                f"command={sys.executable} -m popguard --data {data} serve {service} "
                f"--server {server}",
                "autostart=true",
                # A crashed service comes back at once (as Windows restarts a failed
                # service); a hung one is the health engine's to find.
                "autorestart=true",
                "startsecs=1",
                "startretries=5",
                "stopsignal=TERM",
                # Open sessions get 5 s to finish; a hung process is killed after 8.
                "stopwaitsecs=8",
                f"stdout_logfile={log}",
                "stdout_logfile_maxbytes=10MB",
                "stdout_logfile_backups=3",
                "redirect_stderr=true",
                "",
            ]
        programs = ",".join(program_name(server, s) for s in services)
        lines += [f"[group:{server}]", f"programs={programs}", ""]
    lines += [
        "[eventlistener:unexpected-exits]",
        f"command={sys.executable} -m popguard.control.exit_listener {data}",
        f"events={SUBSCRIBED}",
        "autorestart=true",
        # Its standard output is supervisord's event protocol; only errors are logged.
        f"stderr_logfile={folder / 'exit-listener.log'}",
        "",
    ]
    return "\n".join(lines)


def supervisor_config_file(data: Path) -> Path:
    return supervisor_dir(data) / "supervisord.conf"


def _supervised_file(data: Path) -> Path:
    """What the configuration was made from: this host's servers and their services."""
    return supervisor_dir(data) / "servers.json"


def write_supervisor_config(data: Path, servers: dict[str, list[str]], daemon: bool) -> Path:
    """supervisord.conf for these servers, and what it was made from beside it (so that
    a server added to a running host joins the same file)."""
    folder = supervisor_dir(data)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    path = supervisor_config_file(data)
    path.write_text(supervisor_config(data, servers, daemon=daemon))
    _supervised_file(data).write_text(json.dumps({"servers": servers, "daemon": daemon}))
    # supervisord runs as the data folder's owner: the file is its to read, and the
    # log folders its to write.
    service_user.give_back(data)
    return path


def supervised_servers(data: Path) -> dict[str, list[str]]:
    """The servers (and their services) in this data folder's supervisord.conf."""
    try:
        stored = json.loads(_supervised_file(data).read_text())
    except (OSError, ValueError):
        return {}
    return {str(name): [str(s) for s in services] for name, services in stored["servers"].items()}


class SupervisorControl:
    name = "supervisord"

    def __init__(self, data: Path) -> None:
        self.data = data
        self.socket = supervisor_socket(data)

    def _call(self, method: str, *args: object) -> object:
        # A new transport per call: supervisor's keeps a broken connection after a failure.
        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        try:
            return getattr(proxy.supervisor, method)(*args)
        except xmlrpc.client.Fault as fault:
            raise UserError(f"supervisord: {fault.faultString}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise UserError(f"supervisord does not answer on {self.socket}: {exc}") from None

    def alive(self) -> bool:
        try:
            return self._call("getState") is not None
        except UserError:
            return False

    def _status(self, server: str, service: str) -> ServiceStatus:
        info = self._call("getProcessInfo", f"{server}:{program_name(server, service)}")
        assert isinstance(info, dict)
        name = str(info["statename"])
        state = {"RUNNING": "Running", "STOPPED": "Stopped", "STARTING": "Starting",
                 "BACKOFF": "Failed", "FATAL": "Failed", "EXITED": "Stopped",
                 "STOPPING": "Stopping"}.get(name, name)  # fmt: skip
        running = state == "Running"
        exits = read_exits(paths.server_folder(self.data, server).exits_file())
        pid = int(info["pid"]) if running else None
        return ServiceStatus(
            server, service, state, pid,
            float(info["now"] - info["start"]) if running else None,
            str(info.get("spawnerr") or ""), exits.get(service, 0),
            worker_pids(self.data, server, service, pid),
        )  # fmt: skip

    def status(self, server: str, services: list[str]) -> list[ServiceStatus]:
        return [self._status(server, service) for service in services]

    def start(self, server: str, service: str) -> ServiceStatus:
        status = self._status(server, service)
        deadline = time.monotonic() + KILL_RESTART_TIMEOUT
        while status.state == "Starting" and time.monotonic() < deadline:
            # Starting already (a group just added starts its programs): its own start
            # decides, within startsecs; a second startProcess would be refused.
            time.sleep(0.2)
            status = self._status(server, service)
        if status.state != "Running":
            self._call("startProcess", f"{server}:{program_name(server, service)}", True)
        return self._status(server, service)

    def runs(self, server: str) -> bool:
        """Whether this supervisord has `server`'s programs (a group of its own)."""
        infos = self._call("getAllProcessInfo")
        assert isinstance(infos, list)
        return any(str(info["group"]).lower() == server.lower() for info in infos)

    def servers(self) -> list[str]:
        infos = self._call("getAllProcessInfo")
        assert isinstance(infos, list)
        groups = {str(info["group"]) for info in infos if info["group"] != info["name"]}
        return sorted(groups)

    def add_servers(self, servers: dict[str, list[str]]) -> list[str]:
        """Add servers' programs to the running supervisord: its configuration file is
        made again with them (a restarted supervisord keeps them), reread, and each new
        group added, which starts its programs (supervisorctl's `update`)."""
        try:
            stored = json.loads(_supervised_file(self.data).read_text())
        except (OSError, ValueError):
            raise UserError(
                f"{_supervised_file(self.data)} is missing: this supervisord was started "
                "by an older popguard; `popguard down`, then `popguard up` again"
            ) from None
        merged = supervised_servers(self.data) | servers
        write_supervisor_config(self.data, merged, daemon=bool(stored["daemon"]))
        result = self._call("reloadConfig")
        assert isinstance(result, list)
        added = [str(name) for name in result[0][0]]
        for name in added:
            self._call("addProcessGroup", name)
        return added

    def stop(self, server: str, service: str) -> ServiceStatus:
        if self._status(server, service).state in ("Running", "Starting", "Failed"):
            self._call("stopProcess", f"{server}:{program_name(server, service)}", True)
        return self._status(server, service)

    def restart(self, server: str, service: str) -> ServiceStatus:
        """A new process; for a master with workers, new workers (the old ones finish
        their sessions), so that no connection is refused meanwhile."""
        before = self._status(server, service)
        if before.state == "Running" and before.workers:
            self._call("signalProcess", f"{server}:{program_name(server, service)}", "HUP")
            deadline = time.monotonic() + WORKER_RESTART_TIMEOUT
            while time.monotonic() < deadline:
                now = self._status(server, service)
                if now.state != "Running":
                    break
                if now.workers and not set(now.workers) & set(before.workers):
                    return now
                time.sleep(0.2)
        self.stop(server, service)
        return self.start(server, service)

    def kill(self, server: str, service: str) -> ServiceStatus:
        """A hung process is killed at once (a graceful stop would only wait out
        stopwaitsecs: its sessions are lost anyway) and started again."""
        before = self._status(server, service)
        if before.state == "Running":
            self._call("signalProcess", f"{server}:{program_name(server, service)}", "KILL")
        deadline = time.monotonic() + KILL_RESTART_TIMEOUT
        while time.monotonic() < deadline:  # supervisord's autorestart, within its tick
            now = self._status(server, service)
            if now.state == "Running" and now.pid != before.pid:
                return now
            if now.state in ("Stopped", "Failed"):
                break
            time.sleep(0.2)
        return self.start(server, service)

    def shutdown(self) -> None:
        self._call("shutdown")

    def pid(self) -> int:
        return int(str(self._call("getPID")))


# systemd ------------------------------------------------------------------------------


class SystemdControl:
    """`popguard-SERVICE@SERVER.service` units (deploy/systemd), through systemctl."""

    name = "systemd"

    def __init__(self, data: Path) -> None:
        self.data = data  # where the masters publish their workers (counters)

    def _systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UserError(f"systemctl {' '.join(args)}: {exc}") from None

    def _status(self, server: str, service: str) -> ServiceStatus:
        unit = f"popguard-{service}@{server}.service"
        shown = self._systemctl(
            "show", unit,
            "--property=ActiveState,MainPID,SubState,ActiveEnterTimestampMonotonic,NRestarts",
        )  # fmt: skip
        values = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
        active = values.get("ActiveState", "unknown")
        state = {"active": "Running", "inactive": "Stopped", "failed": "Failed",
                 "activating": "Starting"}.get(active, active)  # fmt: skip
        pid = int(values.get("MainPID", "0") or 0) or None
        # systemd's monotonic clock is CLOCK_MONOTONIC, as Python's time.monotonic().
        entered = int(values.get("ActiveEnterTimestampMonotonic", "0") or 0)
        uptime = time.monotonic() - entered / 1e6 if state == "Running" and entered else None
        # NRestarts counts the restarts systemd made by itself (Restart=): crashes only.
        restarts = values.get("NRestarts", "")
        exits = int(restarts) if restarts.isdigit() else None
        return ServiceStatus(
            server, service, state, pid, uptime, values.get("SubState", ""), exits,
            worker_pids(self.data, server, service, pid),
        )  # fmt: skip

    def status(self, server: str, services: list[str]) -> list[ServiceStatus]:
        return [self._status(server, service) for service in services]

    def _act(self, verb: str, server: str, service: str) -> ServiceStatus:
        done = self._systemctl(verb, f"popguard-{service}@{server}.service")
        if done.returncode != 0:
            raise UserError(f"systemctl {verb} failed: {done.stderr.strip()}")
        return self._status(server, service)

    def start(self, server: str, service: str) -> ServiceStatus:
        return self._act("start", server, service)

    def stop(self, server: str, service: str) -> ServiceStatus:
        return self._act("stop", server, service)

    def restart(self, server: str, service: str) -> ServiceStatus:
        # A running master restarts its workers on reload (ExecReload: SIGHUP).
        running = self._status(server, service).state == "Running"
        verb = "reload" if running and service in WORKER_SERVICES else "restart"
        return self._act(verb, server, service)

    def kill(self, server: str, service: str) -> ServiceStatus:
        unit = f"popguard-{service}@{server}.service"
        self._systemctl("kill", "--signal=SIGKILL", unit)
        return self._act("restart", server, service)


def control_for(data: Path) -> SupervisorControl | SystemdControl:
    """The supervisor that runs this data folder's services."""
    supervisor = SupervisorControl(data)
    if supervisor.socket.exists() and supervisor.alive():
        return supervisor
    if Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        return SystemdControl(data)
    raise UserError(
        "no supervisor runs popguard's services here: start them with `popguard up`, or "
        "install the systemd units of deploy/systemd"
    )
