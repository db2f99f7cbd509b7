"""Replication benchmark: lag under a steady delivery load, switchover time for a
database of 10,000 messages, seeding throughput.

    .venv/bin/python -m bench.replication [--messages 10000] [--rates 50,200,0]

Everything is set up through the `popguard` command in a fresh data folder: mbx1
and mbx2 (and mbx3 for seeding) on loopback addresses of their own, each running
`serve delivery`, `serve pop3be` and `serve replication`; DB01 active on mbx1 with a
copy on mbx2. Mail goes in over LMTP, one transaction per message, as an MTA would.

1. Lag: at each delivery rate (messages/s; 0 = as fast as one LMTP connection
   goes) for `--duration` seconds, the time from each message's 250 to the moment
   its LSN is in mbx2's copy (read from mbx2's copy file every 5 ms), and the
   largest copy queue length seen (in entries).
2. Switchover: DB01 filled to `--messages` messages, then
   `move-activemailboxdatabase DB01 --activate-on-server mbx2`, timed from outside
   (the whole command) and as the command reports it, while deliveries go on all
   along (the longest gap between two 250s is the outage an MTA sees); then every
   message on mbx2 is compared with mbx1's (UIDs and content).
3. Seeding: `add-mailboxdatabasecopy DB01 --server mbx3`, timed (command included)
   until mbx3's copy file holds the active copy's last LSN; MB/s over the octets of
   the messages in the copy (the log replayed is larger: it holds deleted ones too).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import shutil
import smtplib
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.report import machine, percentile, write_results
from popguard.testing.net import free_loopback_address, wait_port
from popguard.testing.organization import popguard_output, serve
from popguard.testing.processes import stop_processes

USER = "bench@popguard.test"
MAILBOX_PORTS = (1110, 1995, 2424, 2425, 64327)  # a mailbox server's, on its own address


def popguard(data: Path, *args: str, stdin: str | None = None) -> str:
    # Longer than a test's: a switchover or a seeding of 10,000 messages is one command.
    return popguard_output(data, *args, stdin=stdin, timeout=300)


class Organization:
    def __init__(self, data: Path) -> None:
        self.data = data
        self.addresses: dict[str, str] = {}
        self.processes: list[subprocess.Popen[bytes]] = []

    def add_server(self, name: str) -> None:
        address = free_loopback_address(MAILBOX_PORTS)
        popguard(self.data, "new-server", name, "--role", "mailbox", "--address", address)
        self.addresses[name] = address
        for service, port in (("delivery", 2424), ("pop3be", 1110), ("replication", 64327)):
            process = serve(self.data, service, name, self.data / f"{name}.log")
            self.processes.append(process)
            wait_port(address, port, timeout=30, process=process)

    def stop(self) -> None:
        stop_processes(self.processes)

    def copy_file(self, server: str) -> Path:
        return self.data / "servers" / server / "databases" / "DB01.sqlite"

    def last_lsn(self, server: str) -> int:
        path = self.copy_file(server)
        if not path.exists():
            return 0
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            # A trimmed log may be empty: its head is then its base.
            for query in (
                "SELECT COALESCE((SELECT MAX(lsn) FROM change_log), "
                "(SELECT base_lsn FROM copy_state), 0)",
                "SELECT COALESCE(MAX(lsn), 0) FROM change_log",  # a popguard without trimming
            ):
                with contextlib.suppress(sqlite3.OperationalError):
                    return int(db.execute(query).fetchone()[0])
            return 0
        finally:
            db.close()

    def status(self, identity: str) -> dict[str, Any]:
        shown = popguard(self.data, "get-mailboxdatabasecopystatus", "--identity", identity,
                         "--format", "json")  # fmt: skip
        row: dict[str, Any] = json.loads(shown)[0]
        return row

    def wait_healthy(self, identity: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.status(identity)
            if row["Status"] == "Healthy" and row["CopyQueueLength"] == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{identity} not Healthy after {timeout}s: {row}")


def message(number: int, size: int) -> bytes:
    head = f"From: load@example.test\r\nSubject: bench {number}\r\n\r\n".encode()
    line = b"x" * 70 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


class Lmtp:
    """One LMTP connection to whichever server holds DB01, reopened after a failure."""

    def __init__(self, org: Organization, recipient: str = USER) -> None:
        self.org = org
        self.recipient = recipient
        self.client: smtplib.LMTP | None = None

    def deliver(self, content: bytes) -> int:
        """The reply code (250, or 451 during a move; 0 when the connection failed)."""
        try:
            if self.client is None:
                active = active_server(self.org.data)
                self.client = smtplib.LMTP(self.org.addresses[active], 2424, timeout=30)
                self.client.ehlo()
            self.client.mail("load@example.test")
            self.client.rcpt(self.recipient)
            code, _ = self.client.data(content)
        except (OSError, smtplib.SMTPException) as exc:
            code = exc.smtp_code if isinstance(exc, smtplib.SMTPResponseException) else 0
            self.close()
            return code
        if code != 250:  # 451 during a move: look up the active server again
            self.close()
        return int(code)

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        self.client = None


def active_server(data: Path) -> str:
    db = sqlite3.connect(data / "directory.sqlite", timeout=10)
    try:
        row = db.execute(
            "SELECT server FROM database_copies WHERE database = 'DB01' AND is_active = 1"
        ).fetchone()
        return str(row[0])
    finally:
        db.close()


def measure_lag(org: Organization, rate: float, duration: float, size: int) -> dict[str, Any]:
    """Deliver at `rate`/s for `duration` s; delay from each 250 to its LSN on mbx2."""
    acked: dict[int, float] = {}  # LSN on mbx1 -> when acknowledged
    seen: dict[int, float] = {}
    stop = threading.Event()
    max_queue = 0

    def watch() -> None:
        nonlocal max_queue
        while not stop.is_set() or len(seen) < len(acked):
            now = time.monotonic()
            passive = org.last_lsn("mbx2")
            for lsn in [lsn for lsn in acked if lsn not in seen and lsn <= passive]:
                seen[lsn] = now
            max_queue = max(max_queue, org.last_lsn("mbx1") - passive)
            if stop.is_set() and now - stopped_at > 30:
                return
            time.sleep(0.005)

    stopped_at = 0.0
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    lmtp = Lmtp(org)
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < duration:
        if rate:
            ahead = start + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        if lmtp.deliver(message(sent, size)) == 250:
            acked[org.last_lsn("mbx1")] = time.monotonic()
        sent += 1
    elapsed = time.monotonic() - start
    lmtp.close()
    stop.set()
    stopped_at = time.monotonic()
    watcher.join(40)
    delays = [(seen[lsn] - acked[lsn]) * 1000 for lsn in acked if lsn in seen]
    return {
        "target_rate": rate,
        "delivered_per_s": round(len(acked) / elapsed, 1),
        "messages": len(acked),
        "replicated": len(delays),
        "delay_ms_p50": round(percentile(delays, 0.5) or 0.0, 1),
        "delay_ms_p99": round(percentile(delays, 0.99) or 0.0, 1),
        "delay_ms_max": round(max(delays, default=0.0), 1),
        "max_copy_queue": max_queue,
    }


def fill(org: Organization, count: int, size: int) -> float:
    lmtp = Lmtp(org)
    start = time.monotonic()
    for number in range(count):
        if lmtp.deliver(message(number, size)) != 250:
            raise RuntimeError(f"filling: delivery {number} refused")
    lmtp.close()
    return time.monotonic() - start


def copy_content(org: Organization, server: str) -> list[tuple[int, bytes]]:
    db = sqlite3.connect(f"file:{org.copy_file(server)}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT uid, wire FROM messages WHERE address = ? ORDER BY uid", (USER,)
        ).fetchall()
        return [(int(uid), bytes(wire)) for uid, wire in rows]
    finally:
        db.close()


def measure_switchover(org: Organization) -> dict[str, Any]:
    """Time the move, with deliveries running all along: the longest gap between
    two acknowledged deliveries is the outage a sending MTA sees."""
    before = copy_content(org, "mbx1")
    acks: list[float] = []
    refused: list[int] = []
    done = threading.Event()

    def deliver_all_along() -> None:
        lmtp = Lmtp(org)
        number = 0
        while not done.is_set():
            code = lmtp.deliver(message(1_000_000 + number, 2000))
            if code == 250:
                acks.append(time.monotonic())
                number += 1
            else:
                refused.append(code)
            time.sleep(0.01)
        lmtp.close()

    delivery = threading.Thread(target=deliver_all_along)
    delivery.start()
    time.sleep(1.0)
    start = time.monotonic()
    moved = subprocess.run(
        [sys.executable, "-m", "popguard", "--data", str(org.data), "move-activemailboxdatabase",
         "DB01", "--activate-on-server", "mbx2", "--format", "json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    wall = time.monotonic() - start
    time.sleep(1.0)
    done.set()
    delivery.join(60)
    if moved.returncode != 0:
        raise RuntimeError(f"switchover failed: {moved.stderr}")
    reported = json.loads(moved.stdout)[0]
    after = copy_content(org, "mbx2")
    gaps = [b - a for a, b in itertools.pairwise(acks)]
    return {
        "messages": len(before),
        "command_seconds": round(wall, 2),
        "reported_seconds": reported["Seconds"],
        "changes_at_risk": reported["ChangesAtRisk"],
        "identical": after[: len(before)] == before,
        "deliveries_during": len(acks),
        "delivery_outage_s": round(max(gaps, default=0.0), 3),
        "refusals": {str(code): refused.count(code) for code in sorted(set(refused))},
    }


def measure_seeding(org: Organization, timeout: float, server: str = "mbx3") -> dict[str, Any]:
    org.add_server(server)
    octets = sum(len(wire) for _, wire in copy_content(org, active_server(org.data)))
    target = org.last_lsn(active_server(org.data))
    started_at, start = time.time(), time.monotonic()  # the wall clock: the logs' times
    popguard(org.data, "add-mailboxdatabasecopy", "DB01", "--server", server)
    # Timed on the copy file itself (status reports come once a second).
    while org.last_lsn(server) < target:
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{server} not seeded after {timeout}s")
        time.sleep(0.01)
    seconds = time.monotonic() - start
    org.wait_healthy(f"DB01\\{server}", 60)
    healthy_seconds = time.monotonic() - start  # within a status report and a command
    log = (org.data / f"{server}.log").read_text(errors="replace")
    return {
        "octets": octets,
        "started_at": started_at,
        "seconds": round(seconds, 2),
        "healthy_seconds": round(healthy_seconds, 2),
        "mb_per_s": round(octets / seconds / 1e6, 1),
        "file_mb": round(org.copy_file(server).stat().st_size / 1e6, 1),
        "from": "snapshot" if "seeded from" in log else "log replay",
    }


@contextlib.contextmanager
def organization(keep: bool) -> Iterator[Organization]:
    folder = Path(tempfile.mkdtemp(prefix="popguard-repl-bench-"))
    org = Organization(folder / "data")
    try:
        yield org
    finally:
        org.stop()
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000, help="for the switchover")
    parser.add_argument("--size", type=int, default=10_000, help="octets per message")
    parser.add_argument("--rates", default="50,200,0", help="messages/s; 0 = unpaced")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--keep", action="store_true", help="keep the data folder")
    args = parser.parse_args(argv)
    ran_on = machine()
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": ran_on["commit"],
        "machine": ran_on,
    }
    with organization(args.keep) as org:
        org.data.mkdir(parents=True)
        org.add_server("mbx1")
        org.add_server("mbx2")
        popguard(org.data, "new-mailboxdatabase", "DB01", "--server", "mbx1")
        popguard(org.data, "add-mailboxdatabasecopy", "DB01", "--server", "mbx2")
        popguard(org.data, "new-mailbox", USER, "--database", "DB01", "--password-stdin",
                 stdin="bench password\n")  # fmt: skip
        org.wait_healthy("DB01\\mbx2", 60)
        report["lag"] = []
        for rate in (float(r) for r in args.rates.split(",")):
            result = measure_lag(org, rate, args.duration, 4_000)
            print(json.dumps(result), flush=True)
            report["lag"].append(result)
        already = len(copy_content(org, "mbx1"))
        fill_seconds = fill(org, max(0, args.messages - already), args.size)
        report["fill"] = {"messages": args.messages, "seconds": round(fill_seconds, 1)}
        print(json.dumps(report["fill"]), flush=True)
        org.wait_healthy("DB01\\mbx2", 300)
        report["switchover"] = measure_switchover(org)
        print(json.dumps(report["switchover"]), flush=True)
        report["seeding"] = measure_seeding(org, 600)
        print(json.dumps(report["seeding"]), flush=True)
    print(f"wrote {write_results('replication', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
