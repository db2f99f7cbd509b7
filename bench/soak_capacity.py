"""Soak at capacity: `popguard up` at 80% of the POP3 sessions per second its front end
can serve, many mailboxes, every health set running; optionally one front-end worker
hung (SIGSTOP) halfway.

    .venv/bin/python -m bench.soak_capacity [--minutes 10] [--fraction 0.8]
        [--mailboxes 200] [--clients 16] [--capacity-seconds 30] [--hang-worker]

Starts the organization as an operator does (`popguard up --detach`, fresh data
folder), waits until every monitor is Healthy, then:

1. makes `--mailboxes` mailboxes, half in DB01 and half in DB02, and delivers
   `--keep-messages` + 1 messages to each over LMTP;
2. **capacity**: `--clients` client threads, closed loop, for `--capacity-seconds`:
   each session goes through cas1 (implicit TLS, verified against DATA/tls/ca.pem) on
   a mailbox no other thread is using: login, STAT, RETR of the newest message, DELE
   of all but the newest `--keep-messages`, QUIT. Sessions per second = capacity
   (of this machine, with this generator sharing its cores: that is what the load
   below is a fraction of);
3. **soak**: for `--minutes`, sessions started at `--fraction` of that rate (open
   loop, up to twice `--clients` sessions at once: a session waits for a free client
   thread and counts as late if it had to),
   and LMTP deliveries at `--lmtp-rate` to random mailboxes, which keep them filled.
   Every 2 s every monitor of every server is read from the health API;
4. with `--hang-worker`, halfway: SIGSTOP one of cas1's pop3 workers (never
   continued). Its master kills it once it has been silent WORKER_HANG_LIMIT seconds
   and starts another; the health engine records that as a recovery action. Reported:
   the sessions in flight at the SIGSTOP (an upper bound of what the worker held), the
   failed sessions that started before and after it, when the worker was killed.

A mailbox whose session failed rests for QUARANTINE seconds before it is used again,
as a real client polls minutes apart: a session the hung worker held keeps its
mailbox locked on the back end ([IN-USE]) until the worker is killed.

PASS without --hang-worker: no alert, no recovery action. With it: no alert, the one
recovery action is the hung worker's kill, and every session started after the
SIGSTOP succeeded. Results go to bench/results/ (JSON, with a Markdown table).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import poplib
import queue
import random
import signal
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import machine, write_results
from bench.soak import (
    SESSION_TIMEOUT,
    SETTLE_TIMEOUT,
    HealthWatch,
    Tally,
    failed_probes,
    load_table,
    message,
    read_and_delete,
)
from popguard import paths
from popguard.control.service_user import SERVICE_USER_VARIABLE
from popguard.directory.directory import Directory
from popguard.directory.passwords import hash_password
from popguard.errors import UserError
from popguard.health.worker_repairs import RESPONDER as HUNG_RESPONDER
from popguard.net.workers import WORKER_HANG_LIMIT
from popguard.services.counters import read_counters
from popguard.services.lmtp_client import deliver
from popguard.testing.organization import (
    DEFAULT_ADDRESSES,
    SERVERS,
    OrganizationError,
    UpOrganization,
    up_organization,
)

QUARANTINE = 60.0  # seconds a mailbox rests after a failed session
PASSWORD = "soak at capacity"


class Mailboxes:
    """The mailboxes no session is using now; one that failed rests a while first."""

    def __init__(self, addresses: list[str]) -> None:
        self._free: queue.Queue[str] = queue.Queue()
        for address in addresses:
            self._free.put(address)
        self._resting: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def take(self, timeout: float) -> str | None:
        with self._lock:
            now = time.monotonic()
            for rested in [a for t, a in self._resting if t <= now]:
                self._free.put(rested)
            self._resting = [(t, a) for t, a in self._resting if t > now]
        try:
            return self._free.get(timeout=timeout)
        except queue.Empty:
            return None

    def give_back(self, address: str, failed: bool) -> None:
        if failed:
            with self._lock:
                self._resting.append((time.monotonic() + QUARANTINE, address))
        else:
            self._free.put(address)


def session(host: str, context: ssl.SSLContext, address: str, keep: int) -> str:
    """One session through cas1; '' if all went well, else what failed."""
    try:
        client = poplib.POP3_SSL(host, 10995, context=context, timeout=SESSION_TIMEOUT)
    except OSError as exc:
        return f"connect: {type(exc).__name__}: {exc}"
    try:
        read_and_delete(client, address, PASSWORD, keep)
    except (poplib.error_proto, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(OSError):
            client.close()
    return ""


@dataclass
class Load:
    """Sessions under way and how they ended, as the clients report them."""

    tally: Tally = field(default_factory=Tally)
    in_flight: int = 0
    # (started, error) of every session: which failed before and after a hang
    ends: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run_one(self, host: str, context: ssl.SSLContext, boxes: Mailboxes, keep: int) -> None:
        address = boxes.take(timeout=SESSION_TIMEOUT)
        started = time.monotonic()
        if address is None:
            error = "no mailbox free"
        else:
            with self.lock:
                self.in_flight += 1
            try:
                error = session(host, context, address, keep)
            finally:
                with self.lock:
                    self.in_flight -= 1
            boxes.give_back(address, bool(error))
        with self.lock:
            self.tally.record(started, error, len(self.ends))
            self.ends.append((started, error))


def make_mailboxes(org: UpOrganization, count: int, keep: int) -> list[str]:
    password_hash = hash_password(PASSWORD)
    addresses = [f"soak{n:04d}@popguard.test" for n in range(count)]
    with Directory(org.data) as directory:
        for n, address in enumerate(addresses):
            directory.new_mailbox(address, "DB01" if n % 2 == 0 else "DB02", password_hash)
        for n, address in enumerate(addresses):
            for m in range(keep + 1):
                result = deliver(directory, address, message(n * 100 + m), "soak@popguard.test")
                if result.code != 250:
                    raise OrganizationError(f"delivery to {address}: {result.reply}")
    return addresses


def prime(host: str, context: ssl.SSLContext, addresses: list[str], clients: int) -> int:
    """One session on every mailbox, so that the capacity is that of users who log in
    every few minutes (their passwords in the 5-minute caches), not of first logins
    (one argon2id verification each on the front end and the back end). Failures."""
    failures = 0
    lock = threading.Lock()

    def client(share: list[str]) -> None:
        nonlocal failures
        for address in share:
            if session(host, context, address, keep=sys.maxsize):  # deletes nothing
                with lock:
                    failures += 1

    threads = [threading.Thread(target=client, args=(addresses[n::clients],))
               for n in range(clients)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SESSION_TIMEOUT * 6 * len(addresses))
    return failures


def measure_capacity(
    host: str, context: ssl.SSLContext, boxes: Mailboxes, args: argparse.Namespace
) -> dict[str, Any]:
    load = Load()
    until = time.monotonic() + args.capacity_seconds

    def client() -> None:
        while time.monotonic() < until:
            load.run_one(host, context, boxes, args.keep_messages)

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(args.capacity_seconds + SESSION_TIMEOUT * 6)
    seconds = time.monotonic() - started
    report = load.tally.report()
    return {
        "seconds": round(seconds, 1),
        "clients": args.clients,
        "sessions_per_s": round(load.tally.ok / seconds, 2),
        "sessions": report,
    }


def frontend_workers(org: UpOrganization) -> list[int]:
    counters = read_counters(paths.server_folder(org.data, "cas1").counters_file("pop3")) or {}
    return [int(pid) for pid in counters.get("WorkerProcessIds", [])]


def pid_alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rpartition(")")[2].split()[0] != "Z"


def soak(
    org: UpOrganization,
    host: str,
    context: ssl.SSLContext,
    boxes: Mailboxes,
    addresses: list[str],
    rate: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    load, deliveries = Load(), Tally()
    started, started_wall = time.monotonic(), time.time()
    until = started + args.minutes * 60
    hang_at = started + args.minutes * 30 if args.hang_worker else None
    hang: dict[str, Any] = {}
    stop = threading.Event()
    # Twice the capacity run's clients: an open loop whose sessions queue for a thread
    # would measure the generator; these queue at the server, if anywhere.
    threads = 2 * args.clients
    slots = threading.Semaphore(threads)

    planned = int(rate * args.minutes * 60) + 1
    behind = {"not_started": 0}

    def sessions() -> None:
        for n in range(planned):
            slot = started + n / rate
            if slot >= until or stop.is_set():
                return
            # A loop fallen behind stops at the deadline too: what it did not start by
            # then is counted, not started late (the soak lasts its minutes).
            if time.monotonic() >= until:
                behind["not_started"] = planned - n
                return
            if stop.wait(max(0.0, slot - time.monotonic())):
                return
            if not slots.acquire(blocking=False):
                load.tally.late += 1
                if not slots.acquire(timeout=SESSION_TIMEOUT * 6):
                    continue
            thread = threading.Thread(target=lambda: _run(load, host, context, boxes, args, slots))
            thread.start()

    def lmtp() -> None:
        with Directory(org.data) as directory:
            for n in range(int(args.lmtp_rate * args.minutes * 60) + 1):
                slot = started + n / args.lmtp_rate
                if slot >= until or stop.wait(max(0.0, slot - time.monotonic())):
                    return
                began = time.monotonic()
                recipient = random.choice(addresses)
                try:
                    result = deliver(directory, recipient, message(10**6 + n), "soak@popguard.test")
                    error = "" if result.code == 250 else f"{result.code} {result.reply}"
                except UserError as exc:
                    error = str(exc)
                deliveries.record(began, error, n)

    pacer, lmtp_thread = threading.Thread(target=sessions), threading.Thread(target=lmtp)
    with HealthWatch(org, started) as watch:
        pacer.start()
        lmtp_thread.start()
        next_report = started + 60
        try:
            while pacer.is_alive() or lmtp_thread.is_alive():
                time.sleep(0.5)
                now = time.monotonic()
                if hang_at is not None and not hang and now >= hang_at:
                    hang = hang_worker(org, load, started)
                if hang and "killed_after_s" not in hang and not pid_alive(hang["pid"]):
                    hang["killed_after_s"] = round(now - started - hang["at_s"], 1)
                    print(f"  the hung worker is gone {hang['killed_after_s']} s after its "
                          "SIGSTOP", flush=True)  # fmt: skip
                if now >= next_report:
                    next_report += 60
                    t = load.tally
                    print(f"  {(now - started) / 60:.0f} min: sessions {t.ok} ok {t.failed} "
                          f"failed {t.late} late, deliveries {deliveries.ok} ok "
                          f"{deliveries.failed} failed, monitors seen not Healthy: "
                          f"{len(watch.seen)}", flush=True)  # fmt: skip
        finally:
            stop.set()
            pacer.join(SESSION_TIMEOUT * 8)
            lmtp_thread.join(SESSION_TIMEOUT * 8)
            for _ in range(threads):  # every session thread has ended
                slots.acquire(timeout=SESSION_TIMEOUT * 8)
    seconds = time.monotonic() - started
    alerts = {s: org.cli_json("get-alerts", "--server", s) for s in SERVERS}
    actions = {s: org.cli_json("get-recoveryactions", "--server", s) for s in SERVERS}
    alert_count = sum(len(v) for v in alerts.values())
    action_rows = [a for rows in actions.values() for a in rows]
    hung_kills = [a for a in action_rows if a["ResponderName"] == HUNG_RESPONDER]
    others = [a for a in action_rows if a["ResponderName"] != HUNG_RESPONDER]
    result: dict[str, Any] = {
        "seconds": round(seconds, 1),
        "rate": round(rate, 2),
        "sessions_per_s": round(len(load.ends) / seconds, 2),
        "sessions_planned": planned,
        "sessions_not_started": behind["not_started"],
        "sessions": load.tally.report(),
        "deliveries": deliveries.report(),
        "deliveries_per_s": round((deliveries.ok + deliveries.failed) / seconds, 2),
        "alerts": alert_count,
        "recovery_actions": len(action_rows),
        "hung_worker_kills": len(hung_kills),
        "alert_rows": alerts,
        "recovery_action_rows": actions,
        "health_looks": watch.looks,
        "health_looks_missed": dict(watch.missed),
        "monitors_ever_not_healthy": watch.seen,
        "failed_probe_results": failed_probes(org, started_wall),
    }
    if hang:
        at = started + hang["at_s"]
        hang["failed_started_before"] = sum(1 for s, e in load.ends if e and s < at)
        hang["failed_started_after"] = sum(1 for s, e in load.ends if e and s >= at)
        hang["errors_after"] = sorted({e[:120] for s, e in load.ends if e and s >= at})[:5]
        result["hang"] = hang
        passed = (alert_count == 0 and not others and len(hung_kills) == 1
                  and hang["failed_started_after"] == 0
                  and hang["failed_started_before"] <= hang["in_flight"])  # fmt: skip
    else:
        passed = alert_count == 0 and not action_rows
    result["verdict"] = "PASS" if passed else "FAIL"
    return result


def _run(
    load: Load,
    host: str,
    context: ssl.SSLContext,
    boxes: Mailboxes,
    args: argparse.Namespace,
    slots: threading.Semaphore,
) -> None:
    try:
        load.run_one(host, context, boxes, args.keep_messages)
    finally:
        slots.release()


def hang_worker(org: UpOrganization, load: Load, started: float) -> dict[str, Any]:
    workers = frontend_workers(org)
    if len(workers) < 2:
        raise OrganizationError(f"cas1's pop3 has {len(workers)} worker(s): nothing to hang")
    pid = workers[0]
    with load.lock:
        in_flight = load.in_flight
        os.kill(pid, signal.SIGSTOP)
    at = round(time.monotonic() - started, 1)
    print(f"  {at} s: SIGSTOP to cas1's pop3 worker {pid}, {in_flight} sessions in flight",
          flush=True)  # fmt: skip
    return {"pid": pid, "at_s": at, "in_flight": in_flight, "workers": workers}


def markdown(capacity: dict[str, Any], result: dict[str, Any]) -> str:
    given = (f" (the soak's rate is a fraction of {capacity['given']} sessions/s given "
             "with --capacity)" if capacity.get("given") else "")  # fmt: skip
    lines = [
        f"Capacity: {capacity['sessions_per_s']} sessions/s with {capacity['clients']} "
        f"clients in a closed loop for {capacity['seconds']} s "
        f"(p50 {capacity['sessions']['latency_ms']['p50']} ms, "
        f"{capacity['sessions']['failed']} failed){given}; soaked at {result['rate']} "
        f"sessions/s; {result['sessions_not_started']:,} of {result['sessions_planned']:,} "
        "planned sessions not started by the deadline.",
        "",
        *load_table(result),
        "",
        f"Alerts: {result['alerts']}; recovery actions: {result['recovery_actions']} "
        f"(of them hung-worker kills: {result['hung_worker_kills']}); monitors ever seen "
        f"not Healthy: {len(result['monitors_ever_not_healthy'])}; probe instances with "
        f"failed results: {len(result['failed_probe_results'])}.",
    ]
    hang = result.get("hang")
    if hang:
        lines.append(
            f"Hung worker: SIGSTOP at {hang['at_s']} s with {hang['in_flight']} sessions in "
            f"flight; killed {hang.get('killed_after_s', 'never')} s later; failed sessions "
            f"started before it {hang['failed_started_before']}, after it "
            f"{hang['failed_started_after']}."
        )
    lines.append(f"**{result['verdict']}**")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fraction", type=float, default=0.8, help="of the measured capacity")
    parser.add_argument("--mailboxes", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16, help="client threads at most")
    parser.add_argument("--capacity-seconds", type=float, default=30.0)
    parser.add_argument(
        "--capacity", type=float, default=0.0,
        help="soak at --fraction of this rate (sessions/s), not of the one measured now "
        "(still measured and reported): on a shared machine a quiet 30 s can double it",
    )  # fmt: skip
    parser.add_argument("--keep-messages", type=int, default=2,
                        help="messages each session leaves in the mailbox")  # fmt: skip
    parser.add_argument("--lmtp-rate", type=float, default=2.0, help="deliveries per second")
    parser.add_argument("--hang-worker", action="store_true",
                        help="SIGSTOP one of cas1's pop3 workers halfway")  # fmt: skip
    parser.add_argument("--addresses", default=",".join(DEFAULT_ADDRESSES),
                        help="cas1,mbx1,mbx2 loopback addresses")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the data folder")
    args = parser.parse_args(argv)
    if not 0 < args.fraction <= 1 or args.mailboxes < args.clients * 2 or args.minutes <= 0:
        parser.error("--fraction in (0, 1], --mailboxes at least twice --clients, --minutes > 0")
    if args.capacity < 0:
        parser.error("--capacity is a rate in sessions per second")
    # This script writes the directory itself (the mailboxes): the services run as the
    # user it runs as, or the files it makes would be closed to them.
    os.environ.setdefault(SERVICE_USER_VARIABLE, "root")
    report: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "options": vars(args),
        "worker_hang_limit_s": WORKER_HANG_LIMIT,
    }
    result: dict[str, Any] = {}
    addresses = tuple(args.addresses.split(","))

    def keep() -> bool:
        return bool(args.keep) or result.get("verdict") != "PASS"

    try:
        with up_organization(addresses, False, "popguard-soakcap-", keep) as org:
            print(f"up in {org.data}; waiting for every monitor to be Healthy", flush=True)
            org.wait_all_healthy(SETTLE_TIMEOUT)
            host = org.addresses["cas1"]
            context = ssl.create_default_context(cafile=str(org.ca_file()))
            mailboxes = make_mailboxes(org, args.mailboxes, args.keep_messages)
            boxes = Mailboxes(mailboxes)
            primed = time.monotonic()
            failures = prime(host, context, mailboxes, args.clients)
            if failures:
                raise OrganizationError(f"{failures} of the priming sessions failed")
            print(f"every mailbox logged in once ({time.monotonic() - primed:.0f} s)", flush=True)
            print(f"{len(mailboxes)} mailboxes; measuring capacity for "
                  f"{args.capacity_seconds:g} s", flush=True)  # fmt: skip
            capacity = measure_capacity(host, context, boxes, args)
            if args.capacity:
                capacity["given"] = args.capacity
            rate = (args.capacity or capacity["sessions_per_s"]) * args.fraction
            print(f"capacity {capacity['sessions_per_s']} sessions/s; soaking at {rate:.1f}/s "
                  f"for {args.minutes:g} min", flush=True)  # fmt: skip
            report["capacity"] = capacity
            result = soak(org, host, context, boxes, mailboxes, rate, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except OrganizationError as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 1
    report.update(result)
    report["markdown"] = markdown(report["capacity"], result)
    out = write_results("soak_capacity", report)
    print(json.dumps({k: result.get(k) for k in ("sessions", "deliveries", "hang",
                                                 "monitors_ever_not_healthy",
                                                 "failed_probe_results", "alert_rows",
                                                 "recovery_action_rows")}, indent=2))  # fmt: skip
    print()
    print(report["markdown"])
    print(f"\nwrote {out}")
    return 0 if result["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
