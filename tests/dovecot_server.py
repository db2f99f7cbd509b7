"""The shared private Dovecot (popguard.testing.dovecot) with one user, as the
real-client and health tests use it."""

from __future__ import annotations

import contextlib
import os
import poplib
import shutil
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from popguard.testing import dovecot
from tests import realclients as rc

SERVER_NAME = "pop.popguard.test"  # also in the server certificate; never resolved


@dataclass
class Dovecot:
    server: dovecot.Dovecot
    pki: rc.TestPki
    user: str
    password: str

    @property
    def implicit_port(self) -> int:
        return self.server.tls_port

    def port(self, tls: rc.TlsMode) -> int:
        return self.server.port if tls == "stls" else self.server.tls_port

    def fill(self, messages: list[bytes]) -> None:
        """Replace the mailbox with these messages."""
        self.server.fill(self.user, messages)

    def stat(self) -> int:
        """Number of messages on the server, seen through POP3 (implicit TLS)."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_file))
        conn = poplib.POP3_SSL(self.server.address, self.implicit_port, context=ctx, timeout=10)
        try:
            conn.user(self.user)
            conn.pass_(self.password)
            count, _ = conn.stat()
        finally:
            conn.quit()
        return count

    def files(self) -> list[Path]:
        return self.server.files(self.user)


@contextlib.contextmanager
def private_dovecot(host: str, user: str, password: str) -> Iterator[Dovecot]:
    """A Dovecot POP3 server of its own on `host` (STLS and implicit-TLS ports, no
    login without TLS), with one user and an empty maildir, until the block ends."""
    if os.geteuid() != 0:
        pytest.fail("Dovecot tests need root")
    pki_dir = Path(tempfile.mkdtemp(prefix="popguard-dovecot-pki-"))
    try:
        pki = rc.make_test_pki(pki_dir, [host, SERVER_NAME])
        certificate = dovecot.Certificate(pki.ca_file, pki.cert_file, pki.key_file)
        with dovecot.Dovecot(
            "default", host, [user], password, [], tls=True, name="test",
            certificate=certificate, ssl_required=True,
        ) as server:  # fmt: skip
            yield Dovecot(server, pki, user, password)
    finally:
        shutil.rmtree(pki_dir, ignore_errors=True)
