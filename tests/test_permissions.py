"""The data folder is its owner's alone: after `popguard up`, deliveries, a protocol
log and health results, nothing in it is open to group or others, and another local
user reads neither the directory nor a mailbox database."""

from __future__ import annotations

import os
import poplib
import shutil
import ssl
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from popguard.directory.directory import Directory
from popguard.testing.net import free_loopback_address
from popguard.testing.organization import popguard

from .conftest import wait_for

OTHER_USER = "nobody"


@pytest.fixture
def open_parent() -> Iterator[Path]:
    """A folder any local user may enter (pytest's own tmp_path is under a 0700 one,
    which would hide the data folder from others whatever popguard does)."""
    parent = Path(tempfile.mkdtemp(prefix="popguard-permissions-", dir="/tmp"))
    parent.chmod(0o755)
    try:
        yield parent
    finally:
        shutil.rmtree(parent)


def _as_other_user(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", OTHER_USER, "--", *command], capture_output=True, text=True, timeout=30
    )


def _open_to_others(data: Path) -> list[str]:
    found = []
    for path in [data, *data.rglob("*")]:
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode) and mode & 0o077:
            found.append(f"{path.relative_to(data)} {stat.S_IMODE(mode):04o}")
    return found


def test_nothing_in_the_data_folder_is_open_to_others(open_parent: Path) -> None:
    data = open_parent / "data"
    cas, mbx1, mbx2 = (free_loopback_address() for _ in range(3))
    started = popguard(data, "up", "--detach", "--frontend-address", cas, "--address", mbx1,
                       "--second-address", mbx2)  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        assert popguard(data, "set-popsettings", "--server", "cas1",
                        "--protocol-log-enabled", "true").returncode == 0  # fmt: skip
        user, password = (data / "demo-mailbox.txt").read_text().split()[:2]
        message = open_parent / "message.eml"
        message.write_bytes(b"Subject: second\r\n\r\nanother delivery\r\n")
        sent = popguard(data, "send-message", "--to", user, "--file", str(message))
        assert sent.returncode == 0, sent.stderr
        protocol_log = data / "servers" / "cas1" / "logs" / "pop3"

        def read_through_the_front_end() -> bool:
            context = ssl.create_default_context(cafile=str(data / "tls" / "ca.pem"))
            client = poplib.POP3_SSL(cas, 10995, context=context, timeout=10)
            client.user(user)
            client.pass_(password)
            client.quit()
            return protocol_log.is_dir() and any(protocol_log.iterdir())

        wait_for("a protocol log of cas1's pop3", read_through_the_front_end, timeout=60)
        results = data / "servers" / "mbx1" / "health" / "results.sqlite"
        wait_for("mbx1's health results store", results.exists, timeout=60)
        database = data / "servers" / "mbx1" / "databases" / "DB01.sqlite"
        assert database.exists()

        assert _open_to_others(data) == []
        # The folder above is open: only popguard's own modes keep the other user out.
        assert _as_other_user("ls", str(open_parent)).returncode == 0
        for secret in (data / "directory.sqlite", database, results):
            refused = _as_other_user("cat", str(secret))
            assert refused.returncode != 0
            assert "Permission denied" in refused.stderr
    finally:
        popguard(data, "down")


def test_up_refuses_a_directory_open_to_others(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    Directory(data).close()
    (data / "directory.sqlite").chmod(0o644)
    refused = popguard(data, "up", "--detach", "--frontend-address", free_loopback_address(),
                       "--address", free_loopback_address(), "--second-address",
                       free_loopback_address())  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"popguard: {data / 'directory.sqlite'} is open to group or others (mode 0644): the "
        "data folder holds mail and password hashes and must be its owner's alone; "
        f"`chmod -R go-rwx {data}` closes it"
    ]
    assert refused.stdout == ""
    # Nothing was started or written: the directory has no servers yet.
    with Directory(data) as directory:
        assert directory.list_servers() == []


def test_up_refuses_a_data_folder_others_may_enter(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    refused = popguard(data, "up", "--detach")
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"popguard: {data} is open to group or others (mode 0755)")
    assert len(refused.stderr.splitlines()) == 1
    assert os.listdir(data) == []
