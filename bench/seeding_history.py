"""Seeding a new copy: does it take time in proportion to what the database holds, or
to its history? (issue 14)

    .venv/bin/python -m bench.seeding_history [--live-mb 100] [--histories 0,4,10]

One run, one fresh organization per history (bench.replication's: mbx1 and mbx2 on
loopback addresses of their own, each running `serve delivery`, `serve pop3be` and
`serve replication`, DB01 active on mbx1 with a copy on mbx2), all kept up until the
end. Each database gets the same live mail, `--live-mb` MB of `--size`-octet messages
delivered over LMTP to one mailbox (the same messages every time), and a history of its
own: `--histories` times as much mail delivered over LMTP to another mailbox and then
read and deleted over POP3, `--live-mb` at a time. Then the script waits until mbx2 has
applied everything and mbx1's replication service has trimmed DB01's log and forgotten
what was deleted (its next `[store] forget_interval` run), as a database that lived
that long would be.

Then, in turns (one database after the other, `--repeat` rounds, so that each round's
seedings see about the same load from the rest of a shared machine), a new copy of
each: `add-mailboxdatabasecopy DB01 --server mbx3` (mbx4, ... in later rounds), timed
(command included) until the new copy holds mbx1's last LSN, and until it reports
Healthy (bench.replication's measure_seeding); that server is stopped afterwards.

The table gives each database's median seeding time, its MB/s over the live messages'
octets and its ratio to the seeding of the database without history: 1.0 throughout
is a seeding whose time does not depend on history. Then each seeding's steps as the
services' logs tell them, and the store's own snapshot and load timed alone in this
process on the same file. `--live-mb 1000` (and enough disk and patience: about 15 GB
of mail in all) is the issue's 1 GB live with up to 10 GB of history.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import poplib
import re
import sqlite3
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.replication import (
    USER,
    Lmtp,
    Organization,
    measure_seeding,
    message,
    organization,
    popguard,
)
from bench.report import machine, write_results
from popguard.store.mailbox_database import MailboxDatabase, file_sha256
from popguard.testing.processes import stop_processes

HISTORY_USER = "history@popguard.test"
PASSWORD = "bench password"
POP3BE_PORT = 1110  # mbx1's plain back-end port (bench.replication.MAILBOX_PORTS)
HISTORY_NUMBERS = 10_000_000  # history messages are numbered from here, live ones from 0
# How long mbx1's log may take to be trimmed once the copies agree: a forget run every
# 60 s (the default interval), and the run that sees mbx2's last report may be the next.
TRIM_WAIT = 200.0
# ... and per GB of history beyond that: the freed pages go back VACUUM_STEP at a time
# (a 10 GB history left 19,156 of them after 200 s).
TRIM_WAIT_PER_GB = 60.0
TRIM_POLL = 2.0  # seldom: each look opens the file, and a reader can delay a checkpoint
# A temporary failure (451: the directory or the store busy beyond its patience on a
# loaded machine, 0: the connection lost) is tried again, as an MTA would, this often.
RETRIES = 5
RETRY_PAUSE = 1.0
# A delivery or a POP3 command that takes longer than this is a failure, not a figure.
STEP_TIMEOUT = 60.0
SEEDED = re.compile(r"seeded from \S+ snapshot at LSN (\d+) \((\d+) octets, ([\d.]+)s\)")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


class TooSlow(RuntimeError):
    """A phase outlasted its bound: the run stops rather than wait on."""


def deliver(
    org: Organization,
    address: str,
    numbers: range,
    size: int,
    connections: int,
    deadline: float,
    retried: Counter[int],
) -> float:
    """Deliver message(n) for each n over `connections` LMTP connections at once (each
    takes every `connections`-th number), trying a temporary failure again as an MTA
    would (at most RETRIES times a message, counted in `retried`); the seconds it took."""

    counting = threading.Lock()

    def one_connection(part: range) -> None:
        lmtp = Lmtp(org, address)
        try:
            for number in part:
                for _ in range(RETRIES + 1):
                    if time.monotonic() > deadline:
                        raise TooSlow(f"delivering to {address}: past the run's bound at {number}")
                    if (code := lmtp.deliver(message(number, size))) == 250:
                        break
                    if not (code == 0 or 400 <= code < 500):
                        raise RuntimeError(f"message {number} to {address} refused: {code}")
                    with counting:
                        retried[code] += 1
                    time.sleep(RETRY_PAUSE)
                else:
                    raise RuntimeError(f"message {number} to {address}: {code} {RETRIES + 1} times")
        finally:
            lmtp.close()

    started = time.monotonic()
    with ThreadPoolExecutor(connections) as pool:
        parts = [numbers[i::connections] for i in range(connections)]
        for done in [pool.submit(one_connection, part) for part in parts]:
            done.result()  # the first failure, after every connection has stopped
    return time.monotonic() - started


def read_and_delete(org: Organization, address: str, deadline: float) -> int:
    """Log in to `address` on mbx1's back end, RETR and DELE every message, QUIT (the
    deletion is one transaction at QUIT); how many."""
    client = poplib.POP3(org.addresses["mbx1"], POP3BE_PORT, timeout=STEP_TIMEOUT)
    try:
        client.user(address)
        client.pass_(PASSWORD)
        count, _ = client.stat()
        for number in range(1, count + 1):
            if time.monotonic() > deadline:
                raise TooSlow(f"reading {address}: past the run's bound at message {number}")
            client.retr(number)
            client.dele(number)
        client.quit()
    except BaseException:
        with contextlib.suppress(OSError):
            client.close()
        raise
    return int(count)


def log_state(org: Organization) -> dict[str, int]:
    """mbx1's DB01: entries still in its log, its last LSN, free pages, WAL octets."""
    path = org.copy_file("mbx1")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        (entries,) = db.execute("SELECT COUNT(*) FROM change_log").fetchone()
        (free,) = db.execute("PRAGMA freelist_count").fetchone()
    finally:
        db.close()
    wal = path.with_name(path.name + "-wal")
    return {
        "log_entries": int(entries),
        "last_lsn": org.last_lsn("mbx1"),
        "free_pages": int(free),
        "wal_octets": wal.stat().st_size if wal.exists() else 0,
    }


def wait_trimmed(org: Organization, history_mb: float) -> tuple[float, dict[str, int]]:
    """Until mbx1's log is empty (trimmed through its head) and the forget run after
    the trim has given the freed pages back and emptied the WAL."""
    started = time.monotonic()
    patience = TRIM_WAIT + TRIM_WAIT_PER_GB * history_mb / 1000
    while True:
        state = log_state(org)
        if state["log_entries"] == 0 and state["free_pages"] == 0 and state["wal_octets"] == 0:
            return time.monotonic() - started, state
        if time.monotonic() - started > patience:
            raise TooSlow(f"mbx1's DB01 not trimmed and forgotten after {patience:g}s: {state}")
        time.sleep(TRIM_POLL)


def file_octets(org: Organization, server: str) -> int:
    path = org.copy_file(server)
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def step_markers(server: str) -> tuple[tuple[str, str, str], ...]:
    """The lines of the new copy's and mbx1's logs that mark a seeding's steps
    (copy_replicator.py, service.py's _snapshot), each after the one before."""
    return (
        ("started", server, "seeding from a snapshot"),  # its replicator found the copy
        ("sent", "mbx1", f"sent to {server}"),  # mbx1 made the snapshot, hashed and sent it
        ("loaded", server, "seeded from"),  # the new copy fsynced, checked and loaded it
    )


def step_times(org: Organization, server: str, started_at: float) -> dict[str, float]:
    """Seconds from the command's start to each step, from the services' logs (their
    times are to the millisecond, on the same clock); a step not found is left out."""
    found: dict[str, float] = {}
    after = started_at
    for step, log_of, marker in step_markers(server):
        for line in (org.data / f"{log_of}.log").read_text(errors="replace").splitlines():
            stamp = LOG_TIME.match(line)
            if stamp is None or marker not in line:
                continue
            when = datetime.datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if when >= after - 0.001:
                found[step] = round(when - started_at, 2)
                after = when
                break
        else:
            return found
    return found


def seed(org: Organization, server: str, timeout: float) -> dict[str, Any]:
    """One new copy of DB01 on a new server, timed (measure_seeding), and its steps; the
    server is stopped afterwards (several organizations are up at once)."""
    load, before = os.getloadavg()[0], len(org.processes)
    try:
        seeding = measure_seeding(org, timeout, server)
        seeding.update(
            server=server, load_average=round(load, 2), file_octets=file_octets(org, server)
        )
    finally:
        stop_processes(org.processes[before:])
        del org.processes[before:]
    seeding["steps"] = step_times(org, server, seeding["started_at"])
    found = SEEDED.findall((org.data / f"{server}.log").read_text(errors="replace"))
    if found:  # the replicator's own account: snapshot made, sent, checked and loaded
        _, octets, seconds = found[-1]
        seeding["snapshot_octets"], seeding["snapshot_seconds"] = int(octets), float(seconds)
    return seeding


def store_phases(org: Organization) -> dict[str, float]:
    """The seeding's store work alone, in this process, on mbx1's copy as it was seeded:
    the snapshot (VACUUM INTO, then its SHA-256) and the load into a new passive copy."""
    folder = org.data / "phases"
    folder.mkdir()
    out, target = folder / "DB01.snapshot.sqlite", folder / "DB01.sqlite"
    source = MailboxDatabase(org.copy_file("mbx1"), "DB01")
    copy = MailboxDatabase(target, "DB01")
    try:
        copy.fence()  # a new file is an active copy; a seeding one is passive
        started = time.monotonic()
        source.snapshot(out)
        snapshot = time.monotonic() - started
        started = time.monotonic()
        file_sha256(out)
        sha256 = time.monotonic() - started
        started = time.monotonic()
        copy.load_snapshot(out)
        load = time.monotonic() - started
    finally:
        source.close()
        copy.close()
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()
    return {
        "vacuum_into_and_sha256_s": round(snapshot, 2),
        "sha256_s": round(sha256, 2),
        "load_s": round(load, 2),
    }


def fill(
    org: Organization, args: argparse.Namespace, live: int, history: int, deadline: float
) -> dict[str, Any]:
    """The live mail to USER, then the history to HISTORY_USER, read and deleted over
    POP3 one live size at a time (the file never holds much more than twice the live)."""
    retried: Counter[int] = Counter()
    send = (args.size, args.connections, deadline, retried)
    live_seconds = deliver(org, USER, range(live), *send)
    started, read = time.monotonic(), 0
    for first in range(HISTORY_NUMBERS, HISTORY_NUMBERS + history, live):
        deliver(
            org, HISTORY_USER, range(first, min(HISTORY_NUMBERS + history, first + live)), *send
        )
        read += read_and_delete(org, HISTORY_USER, deadline)
    # A message tried again may have been stored the first time too (a connection lost
    # after the data went): a duplicate, as an MTA would make, read and deleted as well.
    if not history <= read <= history + retried.total():
        raise RuntimeError(f"{read} history messages read and deleted, {history} delivered")
    return {
        "history_messages_read": read,
        "live_seconds": round(live_seconds, 1),
        "history_seconds": round(time.monotonic() - started, 1),
        "deliveries_tried_again": {str(code): n for code, n in sorted(retried.items())},
    }


def build(
    org: Organization, args: argparse.Namespace, history_mb: float, deadline: float
) -> dict[str, Any]:
    """DB01 in a fresh organization, given the live mail and `history_mb` of history,
    its log trimmed and the deleted mail forgotten."""
    live = max(1, round(args.live_mb * 1e6 / args.size))
    history = round(history_mb * 1e6 / args.size)
    row: dict[str, Any] = {"history_mb": history_mb, "live_messages": live,
                           "history_messages": history}  # fmt: skip
    org.data.mkdir(parents=True)
    org.add_server("mbx1")
    org.add_server("mbx2")
    popguard(org.data, "set-popsettings", "--server", "mbx1", "--login-type", "PlainTextLogin")
    popguard(org.data, "new-mailboxdatabase", "DB01", "--server", "mbx1")
    popguard(org.data, "add-mailboxdatabasecopy", "DB01", "--server", "mbx2")
    for address in (USER, HISTORY_USER):
        popguard(org.data, "new-mailbox", address, "--database", "DB01", "--password-stdin",
                 stdin=PASSWORD + "\n")  # fmt: skip
    org.wait_healthy("DB01\\mbx2", 60)
    row.update(fill(org, args, live, history, deadline))
    org.wait_healthy("DB01\\mbx2", 300)
    waited, row["before_seeding"] = wait_trimmed(org, history_mb)
    row["trim_wait_seconds"] = round(waited, 1)
    row["db_file_octets"] = file_octets(org, "mbx1")
    return row


def run(args: argparse.Namespace, histories: list[float], rows: list[dict[str, Any]]) -> None:
    """Build every database (one organization each, all kept up), then seed new copies
    of them in turns, `--repeat` rounds: each round's seedings run under about the same
    load from the rest of the machine. Rows are appended as they are built."""
    deadline = time.monotonic() + args.max_minutes * 60
    timeout = max(120.0, args.live_mb)  # seconds for one seeding
    with contextlib.ExitStack() as stack:
        organizations = []
        for history_mb in histories:
            org = stack.enter_context(organization(args.keep))
            started = time.monotonic()
            row = build(org, args, history_mb, deadline)
            row["build_seconds"] = round(time.monotonic() - started, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
            organizations.append(org)
        for turn in range(args.repeat):
            for org, row in zip(organizations, rows, strict=True):
                seeding = seed(org, f"mbx{3 + turn}", timeout)
                print(json.dumps({"history_mb": row["history_mb"], **seeding}), flush=True)
                row.setdefault("seedings", []).append(seeding)
        for org, row in zip(organizations, rows, strict=True):
            row["seconds_median"] = statistics.median(x["seconds"] for x in row["seedings"])
            row["healthy_seconds_median"] = statistics.median(
                x["healthy_seconds"] for x in row["seedings"]
            )
            # The part before the new copy's replicator starts seeding (the command,
            # the once-a-second look for new copies) is the same whatever the database.
            row["started_median"] = statistics.median(
                x["steps"].get("started", math.nan) for x in row["seedings"]
            )
            row["store_phases"] = store_phases(org)


def ratio(seconds: float, baseline: float | None) -> str:
    return f"{seconds / baseline:.2f}" if baseline else "-"


def table(rows: list[dict[str, Any]]) -> str:
    """The figures (medians of the repeats), then where each seeding's time went."""
    lines = [
        "| live MB | history MB | mbx1's file | seeding s (min-max) | MB/s "
        "| ratio to no history | of which before seeding starts | to Healthy s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    baseline = next((r["seconds_median"] for r in rows if r["history_mb"] == 0), None)
    for r in rows:
        octets = r["seedings"][0]["octets"]
        times = [x["seconds"] for x in r["seedings"]]
        lines.append(
            f"| {octets / 1e6:.1f} | {r['history_mb']:g} | {r['db_file_octets'] / 1e6:.1f} MB "
            f"| {r['seconds_median']:.2f} ({min(times):.2f}-{max(times):.2f}) "
            f"| {octets / r['seconds_median'] / 1e6:.1f} | {ratio(r['seconds_median'], baseline)} "
            f"| {r['started_median']:.2f} | {r['healthy_seconds_median']:.2f} |"
        )
    lines += [
        "",
        "| history MB | copy | load avg | seeding starts | snapshot sent | loaded | LSN seen "
        "| store alone: VACUUM INTO + SHA-256 | SHA-256 | load |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        phases = r["store_phases"]
        for x in r["seedings"]:
            steps = [x["steps"].get(step) for step in ("started", "sent", "loaded")]
            lines.append(
                f"| {r['history_mb']:g} | {x['server']} | {x['load_average']:.1f} | "
                + " | ".join("-" if s is None else f"{s:.2f}" for s in steps)
                + f" | {x['seconds']:.2f} | {phases['vacuum_into_and_sha256_s']:.2f} "
                f"| {phases['sha256_s']:.2f} | {phases['load_s']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--live-mb", type=float, default=100.0, help="live mail, MB")
    parser.add_argument("--histories", default="0,4,10",
                        help="history sizes, as multiples of --live-mb")  # fmt: skip
    parser.add_argument("--size", type=int, default=20_000, help="octets per message")
    parser.add_argument("--connections", type=int, default=2,
                        help="LMTP connections at once while filling")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3,
                        help="seedings of each database (mbx3, mbx4, ...); the median")  # fmt: skip
    parser.add_argument("--max-minutes", type=float, default=60.0,
                        help="bound on the whole run: it stops (exit 1) past it")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the data folders")
    args = parser.parse_args(argv)
    if not 1 <= args.repeat <= 10:
        parser.error("--repeat: 1 to 10")
    histories = [float(h) * args.live_mb for h in args.histories.split(",")]
    if any(h < 0 or not math.isfinite(h) for h in histories):
        parser.error("--histories: multiples of --live-mb, 0 or more")
    ran_on = machine()
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": ran_on["commit"],
        "machine": ran_on,
        "live_mb": args.live_mb,
        "size": args.size,
        "rows": [],
    }
    failed = None
    try:
        run(args, histories, report["rows"])
    except (TooSlow, RuntimeError) as exc:  # what was measured is still reported
        failed = str(exc)
        print(failed, file=sys.stderr)
    report["load_average_end"] = machine()["load_average"]
    report["failed"] = failed
    measured = [row for row in report["rows"] if "store_phases" in row]
    if measured:
        print(table(measured))
    print(f"wrote {write_results('seeding_history', report)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
