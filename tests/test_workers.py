"""A service's worker processes (net/workers.py): real masters, real workers, poplib.

Which worker serves a connection is the kernel's choice; a test makes it certain by
stopping the other worker (SIGSTOP) while it connects: a stopped process takes no
connection from the shared socket, so the one left running does.
"""

from __future__ import annotations

import contextlib
import json
import os
import poplib
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popguard import paths
from popguard.directory.settings import PopSettings
from popguard.net.workers import WORKER_HANG_LIMIT
from popguard.pop3.session import LoginType
from popguard.services.counters import read_counters
from popguard.services.server_limits import ConnectionTable, Key
from popguard.testing.organization import wait_until

from .conftest import (
    PASSWORD,
    MailboxServer,
    json_of,
    make_mailbox_server,
    message,
    pid_alive,
)

WORKERS = 2


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[MailboxServer]:
    """A mailbox server whose pop3be (and delivery) run two workers each."""
    settings = PopSettings(LoginType=LoginType.PLAIN_TEXT_LOGIN, WorkerProcesses=WORKERS)
    server = make_mailbox_server(tmp_path / "data", settings)
    try:
        server.start("pop3be")
        server.start("delivery")
        yield server
    finally:
        server.stop_all()


def counters(server: MailboxServer) -> dict[str, object]:
    path = paths.server_folder(server.data, server.name).counters_file("pop3be")
    return read_counters(path) or {}


def worker_pids(server: MailboxServer, but: tuple[int, ...] = ()) -> list[int]:
    """The pids of the workers once all of them serve (and none of `but` is among them)."""
    found: list[int] = []

    def serving() -> bool:
        now = counters(server)
        pids = [int(p) for p in now.get("WorkerProcessIds", [])]  # type: ignore[attr-defined]
        reported = now.get("WorkerConnections", {})
        found[:] = pids
        return (
            len(pids) == WORKERS
            and not set(pids) & set(but)
            and all(str(p) in reported for p in pids)  # type: ignore[operator]
        )

    wait_until(f"{WORKERS} workers serving", serving, 60)
    return found


@contextlib.contextmanager
def stopped(*pids: int) -> Iterator[None]:
    """These workers take no connection until the block ends."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def connect(server: MailboxServer) -> poplib.POP3:
    return poplib.POP3(server.address, server.pop3_port, timeout=15)


def login(server: MailboxServer, user: str) -> poplib.POP3:
    client = connect(server)
    client.user(user)
    client.pass_(PASSWORD)
    return client


def on_worker(server: MailboxServer, pids: list[int], pid: int, user: str) -> poplib.POP3:
    """A session of `user` served by the worker `pid`."""
    with stopped(*(other for other in pids if other != pid)):
        return login(server, user)


def test_both_workers_serve_and_their_counters_are_summed(two_workers: MailboxServer) -> None:
    server = two_workers
    user = server.add_mailbox("ada@example.test")
    server.deliver(user, message("hello"))
    pids = worker_pids(server)
    for pid in pids:
        client = on_worker(server, pids, pid, user)
        assert client.stat()[0] == 1
        client.quit()

    def both_counted() -> bool:
        now = counters(server)
        per_worker = now.get("WorkerConnections", {})
        return (
            all(int(per_worker.get(str(p), 0)) >= 1 for p in pids)  # type: ignore[attr-defined]
            and now.get("SuccessfulLogins") == 2
            and now.get("ProcessId") == server.processes["pop3be"].pid
        )

    wait_until("a connection counted by each worker and summed by the master", both_counted, 15)


def test_a_password_verified_by_one_worker_is_known_to_the_other(
    two_workers: MailboxServer,
) -> None:
    server = two_workers
    user = server.add_mailbox("eve@example.test")
    pids = worker_pids(server)
    for pid in pids:
        on_worker(server, pids, pid, user).quit()
    # One argon2id verification for two logins on two workers: the positive cache is
    # shared through the master.
    wait_until("both logins counted", lambda: counters(server).get("SuccessfulLogins") == 2, 15)
    assert counters(server)["KdfRuns"] == 1


def test_one_session_per_mailbox_across_workers(two_workers: MailboxServer) -> None:
    server = two_workers
    user = server.add_mailbox("bea@example.test")
    first_pid, second_pid = worker_pids(server)
    first = on_worker(server, [first_pid, second_pid], first_pid, user)
    with stopped(first_pid):
        second = connect(server)
        second.user(user)
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            second.pass_(PASSWORD)
    first.quit()
    # The first session's QUIT freed the mailbox for the second, on the other worker.
    second.user(user)
    second.pass_(PASSWORD)
    assert second.stat() == (0, 0)
    second.quit()


def test_a_killed_worker_frees_its_mailboxes_and_is_replaced(two_workers: MailboxServer) -> None:
    server = two_workers
    user = server.add_mailbox("cleo@example.test")
    server.deliver(user, message("one"))
    server.deliver(user, message("two"))
    pids = worker_pids(server)
    doomed, survivor = pids
    held = on_worker(server, pids, doomed, user)
    held.dele(1)  # marked, never applied: the session dies before QUIT
    os.kill(doomed, signal.SIGKILL)
    with pytest.raises((poplib.error_proto, OSError)):
        held.quit()
    # The kernel released the dead worker's lock: the mailbox is free at once, with
    # both messages.
    fresh = login(server, user)
    assert fresh.stat()[0] == 2
    fresh.quit()
    replaced = worker_pids(server, but=(doomed,))
    assert survivor in replaced
    # The replacement serves too.
    new = next(pid for pid in replaced if pid != survivor)
    again = on_worker(server, replaced, new, user)
    assert again.stat()[0] == 2
    again.quit()
    assert "died (signal 9); starting another" in server.log_text("pop3be")
    assert counters(server)["WorkerDeaths"] == 1


def test_a_hung_worker_is_killed_and_replaced_and_its_mailbox_freed(
    two_workers: MailboxServer,
) -> None:
    server = two_workers
    user = server.add_mailbox("hugo@example.test")
    other = server.add_mailbox("iris@example.test")
    server.deliver(user, message("kept"))
    server.start("health")  # turns the master's record of the kill into a recovery action
    pids = worker_pids(server)
    hung, survivor = pids
    held = on_worker(server, pids, hung, user)
    held.dele(1)  # marked, never applied: the session hangs before its QUIT
    os.kill(hung, signal.SIGSTOP)  # never continued: only a kill ends it
    # The other worker takes every new connection meanwhile; the hung one's mailbox
    # stays locked until the hung worker is gone.
    client = login(server, other)
    client.quit()
    busy = connect(server)
    busy.user(user)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        busy.pass_(PASSWORD)
    busy.quit()
    wait_until("the hung worker killed", lambda: not pid_alive(hung), WORKER_HANG_LIMIT + 30)
    replaced = worker_pids(server, but=(hung,))
    assert survivor in replaced
    fresh = login(server, user)
    assert fresh.stat()[0] == 1  # the DELE of the hung session was never applied
    fresh.quit()
    with pytest.raises((poplib.error_proto, OSError)):
        held.quit()
    assert "hung, killed" in server.log_text("pop3be")
    now = counters(server)
    assert (now["HungWorkersKilled"], now["WorkerDeaths"]) == (1, 1)
    records = paths.server_folder(server.data, server.name).hung_workers_file().read_text()
    (record,) = (json.loads(line) for line in records.splitlines())
    assert (record["service"], record["pid"]) == ("pop3be", hung)
    assert record["silent"] >= WORKER_HANG_LIMIT

    # The health engine makes it a recovery action, once.
    def recorded() -> list[dict[str, object]]:
        rows = json_of(server.data, "get-recoveryactions", "--server", server.name)
        return [row for row in rows if row["ResponderName"] == "WorkerWatchdog\\KillHungWorker"]

    wait_until("the kill among the recovery actions", lambda: bool(recorded()), 30)
    (action,) = recorded()
    assert action["Result"] == "Succeeded"
    assert f"pid {hung}" in str(action["Context"])


def greeted(server: MailboxServer) -> socket.socket:
    sock = socket.create_connection((server.address, server.pop3_port), timeout=15)
    assert sock.recv(200).startswith(b"+OK")
    return sock


def test_the_connection_limit_is_the_servers_not_a_workers(two_workers: MailboxServer) -> None:
    server = two_workers
    server.set_settings(MaxConnectionFromSingleIP=2)
    pids = worker_pids(server)
    held = []
    try:
        # One connection on each worker: each worker alone is under the limit.
        for pid in pids:
            with stopped(*(other for other in pids if other != pid)):
                held.append(greeted(server))
        for _ in range(4):  # whichever worker takes it, the server is full for this address
            with socket.create_connection((server.address, server.pop3_port), timeout=15) as sock:
                refused = sock.recv(200)
            assert (
                refused
                == b"-ERR [SYS/TEMP] too many connections from your address, try again later\r\n"
            )
        held.pop().close()
        wait_until("a place is free again", lambda: _admitted(server), 15)
    finally:
        for sock in held:
            sock.close()


def _admitted(server: MailboxServer) -> bool:
    with socket.create_connection((server.address, server.pop3_port), timeout=15) as sock:
        return sock.recv(200).startswith(b"+OK")


def test_a_restart_of_the_workers_refuses_no_connection(two_workers: MailboxServer) -> None:
    server = two_workers
    user = server.add_mailbox("dora@example.test")
    server.deliver(user, message("kept"))
    old = worker_pids(server)
    master = server.processes["pop3be"].pid
    outcomes: list[bytes] = []
    done = threading.Event()

    def knock() -> None:
        # Bounded in count and time; every connection must be greeted.
        deadline = time.monotonic() + 60
        while not done.is_set() and len(outcomes) < 2000 and time.monotonic() < deadline:
            try:
                with socket.create_connection((server.address, server.pop3_port), 15) as sock:
                    outcomes.append(sock.recv(200)[:3])
            except OSError as exc:
                outcomes.append(repr(exc).encode())

    knocker = threading.Thread(target=knock)
    knocker.start()
    try:
        os.kill(master, signal.SIGHUP)
        new = worker_pids(server, but=tuple(old))
        wait_until("the old workers gone", lambda: not any(pid_alive(p) for p in old), 30)
    finally:
        done.set()
        knocker.join()
    assert server.processes["pop3be"].poll() is None  # the master itself stayed
    assert len(new) == WORKERS
    assert outcomes and set(outcomes) == {b"+OK"}, set(outcomes)
    client = login(server, user)
    assert client.stat()[0] == 1
    client.quit()


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["admit", "login", "user", "done", "close", "gone"]),
            st.integers(0, 2),  # worker
            st.integers(0, 7),  # connection
            st.sampled_from(["10.0.0.1", "10.0.0.2", "127.9.9.9"]),
        ),
        max_size=80,
    )
)
@settings(max_examples=200, deadline=None)
def test_the_connection_table_gives_back_all_it_counts(
    steps: list[tuple[str, int, int, str]],
) -> None:
    limits = PopSettings(MaxConnections=5, MaxConnectionFromSingleIP=3, MaxConnectionsPerUser=2)
    evicted: list[Key] = []
    table = ConnectionTable(lambda: limits, evicted.append)
    admitted: dict[Key, str] = {}
    for op, worker, number, ip in steps:
        key = (worker, f"s{number}")
        if op == "admit" and key not in admitted:
            if table.admit(key, ip, local=ip.startswith("127.")) is None:
                admitted[key] = ip
        elif op == "login":
            table.logged_in(key)
        elif op == "user":
            table.take_user(key, "u@example.test")
        elif op == "done":
            table.give_back_user(key)
        elif op == "close":
            table.closed(key)
            admitted.pop(key, None)
        elif op == "gone":
            table.worker_gone(worker)
            admitted = {k: v for k, v in admitted.items() if k[0] != worker}
        per_ip = Counter(admitted.values())
        assert all(n <= 3 for a, n in per_ip.items() if not a.startswith("127."))
        # Over MaxConnections only by connections told to go and not closed yet.
        going = sum(1 for k in evicted if k in admitted)
        assert sum(per_ip.values()) - per_ip["127.9.9.9"] <= 5 + going
        assert table.connections == len(admitted)
    for key in list(admitted):
        table.closed(key)
    assert table.connections == 0
    assert table.admit((9, "fresh"), "10.0.0.1", local=False) is None
    assert table.take_user((9, "fresh"), "u@example.test")
