"""The unprivileged user the services run as when root starts them.

`popguard up` started as root gives the data folder to a system user (`popguard` by
default, made if missing, as a Debian package's postinst would) and starts supervisord,
and so every service, as that user: a POP3 service that is broken into reads its own
mail folder and nothing of root's. Only the organization's CA key stays root's (mode
0600 in the user's folder): the commands that sign run as root, the services never
need it. Root's other commands on such a folder become its owner before they touch
anything (`become_owner`), so what they write is the services' to read; the few that
sign or start services (ROOT_COMMANDS) stay root and give back what they made (`hand_over`).

`--service-user root` (or POPGUARD_SERVICE_USER=root) keeps everything root's: the
explicit choice of an operator who has another isolation (a container of its own).
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from popguard import paths
from popguard.errors import UserError

SERVICE_USER_VARIABLE = "POPGUARD_SERVICE_USER"
DEFAULT_SERVICE_USER = "popguard"
# The commands that stay root on a folder root gave away: they sign certificates with
# the CA key (or give the folder away themselves), or start and stop services, which
# under systemd is systemctl's, root's.
ROOT_COMMANDS = frozenset({
    "up", "export-server-credentials", "import-server-credentials", "set-popsettings",
    "start-service", "stop-service", "restart-service", "restart-server",
})  # fmt: skip
UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


@dataclass(frozen=True)
class ServiceUser:
    name: str
    uid: int
    gid: int

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def _user(name: str) -> ServiceUser | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return ServiceUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def ensure_service_user(name: str) -> ServiceUser:
    """The user `name`, made as a system user with its own group, no home and no
    login shell when it does not exist yet."""
    found = _user(name)
    if found is not None:
        return found
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    command = [useradd, "--system", "--user-group", "--no-create-home",
               "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]  # fmt: skip
    try:
        made = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise UserError(f"cannot make the service user {name}: {useradd}: {exc.strerror}") from None
    found = _user(name)
    if made.returncode != 0 or found is None:
        why = (made.stderr.strip().splitlines() or [f"status {made.returncode}"])[-1]
        raise UserError(f"cannot make the service user {name}: {why}")
    return found


def why_unable(data: Path, user: ServiceUser) -> str | None:
    """Why `user` could not run the services on `data` (a folder on the way that only
    root may enter, an installation it cannot read), or None."""
    for folder in reversed(data.resolve().parents):
        status = folder.stat()
        if status.st_uid == user.uid:
            allowed = status.st_mode & stat.S_IXUSR
        elif status.st_gid == user.gid:
            allowed = status.st_mode & stat.S_IXGRP
        else:
            allowed = status.st_mode & stat.S_IXOTH
        if not allowed:
            return (
                f"{user.name} cannot reach {data}: {folder} is mode "
                f"{stat.S_IMODE(status.st_mode):04o} of uid {status.st_uid}; let others pass "
                f"through it (`chmod o+x {folder}`) or choose another data folder"
            )
    try:
        tried = subprocess.run(
            [sys.executable, "-c", "import popguard.cli.main"], capture_output=True, text=True,
            timeout=60, cwd="/", user=user.uid, group=user.gid, extra_groups=[],
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{user.name} cannot run {sys.executable}: {exc}"
    if tried.returncode != 0:
        last = (tried.stderr.strip().splitlines() or [f"status {tried.returncode}"])[-1]
        return (
            f"{user.name} cannot run popguard as installed ({sys.executable}: {last}); "
            "install it where every user may read it (/opt/popguard, as deploy/systemd does)"
        )
    return None


def check_ports(ports: list[tuple[str, int]], user: ServiceUser) -> None:
    """Ports below the kernel's unprivileged start need root to bind: say so before
    anything starts, not as a crash loop."""
    if user.is_root:
        return
    try:
        start = int(UNPRIVILEGED_PORT_START.read_text())
    except (OSError, ValueError):
        start = 1024
    for what, port in ports:
        if port < start:
            raise UserError(
                f"{what} listens on port {port}, which only root may bind here (ports below "
                f"{start}); the services run as {user.name}: lower "
                f"{UNPRIVILEGED_PORT_START} (sysctl net.ipv4.ip_unprivileged_port_start="
                f"{port}), choose a port from {start}, or keep them root's with "
                "--service-user root"
            )


def hand_over(data: Path, uid: int, gid: int) -> None:
    """Give every file and folder in `data` to the user `uid`, except the CA key
    (root's alone, 0600). Links are never followed: a link the user planted must not
    make root give away a file outside the folder."""
    data = data.resolve()
    kept = {paths.ca_key_file(data)}
    entries = (Path(folder) / name for folder, folders, files in os.walk(data)
               for name in [*folders, *files])  # fmt: skip
    for path in (data, *entries):
        try:
            if path in kept:
                os.lchown(path, 0, 0)
                os.chmod(path, 0o600)
            else:
                os.lchown(path, uid, gid)
        except FileNotFoundError:  # removed meanwhile (a rotated log, a -journal)
            continue


def give_back(data: Path) -> None:
    """What root wrote in a folder it gave away goes back to the folder's owner."""
    if os.geteuid() != 0:
        return
    try:
        status = data.stat()
    except FileNotFoundError:
        return
    if status.st_uid != 0:
        hand_over(data, status.st_uid, status.st_gid)


def become_owner(data: Path) -> None:
    """Root's command on a folder another user owns runs as that user, so that what it
    writes (a new database, a fault file, a protocol log) is the services' to use."""
    if os.geteuid() != 0:
        return
    try:
        status = data.stat()
    except OSError:
        return
    if status.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(status.st_gid)
    os.setuid(status.st_uid)
