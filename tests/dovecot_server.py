"""A private Dovecot POP3 server (Debian's dovecot-pop3d) for tests."""

from __future__ import annotations

import contextlib
import os
import poplib
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import realclients as rc

SERVER_NAME = "pop.popguard.test"  # also in the server certificate; never resolved


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Dovecot:
    root: Path
    maildir: Path
    pki: rc.TestPki
    stls_port: int
    implicit_port: int
    proc: subprocess.Popen[bytes]
    log: Path
    host: str
    user: str
    password: str

    def port(self, tls: rc.TlsMode) -> int:
        return self.stls_port if tls == "stls" else self.implicit_port

    def fill(self, messages: list[bytes]) -> None:
        """Replace the mailbox with these messages."""
        for sub in ("cur", "new", "tmp"):
            shutil.rmtree(self.maildir / sub, ignore_errors=True)
            (self.maildir / sub).mkdir(parents=True)
        for i, content in enumerate(messages, start=1):
            path = self.maildir / "cur" / f"{1700000000 + i}.M{i}P1.popguard-test:2,"
            path.write_bytes(content)
        subprocess.run(["chown", "-R", "nobody:nogroup", str(self.maildir)], check=True)

    def stat(self) -> int:
        """Number of messages on the server, seen through POP3 (implicit TLS)."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_file))
        conn = poplib.POP3_SSL(self.host, self.implicit_port, context=ctx, timeout=10)
        try:
            conn.user(self.user)
            conn.pass_(self.password)
            count, _ = conn.stat()
        finally:
            conn.quit()
        return count

    def files(self) -> list[Path]:
        return [p for sub in ("cur", "new") for p in (self.maildir / sub).iterdir()]


@contextlib.contextmanager
def private_dovecot(host: str, user: str, password: str) -> Iterator[Dovecot]:
    """A Dovecot POP3 server of its own on `host` (STLS and implicit-TLS ports), with
    one passwd-file user and a maildir, until the block ends. Needs root."""
    if os.geteuid() != 0:
        pytest.fail("Dovecot tests need root")
    # Not under tmp_path: Dovecot's login (dovenull) and mail (nobody) processes
    # must traverse it, and unix socket paths must stay short.
    root = Path(tempfile.mkdtemp(prefix="popguard-dovecot-"))
    root.chmod(0o711)
    pki = rc.make_test_pki(root / "tls", [host, SERVER_NAME])
    maildir = root / "mail" / user
    (root / "mail").mkdir()
    (root / "mail").chmod(0o755)
    passwd = root / "passwd"
    passwd.write_text(f"{user}:{{PLAIN}}{password}::::::\n")
    passwd.chmod(0o644)
    stls_port, implicit_port = free_port(host), free_port(host)
    log = root / "dovecot.log"
    conf = root / "dovecot.conf"
    conf.write_text(
        f"""\
protocols = pop3
listen = {host}
base_dir = {root}/run
state_dir = {root}/state
instance_name = popguard-test-{os.getpid()}-{host}
log_path = {log}
ssl = required
ssl_cert = <{pki.cert_file}
ssl_key = <{pki.key_file}
ssl_min_protocol = TLSv1.2
auth_mechanisms = plain login
first_valid_uid = 1
mail_location = maildir:{root}/mail/%u
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {passwd}
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={root}/mail/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {host}
    port = {stls_port}
  }}
  inet_listener pop3s {{
    address = {host}
    port = {implicit_port}
    ssl = yes
  }}
}}
"""
    )
    proc = subprocess.Popen(["dovecot", "-F", "-c", str(conf)], stdin=subprocess.DEVNULL)
    server = Dovecot(root, maildir, pki, stls_port, implicit_port, proc, log, host, user, password)
    try:
        deadline = time.monotonic() + 10
        for port in (stls_port, implicit_port):
            while True:
                try:
                    socket.create_connection((host, port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        text = log.read_text() if log.exists() else ""
                        pytest.fail(f"Dovecot did not start:\n{text}")
                    time.sleep(0.05)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)
