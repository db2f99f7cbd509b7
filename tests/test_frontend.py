"""The POP3 front end (proxy) as a real process in front of two mailbox servers."""

from __future__ import annotations

import json
import poplib
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from popguard import paths
from popguard.services.counters import read_counters

from .conftest import PASSWORD, Organization, children, message


class SourcedPOP3SSL(poplib.POP3_SSL):
    """poplib over TLS from a chosen source address, as a probe on the server binds."""

    def __init__(
        self, host: str, port: int, source: str | None, context: ssl.SSLContext, timeout: float
    ) -> None:
        self._source = source
        self._tls_context = context
        super().__init__(host, port, context=context, timeout=timeout)

    def _create_socket(self, timeout: float) -> socket.socket:
        source = (self._source, 0) if self._source else None
        raw = socket.create_connection((self.host, self.port), timeout, source_address=source)
        return self._tls_context.wrap_socket(raw, server_hostname=self.host)


def secure_client(org: Organization, source: str | None = None) -> poplib.POP3_SSL:
    return SourcedPOP3SSL(org.frontend_address, org.pop3s_port, source, org.ssl_context(), 15)


def login(org: Organization, user: str, source: str | None = None) -> poplib.POP3_SSL:
    client = secure_client(org, source)
    client.user(user)
    client.pass_(PASSWORD)
    return client


def hang_up(client: poplib.POP3) -> None:
    """Close the connection for real (poplib's file object keeps the socket open)."""
    client.sock.shutdown(socket.SHUT_RDWR)
    client.file.close()
    client.sock.close()


def counters(org: Organization, server: str, service: str) -> dict[str, object]:
    loaded = read_counters(paths.server_folder(org.data, server).counters_file(service))
    assert loaded is not None
    return loaded


def wait_for_counters(org: Organization, server: str, service: str, **expected: object) -> None:
    """Wait for counters published after this call that show `expected`."""
    since = time.time()
    deadline = time.monotonic() + 10
    current: dict[str, object] = {}
    while time.monotonic() < deadline:
        current = read_counters(paths.server_folder(org.data, server).counters_file(service)) or {}
        fresh = float(current.get("Updated", 0)) > since  # type: ignore[arg-type]
        if fresh and all(current.get(key) == value for key, value in expected.items()):
            return
        time.sleep(0.2)
    raise AssertionError(f"{server}/{service} counters {current} never matched {expected}")


def test_read_and_delete_through_the_front_end(organization: Organization) -> None:
    user = organization.add_mailbox("alice@example.test")
    sent = message("through the proxy")
    organization.deliver(user, sent)
    client = secure_client(organization)
    assert client.getwelcome().startswith(b"+OK popguard POP3 front end cas1 ready")
    assert "STLS" not in client.capa()
    client.user(user)
    assert client.pass_(PASSWORD).startswith(b"+OK Logged in, 1 messages")
    _, lines, _ = client.retr(1)
    assert b"\r\n".join(lines).endswith(sent.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n"))
    client.dele(1)
    assert client.quit().startswith(b"+OK popguard signing off (1 messages deleted)")
    again = login(organization, user)
    assert again.stat() == (0, 0)
    again.quit()


def test_stls_and_pipelined_login(organization: Organization) -> None:
    user = organization.add_mailbox("bob@example.test", "DB02")
    organization.deliver(user, message("pipelined"))
    with socket.create_connection((organization.frontend_address, organization.pop3_port)) as raw:
        assert raw.recv(200).startswith(b"+OK")
        raw.sendall(b"STLS\r\n")
        assert raw.recv(200) == b"+OK Begin TLS negotiation\r\n"
        context = organization.ssl_context()
        with context.wrap_socket(raw, server_hostname=organization.frontend_address) as tls:
            # Login and commands in one write: what follows PASS reaches the back end.
            tls.sendall(f"USER {user}\r\nPASS {PASSWORD}\r\nSTAT\r\nQUIT\r\n".encode())
            replies = b""
            while chunk := tls.recv(65536):
                replies += chunk
    lines = replies.split(b"\r\n")
    assert lines[0] == b"+OK send PASS"
    assert lines[1].startswith(b"+OK Logged in, 1 messages")
    assert lines[2].startswith(b"+OK 1 ")
    assert lines[3].startswith(b"+OK popguard signing off")


def test_errors_the_user_can_act_on(organization: Organization) -> None:
    user = organization.add_mailbox("carol@example.test")
    client = secure_client(organization)
    client.user(user)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] authentication failed"):
        client.pass_("wrong")
    client.quit()
    # The back end's [IN-USE] reaches the client word for word.
    direct = poplib.POP3_SSL(
        organization.mailbox["mbx1"].address,
        1995,
        context=organization.ssl_context(),
    )
    direct.user(user)
    direct.pass_(PASSWORD)
    proxied = secure_client(organization)
    proxied.user(user)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[IN-USE\] mailbox is in use"):
        proxied.pass_(PASSWORD)
    proxied.quit()
    direct.quit()


def test_back_end_down_is_a_temporary_error(organization: Organization) -> None:
    user = organization.add_mailbox("dave@example.test")
    organization.mailbox["mbx1"].kill("pop3be")
    client = secure_client(organization)
    client.user(user)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\] mailbox server not reachable"):
        client.pass_(PASSWORD)
    client.quit()


def test_back_end_that_accepts_and_hangs(organization: Organization) -> None:
    user = organization.add_mailbox("erin@example.test")
    mbx1 = organization.mailbox["mbx1"]
    mbx1.kill("pop3be")
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind((mbx1.address, 1995))
    silent.listen()
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_say_nothing() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(silent.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept_and_say_nothing)
    thread.start()
    try:
        client = secure_client(organization)
        client.user(user)
        # Bounded by the proxy's back-end login timeout (10 s), below poplib's 15 s.
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.pass_(PASSWORD)
        client.quit()
    finally:
        stop.set()
        thread.join()
        silent.close()
        for conn in accepted:
            conn.close()
    assert accepted, "the proxy never connected to the silent back end"
    wait_for_counters(organization, "cas1", "pop3", CurrentConnections=0, OpenTasks=0)


def test_back_end_tls_sessions_are_resumed_and_survive_a_restart(
    organization: Organization,
) -> None:
    user = organization.add_mailbox("olga@example.test")
    organization.deliver(user, message("resumed"))
    # One worker each: every back-end worker has a ticket key of its own and every
    # front-end worker a session cache of its own, so with more a login resumes only
    # when it meets the same pair again.
    mbx1 = organization.mailbox["mbx1"]
    # mbx1 is on cas1's host: TLS on that leg only when the operator asks for it.
    organization.set_frontend_settings(WorkerProcesses=1, SameHostBackendTls=True)
    mbx1.set_settings(WorkerProcesses=1)
    wait_for_counters(organization, "cas1", "pop3", Workers=1)
    wait_for_counters(organization, "mbx1", "pop3be", Workers=1)
    for _ in range(3):
        client = login(organization, user)
        assert client.stat()[0] == 1
        client.quit()
    # The first login verified mbx1's certificate in a full handshake; the others
    # resumed that session.
    wait_for_counters(organization, "cas1", "pop3", BackendTlsResumed=2, CurrentConnections=0)
    # A restarted back end cannot read the tickets it gave out before: the next
    # login falls back to a full handshake, and the one after resumes again.
    mbx1.kill("pop3be")
    mbx1.start("pop3be")
    for _ in range(2):
        client = login(organization, user)
        assert client.stat()[0] == 1
        client.quit()
    wait_for_counters(
        organization, "cas1", "pop3", BackendTlsResumed=3, BackendFailures=0, BackendLocal=0
    )


def test_a_back_end_on_the_same_host_is_reached_on_its_unix_socket(
    organization: Organization,
) -> None:
    user = organization.add_mailbox("ursula@example.test")
    organization.deliver(user, message("over the socket"))
    mbx1 = organization.mailbox["mbx1"]
    socket_file = paths.server_folder(organization.data, "mbx1").local_socket_file("pop3be")
    # The data folder is the service user's alone, and so is the socket.
    assert socket_file.is_socket()
    assert socket_file.stat().st_mode & 0o077 == 0
    client = login(organization, user)
    assert b"Subject: over the socket" in client.retr(1)[1]
    client.quit()
    wait_for_counters(organization, "cas1", "pop3", BackendLocal=1, BackendTlsResumed=0)
    # A kill -9 leaves the file: the next master replaces it, and logins use it again.
    mbx1.kill("pop3be")
    assert socket_file.is_socket()
    mbx1.start("pop3be")
    client = login(organization, user)
    assert client.stat()[0] == 1
    client.quit()
    wait_for_counters(organization, "cas1", "pop3", BackendLocal=2, BackendFailures=0)
    # Without the socket (a back end that does not serve one), its TLS port still serves.
    socket_file.unlink()
    client = login(organization, user)
    assert client.stat()[0] == 1
    client.quit()
    wait_for_counters(organization, "cas1", "pop3", BackendLocal=2, BackendFailures=0)
    # A master that stops in good order removes the socket it made.
    mbx1.kill("pop3be")
    mbx1.start("pop3be")
    assert socket_file.is_socket()
    mbx1.kill("pop3be", signal.SIGTERM)
    assert not socket_file.exists()
    assert "Traceback" not in organization.frontend_log()


def test_routing_follows_the_directory(organization: Organization) -> None:
    user = organization.add_mailbox("frank@example.test")
    organization.deliver(user, message("on mbx1"))
    client = login(organization, user)
    assert client.stat()[0] == 1
    client.quit()
    with organization.directory() as directory:
        directory.activate_copy("DB01", "mbx2")
    # Without replication (a later issue) mbx2's copy is empty: the new session
    # seeing nothing and then the message delivered there shows where it went.
    organization.deliver(user, message("on mbx2"))
    client = login(organization, user)
    (only,) = [b"\r\n".join(client.retr(1)[1])]
    assert b"Subject: on mbx2" in only and client.stat()[0] == 1
    client.quit()


def test_pop_proxy_inactive_refuses_outside_clients_but_not_local_probes(
    organization: Organization,
) -> None:
    from popguard.directory.directory import Directory

    user = organization.add_mailbox("grace@example.test")
    with Directory(organization.data) as directory:
        directory.set_component_state("cas1", "PopProxy", "Inactive", "Maintenance")
    deadline = time.monotonic() + 10
    refusal = b""
    while time.monotonic() < deadline:
        with socket.create_connection(
            (organization.frontend_address, organization.pop3_port), timeout=5
        ) as sock:
            refusal = sock.recv(200)
        if refusal.startswith(b"-ERR"):
            break
        time.sleep(0.2)
    assert refusal == (
        b"-ERR [SYS/TEMP] this server is not taking connections now (PopProxy Inactive)\r\n"
    )
    # A monitoring probe connects from the server's own address and is served.
    probe = login(organization, user, source=organization.frontend_address)
    assert probe.stat() == (0, 0)
    probe.quit()
    with Directory(organization.data) as directory:
        directory.set_component_state("cas1", "PopProxy", "Active", "Maintenance")
        directory.set_component_state("cas1", "PopProxy", "Draining", "HealthApi")
        assert directory.component_state("cas1", "PopProxy") == "Draining"
        directory.set_component_state("cas1", "PopProxy", "Active", "HealthApi")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.create_connection(
            (organization.frontend_address, organization.pop3_port), timeout=5
        ) as sock:
            if sock.recv(200).startswith(b"+OK"):
                break
        time.sleep(0.2)
    login(organization, user).quit()


def test_disconnects_mid_retr_leak_nothing(organization: Organization) -> None:
    user = organization.add_mailbox("heidi@example.test")
    organization.deliver(user, message("big", size=3_000_000))
    for _ in range(3):
        client = login(organization, user)
        client.sock.sendall(b"RETR 1\r\n")
        client.sock.recv(1000)
        hang_up(client)  # the client leaves in the middle of the message
        # Both ends let go of the session (until then the mailbox is [IN-USE]).
        wait_for_counters(organization, "cas1", "pop3", CurrentConnections=0, OpenTasks=0)
        wait_for_counters(organization, "mbx1", "pop3be", CurrentConnections=0, OpenTasks=0)
    # The back end dies in the middle of a RETR.
    client = login(organization, user)
    client.sock.sendall(b"RETR 1\r\n")
    client.sock.recv(1000)
    organization.mailbox["mbx1"].kill("pop3be")
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        while client.sock.recv(65536):
            pass
        raise EOFError
    wait_for_counters(organization, "cas1", "pop3", CurrentConnections=0, OpenTasks=0)


def test_slow_reader_does_not_make_the_proxy_buffer_the_message(
    organization: Organization,
) -> None:
    user = organization.add_mailbox("ivan@example.test")
    organization.deliver(user, message("huge", size=20_000_000))
    client = login(organization, user)
    client.noop()
    rss_before = _tree_rss_kib(organization.processes[0].pid)
    client.sock.sendall(b"RETR 1\r\n")
    client.sock.recv(100)
    time.sleep(2)  # read nothing more for a while
    growth_kib = _tree_rss_kib(organization.processes[0].pid) - rss_before
    # 20 MB wait on the back end; the proxy holds its socket buffers, not the message.
    assert growth_kib < 8_000, f"front end grew by {growth_kib} KiB"
    tail = b""
    received = 0
    while not tail.endswith(b"\r\n.\r\n"):
        chunk = client.sock.recv(1 << 20)
        assert chunk, "connection closed before the end of the message"
        received += len(chunk)
        tail = (tail + chunk)[-5:]
    assert received > 19_000_000
    client.quit()


def _tree_rss_kib(master: int) -> int:
    """The front end's memory: its master's and every worker's."""
    return sum(_rss_kib(pid) for pid in (master, *children(master)))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_front_end_protocol_log_and_counters(organization: Organization) -> None:

    user = organization.add_mailbox("judy@example.test")
    organization.set_frontend_settings(ProtocolLogEnabled=True)
    client = login(organization, user)
    client.stat()
    client.quit()
    folder = paths.server_folder(organization.data, "cas1").default_protocol_log_dir("pop3")
    deadline = time.monotonic() + 5
    text = ""
    while "Disconnected" not in text and time.monotonic() < deadline:
        text = "".join(p.read_text() for p in folder.glob("POP3*.LOG"))
        time.sleep(0.1)
    assert ",PASS,****,Backend=mbx1" in text
    assert PASSWORD not in text
    wait_for_counters(organization, "cas1", "pop3", CurrentConnections=0)
    snapshot = counters(organization, "cas1", "pop3")
    assert snapshot["SuccessfulLogins"] == 1
    assert isinstance(snapshot["BackendConnectLatencyMs"], float)
    assert snapshot["BackendConnectLatencyMs"] > 0
    json.dumps(snapshot)


def test_a_second_front_end_serves_the_same_organization(organization: Organization) -> None:
    import subprocess
    import sys

    from popguard.directory.directory import Directory
    from popguard.testing.net import free_loopback_address, wait_port

    user = organization.add_mailbox("kim@example.test", "DB02")
    organization.deliver(user, message("via cas2"))
    address = free_loopback_address()
    with Directory(organization.data) as directory:
        directory.new_server("cas2", ["frontend"], address)
    process = subprocess.Popen(
        [sys.executable, "-m", "popguard", "--data", str(organization.data), "serve", "pop3",
         "--server", "cas2"],
    )  # fmt: skip
    organization.processes.append(process)
    wait_port(address, 10995, process=process)
    client = SourcedPOP3SSL(address, 10995, None, organization.ssl_context(), 15)
    client.user(user)
    client.pass_(PASSWORD)
    assert client.stat()[0] == 1
    client.quit()


def test_max_connections_per_user_at_the_front_end(organization: Organization) -> None:

    user = organization.add_mailbox("liam@example.test")
    organization.set_frontend_settings(MaxConnectionsPerUser=1)
    held = login(organization, user)
    second = secure_client(organization)
    second.user(user)
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\] too many connections for this"):
        second.pass_(PASSWORD)
    second.quit()
    held.quit()


def test_garbage_flood_at_the_front_end(organization: Organization) -> None:
    junk = b"\x00\xff garbage\r\n" * 40 + b"B" * 70_000 + b"\r\n"
    with socket.create_connection((organization.frontend_address, organization.pop3_port)) as sock:
        sock.sendall(junk)
        sock.settimeout(10)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.rstrip().endswith(b"-ERR too many bad commands, closing the connection")
    assert b"Traceback" not in received
    user = organization.add_mailbox("mona@example.test")
    login(organization, user).quit()


def _plaintext_front_end(organization: Organization) -> None:
    from popguard.pop3.session import LoginType

    organization.set_frontend_settings(LoginType=LoginType.PLAIN_TEXT_LOGIN)


def test_client_that_half_closes_still_gets_every_reply(organization: Organization) -> None:
    user = organization.add_mailbox("nina@example.test")
    organization.deliver(user, message("half close"))
    _plaintext_front_end(organization)
    with socket.create_connection((organization.frontend_address, organization.pop3_port)) as sock:
        sock.sendall(f"USER {user}\r\nPASS {PASSWORD}\r\nSTAT\r\nNOOP\r\nQUIT\r\n".encode())
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(15)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    lines = received.split(b"\r\n")
    assert lines[2].startswith(b"+OK Logged in, 1 messages")
    assert lines[3].startswith(b"+OK 1 ")
    assert lines[4] == b"+OK"
    assert lines[5].startswith(b"+OK popguard signing off")
    wait_for_counters(organization, "cas1", "pop3", CurrentConnections=0, OpenTasks=0)
    snapshot = counters(organization, "cas1", "pop3")
    # USER and PASS parsed by the front end, STAT, NOOP and QUIT relayed as lines.
    assert snapshot["TotalCommands"] == 5


def test_slow_but_steady_download_outlives_the_idle_timeout(organization: Organization) -> None:

    user = organization.add_mailbox("oscar@example.test")
    organization.deliver(user, message("slow", size=6_000_000))
    organization.set_frontend_settings(AuthenticatedConnectionTimeout=2)
    client = login(organization, user)
    client.sock.sendall(b"RETR 1\r\n")
    tail, received = b"", 0
    started = time.monotonic()
    while not tail.endswith(b"\r\n.\r\n"):
        chunk = client.sock.recv(200_000)
        assert chunk, f"cut after {received} bytes and {time.monotonic() - started:.1f} s"
        received += len(chunk)
        tail = (tail + chunk)[-5:]
        time.sleep(0.05)  # about 4 MB/s at most: several seconds in all
    client.quit()


def test_long_password_through_the_front_end(organization: Organization) -> None:
    from popguard.directory.passwords import hash_password

    long_password = "p" * 420
    with organization.directory() as directory:
        directory.new_mailbox("paul@example.test", "DB01", hash_password(long_password))
    client = secure_client(organization)
    client.user("paul@example.test")
    assert client.pass_(long_password).startswith(b"+OK Logged in")
    client.quit()
