"""Started as root, `popguard up` runs every service as the unprivileged `popguard`
user (control/service_user.py): the data folder becomes that user's, the CA key stays
root's, root's own commands act as the folder's owner, and nobody else reads a thing.

popguard is installed here as an operator installs it: with Debian's own Python, in a
folder every user may read (the test suite's own interpreter lives under /root, which
the service user cannot enter).
"""

from __future__ import annotations

import os
import poplib
import pwd
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from popguard.control.service_user import DEFAULT_SERVICE_USER, SERVICE_USER_VARIABLE
from popguard.testing.net import free_loopback_address

from .conftest import PASSWORD, processes_matching, wait_for

REPOSITORY = Path(__file__).resolve().parents[1]
DEBIAN_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """A popguard installed from this checkout into a venv of Debian's Python, in a
    folder others may enter; yields that folder (its popguard is venv/bin/popguard)."""
    folder = Path(tempfile.mkdtemp(prefix="popguard-service-user-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        source = folder / "source"
        shutil.copytree(REPOSITORY / "src", source / "src",
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))  # fmt: skip
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPOSITORY / name, source / name)
        # The suite's umask is owner-only: an install others may read needs the usual.
        for command in ([DEBIAN_PYTHON, "-m", "venv", str(folder / "venv")],
                        [str(folder / "venv/bin/pip"), "install", "--quiet",
                         "--disable-pip-version-check", str(source)]):  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                                  umask=0o022)  # fmt: skip
            assert done.returncode == 0, done.stderr[-2000:]
        yield folder
    finally:
        shutil.rmtree(folder)


def _popguard(installed: Path, data: Path, *args: str, stdin: str | None = None
              ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """The installed popguard as root runs it, with popguard's default service user."""
    env = {k: v for k, v in os.environ.items() if k != SERVICE_USER_VARIABLE}
    return subprocess.run([str(installed / "venv/bin/popguard"), "--data", str(data), *args],
                          input=stdin, capture_output=True, text=True, timeout=240,
                          env=env)  # fmt: skip


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])  # the real uid (effective, saved, fs follow it)
    raise AssertionError(f"no Uid line for {pid}")


def _not_the_service_users(data: Path, uid: int) -> list[str]:
    return [f"{path.relative_to(data)} uid {path.lstat().st_uid}"
            for path in [data, *data.rglob("*")] if path.lstat().st_uid != uid]  # fmt: skip


def _as(user: str, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", user, "--", *command],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def test_root_starts_the_services_as_the_service_user(installed: Path) -> None:
    data = installed / "data"
    cas, mbx1, mbx2 = (free_loopback_address() for _ in range(3))
    started = _popguard(installed, data, "up", "--detach", "--frontend-address", cas,
                        "--address", mbx1, "--second-address", mbx2)  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr
        assert "services run as root" not in started.stderr, started.stderr
        service = pwd.getpwnam(DEFAULT_SERVICE_USER)
        assert service.pw_uid != 0 and service.pw_shell.endswith("nologin")
        # supervisord, the exit listener, every service and every worker: none is root's.
        organization = processes_matching(f"--data {data} serve") + processes_matching(
            f"supervisord -c {data}/supervisor"
        )
        assert len(organization) >= 12, organization
        assert {_uid_of(pid) for pid in organization} == {service.pw_uid}

        # The folder is the service user's, but for the CA key: root's alone.
        ca_key = data / "tls" / "ca.key"
        assert _not_the_service_users(data, service.pw_uid) == ["tls/ca.key uid 0"]
        assert stat.S_IMODE(ca_key.stat().st_mode) == 0o600
        refused = _as(DEFAULT_SERVICE_USER, "cat", str(ca_key))
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
        for secret in (data / "directory.sqlite", data / "tls" / "servers" / "mbx1.key"):
            other = _as("nobody", "cat", str(secret))
            assert other.returncode != 0 and "Permission denied" in other.stderr

        # Root's commands act as the folder's owner: a mailbox root makes is one the
        # services read, and it is served through the front end.
        made = _popguard(installed, data, "new-mailbox", "zoe@example.test", "--password-stdin",
                         stdin=PASSWORD + "\n")  # fmt: skip
        assert made.returncode == 0, made.stderr
        context = ssl.create_default_context(cafile=str(data / "tls" / "ca.pem"))
        client = poplib.POP3_SSL(cas, 10995, context=context, timeout=30)
        client.user("zoe@example.test")
        client.pass_(PASSWORD)
        assert client.stat() == (0, 0)
        client.quit()
        restarted = _popguard(installed, data, "restart-service", "pop3be", "--server", "mbx1")
        assert restarted.returncode == 0 and "Running" in restarted.stdout, restarted.stderr
        # A new certificate name: root's set-popsettings makes the certificate (the
        # services cannot sign), and cas1 shows it within seconds.
        renamed = _popguard(installed, data, "set-popsettings", "--server", "cas1",
                            "--x509-certificate-name", "mail.example.test")  # fmt: skip
        assert renamed.returncode == 0, renamed.stderr

        def shows_new_name() -> bool:
            try:
                with (
                    socket.create_connection((cas, 10995), timeout=10) as raw,
                    context.wrap_socket(raw, server_hostname="mail.example.test"),
                ):
                    return True
            except ssl.SSLCertVerificationError:
                return False

        wait_for("cas1 to show its new certificate name", shows_new_name, 60)
        # A command that signs (root's, with the CA key) gives back what it made.
        exported = _popguard(installed, data, "export-server-credentials", "mbx2",
                             "--out", str(installed / "mbx2.credentials"))  # fmt: skip
        assert exported.returncode == 0, exported.stderr
        assert _not_the_service_users(data, service.pw_uid) == ["tls/ca.key uid 0"]
        assert {_uid_of(pid) for pid in processes_matching(f"--data {data} serve")} == {
            service.pw_uid
        }
    finally:
        stopped = _popguard(installed, data, "down")
    assert stopped.returncode == 0, stopped.stderr
    assert processes_matching(f"--data {data} serve") == []


def test_a_named_service_user_that_cannot_reach_the_folder_is_one_line(
    installed: Path, tmp_path: Path
) -> None:
    # pytest's own folders are root's alone (0700): the service user cannot enter them.
    data = tmp_path / "data"
    named = _popguard(installed, data, "up", "--detach", "--service-user", DEFAULT_SERVICE_USER)
    assert named.returncode == 1
    line = named.stderr.strip()
    assert "\n" not in line and line.startswith("popguard: popguard cannot reach"), line
    assert "--service-user root" in line
    assert not (data / "supervisor").exists()
