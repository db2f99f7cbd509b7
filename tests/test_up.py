"""`popguard up` as a new user runs it: start, read the demo mailbox, Ctrl-C."""

from __future__ import annotations

import json
import os
import poplib
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

from .conftest import free_loopback_address, pid_alive, popguard, processes_matching


def test_up_serves_the_demo_mailbox_and_stops_cleanly(tmp_path: Path) -> None:
    frontend, mailbox, second = (free_loopback_address() for _ in range(3))
    data = tmp_path / "data"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "popguard",
            "--data",
            str(data),
            "up",
            "--frontend-address",
            frontend,
            "--address",
            mailbox,
            "--second-address",
            second,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        output = ""
        deadline = time.monotonic() + 60
        while "Press Ctrl-C to stop." not in output and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output += line
        assert "Press Ctrl-C to stop." in output, output
        match = re.search(r"demo mailbox (\S+) \(in DB01\)\s+password (\S+)", output)
        assert match, output
        user, password = match.groups()
        assert f"curl --ssl-reqd --cacert {data.resolve()}/tls/ca.pem" in output
        context = ssl.create_default_context(cafile=str(data / "tls" / "ca.pem"))
        # Through the front end, as the printed commands do.
        assert f"pop3s://{frontend}:10995/1" in output
        client = poplib.POP3_SSL(frontend, 10995, context=context, timeout=10)
        client.user(user)
        client.pass_(password)
        _, lines, _ = client.retr(1)
        assert b"Subject: Welcome to popguard" in lines
        client.quit()
        children = processes_matching(f"popguard --data {data} serve")
        # pop3be, delivery, replication, health twice; pop3 and health
        assert len(children) == 10, children
        # mbx2's copy of DB01 follows mbx1's: the welcome message is there too.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            shown = popguard(data, "get-mailboxdatabasecopystatus", "--identity", "DB01\\mbx2",
                             "--format", "json")  # fmt: skip
            if json.loads(shown.stdout)[0]["Status"] == "Healthy":
                break
            time.sleep(0.5)
        assert json.loads(shown.stdout)[0]["CopyQueueLength"] == 0, shown.stdout
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=30)
    finally:
        # However the checks above went, nothing of this test may outlive it:
        # Ctrl-C is how `up` stops its services.
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(30)
    assert process.returncode == 0, rest
    assert "stopped" in rest
    assert "Traceback" not in output + rest
    assert not [pid for pid in children if pid_alive(pid)]


def test_services_run_under_supervisord_and_restart_for_real(tmp_path: Path) -> None:
    frontend, mailbox, second = (free_loopback_address() for _ in range(3))
    data = tmp_path / "data"
    started = popguard(data, "up", "--detach", "--frontend-address", frontend, "--address",
                       mailbox, "--second-address", second)  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr
        assert "`popguard down` stops it." in started.stdout

        def services(server: str) -> dict[str, dict[str, object]]:
            shown = popguard(data, "get-service", "--server", server, "--format", "json")
            assert shown.returncode == 0, shown.stderr
            return {row["Name"]: row for row in json.loads(shown.stdout)}

        before = services("mbx1")
        assert set(before) == {"pop3be", "delivery", "replication", "health"}
        assert all(row["Status"] == "Running" for row in before.values()), before
        restarted = popguard(data, "restart-service", "pop3be", "--server", "mbx1",
                             "--format", "json")  # fmt: skip
        (row,) = json.loads(restarted.stdout)
        assert row["Status"] == "Running" and row["ProcessId"] != before["pop3be"]["ProcessId"]
        assert not pid_alive(int(str(before["pop3be"]["ProcessId"])))
        # A crashed service is started again by the supervisor.
        os.kill(int(row["ProcessId"]), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = services("mbx1")["pop3be"]
            if now["Status"] == "Running" and now["ProcessId"] != row["ProcessId"]:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"pop3be was not started again: {now}")
        refused = popguard(data, "restart-server", "mbx1")
        assert refused.returncode == 1 and "holds the active copy of DB01" in refused.stderr
        stopped = popguard(data, "stop-service", "health", "--server", "cas1", "--format", "json")
        assert json.loads(stopped.stdout)[0]["Status"] == "Stopped"
        wrong = popguard(data, "restart-service", "pop3be", "--server", "cas1")
        assert wrong.returncode == 1 and "cas1 runs pop3, health; not pop3be" in wrong.stderr
        again = popguard(data, "up", "--detach")
        assert again.returncode == 1 and "already up" in again.stderr
    finally:
        down = popguard(data, "down")
    assert down.returncode == 0, down.stderr
    assert processes_matching(f"popguard --data {data} serve") == []
