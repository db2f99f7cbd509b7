"""A passive copy facing a bad active side, and a replication service facing bad clients.

The "active server" here is a small HTTPS server of the test's own, standing where
mbx1 would be, that answers what a broken or hostile peer would. Whatever it sends,
mbx2's copy must go Failed with a clear error and apply nothing.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from popguard.directory.directory import Directory
from popguard.net import tls
from popguard.replication.copy_status_rows import status_rows
from popguard.store import change_log
from popguard.store.change_log import GENESIS, LogEntry, entry_checksum
from popguard.testing.net import free_loopback_address

from .conftest import MailboxServer, running_organization
from .test_replication import wait_for


def entry(lsn: int, previous: bytes = GENESIS, corrupt: bool = False) -> LogEntry:
    wire = b"Subject: from the fake\r\n\r\nhello\r\n"
    checksum = entry_checksum(previous, lsn, 1.0, "deliver", "a@example.test", lsn, 30, wire)
    if corrupt:
        checksum = bytes(32)
    return LogEntry(lsn, 1.0, "deliver", "a@example.test", lsn, 30, wire, checksum)


ANSWERS: dict[str, tuple[int, bytes]] = {
    "garbage": (200, b"this is not a change log at all\n"),
    "truncated": (200, b"".join(change_log.encode([entry(1)]))[:-5]),
    "gap": (200, b"".join(change_log.encode([entry(2)]))),
    "corrupt": (200, b"".join(change_log.encode([entry(1, corrupt=True)]))),
}
EXPECTED_ERROR = {
    "garbage": "malformed log",
    "truncated": "malformed log",
    "gap": "log gap",
    "corrupt": "fails its checksum",
    "not-http": "broke the protocol",
    "impostor": "TLS with mbx1 failed",
}


class FakeActive(http.server.BaseHTTPRequestHandler):
    mode = "garbage"

    def do_GET(self) -> None:
        if self.mode == "not-http":
            self.wfile.write(b"\x00\xffSMTP? no: garbage\r\n\r\n")
            self.close_connection = True
            return
        status, body = ANSWERS.get(self.mode, ANSWERS["garbage"])
        self.send_response(status)
        self.send_header("X-Last-Lsn", "3")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def fake_active(address: str, context: ssl.SSLContext, mode: str) -> Iterator[None]:
    handler = type("Handler", (FakeActive,), {"mode": mode})
    server = http.server.ThreadingHTTPServer((address, 64327), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("mode", sorted(EXPECTED_ERROR))
def test_a_bad_active_side_fails_the_copy_and_nothing_is_applied(tmp_path: Path, mode: str) -> None:
    data = tmp_path / "data"
    fake_address, real_address = free_loopback_address(), free_loopback_address()
    with Directory(data) as directory:
        directory.new_server("mbx1", ["mailbox"], fake_address)
        directory.new_server("mbx2", ["mailbox"], real_address)
        directory.new_database("DB01", "mbx1")
        directory.add_database_copy("DB01", "mbx2", 2)
    if mode == "impostor":  # a certificate for mbx1's address from another organization
        pair = tls.TlsMaterial.of(tmp_path / "elsewhere").replication_identity("mbx1", fake_address)
    else:
        pair = tls.TlsMaterial.of(data).replication_identity("mbx1", fake_address)
    mbx2 = MailboxServer(data=data, name="mbx2", address=real_address)
    with fake_active(fake_address, tls.server_context(pair), mode):
        try:
            mbx2.start("replication")

            def failed() -> bool:
                with Directory(data) as directory:
                    (row,) = status_rows(directory, None, "DB01\\mbx2")
                return row["Status"] == "Failed" and EXPECTED_ERROR[mode] in str(
                    row["ErrorMessage"]
                )

            wait_for(failed, f"DB01\\mbx2 to fail with {EXPECTED_ERROR[mode]!r}")
        finally:
            mbx2.stop_all()
    with Directory(data) as directory:
        (row,) = status_rows(directory, None, "DB01\\mbx2")
    assert row["LogSequenceNumber"] == 0
    assert "Traceback" not in mbx2.log_text("replication")


def test_the_replication_service_admits_only_mailbox_servers_of_the_organization(
    tmp_path: Path,
) -> None:
    with running_organization(tmp_path / "data", replication=True) as org:
        mbx1 = org.mailbox["mbx1"]
        url = f"https://{mbx1.address}:64327/v1/databases/DB01/head"
        ca = str(tls.TlsMaterial.of(org.data).ca_certificate_file)

        def client(pair: tls.CertificatePair | None) -> httpx.Client:
            context = ssl.create_default_context(cafile=ca)
            if pair is not None:
                context.load_cert_chain(pair.certificate, pair.key)
            return httpx.Client(verify=context, timeout=10)

        # A front end's certificate is the organization's, but it is not a mailbox server.
        with client(
            tls.TlsMaterial.of(org.data).replication_identity("cas1", org.frontend_address)
        ) as c:
            refused = c.get(url)
        assert refused.status_code == 403 and "not a mailbox server" in refused.text
        # A certificate that only says "mbx2" (a POP3 one: X509CertificateName is the
        # operator's to choose) is not a replication certificate.
        pop3_like = tls.TlsMaterial.of(org.data).ensure_server_certificate(
            "mbx2", ["mbx2"], [org.mailbox["mbx2"].address], purpose="impostor"
        )
        with client(pop3_like) as c:
            refused = c.get(url)
        assert refused.status_code == 403 and "not a replication" in refused.text
        # mbx2 is: it may read the log head.
        with client(
            tls.TlsMaterial.of(org.data).replication_identity("mbx2", org.mailbox["mbx2"].address)
        ) as c:
            allowed = c.get(url)
        assert allowed.status_code == 200 and allowed.json()["role"] == "active"
        # No certificate, or one from another organization: the handshake fails.
        elsewhere = tls.TlsMaterial.of(tmp_path / "elsewhere").replication_identity(
            "mbx2", "127.0.0.1"
        )
        for pair in (None, elsewhere):
            with client(pair) as c, pytest.raises(httpx.TransportError):
                c.get(url)
        # The port is not left half-open for anyone: a plain TCP connection gets nothing.
        with socket.create_connection((mbx1.address, 64327), timeout=5) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
            raw.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert b"HTTP/1." not in raw.recv(100)
