"""Delivery throughput and latency with the forget runs beside it, and without (issue 14).

    .venv/bin/python -m bench.delivery_beside_forget [--duration 60] [--connections 4]

Under `popguard up --detach` (DB01 active on mbx1, a synchronous copy on mbx2, as
bench.store_size starts it), LMTP deliveries to mbx1 at full speed on `--connections`
connections (bench.lmtp_load: each timed from the end of its DATA to the 250), round
`--mailboxes` mailboxes, while a POP3 client (TLS, through the front end) reads and
deletes them, at most `--session-messages` a session, so that every forget run (log
trimmed, incremental vacuum, WAL checkpointed and truncated: replication/service.py)
has deleted mail to give back. Two phases of `--duration` seconds each, in turn
(`--rounds` times), in one organization:

- off: `[store] forget_interval = 300`, its largest: the run before the phase was at
  most a few seconds before it (or at start-up), so none falls in a 60 s phase;
- on: `[store] forget_interval = --forget-interval` (5 s), so a dozen run in it.

The replication services read popguard.toml again before each look (every second), so
the phases change the setting in the file; the forget runs that fell in each phase are
counted from both servers' replication logs. Prints deliveries/s and p50/p99/max
latency per phase, the ratios on/off, and writes
bench/results/delivery_beside_forget-DATE.json.
"""

from __future__ import annotations

import argparse
import os
import re
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.lmtp_load import Delivered, LmtpError, deliver_load
from bench.report import machine, percentile, write_results
from bench.store_size import (
    FRONTEND_TLS_PORT,
    PASSWORD,
    SERVERS,
    Pop3Reader,
    copies_agree,
    db01_files,
    message,
    users,
)
from popguard.directory.directory import Directory
from popguard.directory.passwords import hash_password
from popguard.testing.organization import UpOrganization, up_organization, wait_until

OFF_INTERVAL = 300.0  # [store] forget_interval's largest value
MAX_DURATION = 600.0  # seconds per phase, whatever --duration says
MAX_ROUNDS = 5
MAX_MESSAGES_PER_PHASE = 1_000_000
MAX_BURST = 100_000
BURST_FILL_LIMIT = 900.0  # seconds to deliver one phase's burst
# "... N log entries trimmed (through LSN ...), M pages given back, WAL ...": one line
# per forget run that found something to do (replication/service.py, _maintain).
FORGET_LINE = re.compile(rb"(\d+) log entries trimmed .*?, (\d+) pages given back, WAL (\w+)")
# The active copy's line when no synchronous copy confirmed in time (replication/
# synchronous.py): each one is a window in which a 250 meant the active copy alone.
SYNCHRONOUS_LOST = b"did not confirm LSN"


def set_forget_interval(org: UpOrganization, seconds: float) -> None:
    """popguard.toml as up wrote it, with [store] forget_interval; replaced whole, so
    that no service reads half a file."""
    config = org.data / "popguard.toml"
    text = re.sub(r"\n?\[store\]\nforget_interval = .*\n", "", config.read_text())
    new = config.with_suffix(".toml.new")
    new.write_text(f"{text.rstrip()}\n\n[store]\nforget_interval = {seconds:g}\n")
    new.chmod(0o600)
    os.replace(new, config)


def replication_logs(org: UpOrganization) -> dict[str, Path]:
    return {s: org.data / "servers" / s / "logs" / "replication.log" for s in SERVERS}


def log_offsets(org: UpOrganization) -> dict[str, int]:
    return {s: p.stat().st_size if p.exists() else 0 for s, p in replication_logs(org).items()}


def forget_runs(org: UpOrganization, since: dict[str, int]) -> dict[str, dict[str, int]]:
    """server -> forget runs logged since the offsets, entries trimmed, pages given back."""
    runs = {}
    for server, path in replication_logs(org).items():
        with open(path, "rb") as log:
            log.seek(since[server])
            text = log.read()
        found = FORGET_LINE.findall(text)
        runs[server] = {
            "runs": len(found),
            "entries_trimmed": sum(int(t) for t, _, _ in found),
            "pages_given_back": sum(int(p) for _, p, _ in found),
            "wal_busy": sum(1 for _, _, w in found if w != b"emptied"),
            "synchronous_lost": text.count(SYNCHRONOUS_LOST),
        }
    return runs


@dataclass
class Reading:
    sessions: int = 0
    deleted: int = 0
    failures: int = 0
    burst_deleted: int = 0
    burst_quit: str = ""  # the QUIT's answer to the burst's deletions
    burst_quit_seconds: float = 0.0


def delete_burst(org: UpOrganization, user: str, reading: Reading) -> None:
    """One session that deletes every message of `user` (DELE only, then QUIT)."""
    context = ssl.create_default_context(cafile=str(org.ca_file()))
    client = Pop3Reader(org.addresses["cas1"], FRONTEND_TLS_PORT, context)
    try:
        client.command(f"USER {user}")
        client.command(f"PASS {PASSWORD}")
        count = int(client.command("STAT").split()[1])
        for number in range(1, count + 1):
            client.command(f"DELE {number}")
        started = time.perf_counter()
        try:
            reading.burst_quit = client.command("QUIT").decode().strip()
        except RuntimeError as exc:  # Pop3Error: -ERR
            reading.burst_quit = str(exc)
        reading.burst_quit_seconds = time.perf_counter() - started
        reading.burst_deleted = count
    finally:
        client.close()


def read_and_delete_while(
    org: UpOrganization, mailboxes: list[str], per_session: int, stop: threading.Event,
    burst_user: str | None,
) -> Reading:  # fmt: skip
    """Sessions round the mailboxes until `stop`: RETR and DELE the oldest
    `per_session` messages, QUIT (the deletions happen there). First, with
    `burst_user`, 2 s in: delete all of that mailbox's messages at once."""
    reading = Reading()
    if burst_user is not None and not stop.wait(2.0):
        try:
            delete_burst(org, burst_user, reading)
        except (OSError, RuntimeError) as exc:
            reading.burst_quit = f"failed: {exc}"
    context = ssl.create_default_context(cafile=str(org.ca_file()))
    turn = 0
    while not stop.is_set():
        user = mailboxes[turn % len(mailboxes)]
        turn += 1
        count = 0
        try:
            client = Pop3Reader(org.addresses["cas1"], FRONTEND_TLS_PORT, context)
            try:
                client.command(f"USER {user}")
                client.command(f"PASS {PASSWORD}")
                count = int(client.command("STAT").split()[1])
                chosen = 0
                for number in range(1, min(count, per_session) + 1):
                    if stop.is_set():
                        break
                    client.retrieve(number)
                    client.command(f"DELE {number}")
                    chosen += 1
                client.command("QUIT")
                reading.sessions += 1
                reading.deleted += chosen
            finally:
                client.close()
        except (OSError, RuntimeError):  # Pop3Error is a RuntimeError
            reading.failures += 1
            stop.wait(1.0)
        if count == 0:
            stop.wait(0.2)  # nothing to read yet
    return reading


def phase(
    org: UpOrganization, args: argparse.Namespace, mailboxes: list[str], name: str, interval: float
) -> dict[str, Any]:
    burst_user = None
    if args.burst:
        burst_user = users(args.mailboxes + 1)[-1]  # a mailbox of its own
        filled = deliver_load(
            org.addresses["mbx1"],
            lambda n: (burst_user, message(f"burst{n:012x}", args.size, burst_user)),
            connections=args.connections, max_messages=args.burst, seconds=BURST_FILL_LIMIT,
        )  # fmt: skip
        print(f"{name:>4}: {len(filled.latencies)} messages for the burst in "
              f"{filled.seconds:.0f}s", flush=True)  # fmt: skip
    set_forget_interval(org, interval)
    time.sleep(1.5)  # one look of each replication service: the new setting is read
    offsets = log_offsets(org)
    stop = threading.Event()
    result: list[Reading] = []
    reader = threading.Thread(
        target=lambda: result.append(
            read_and_delete_while(org, mailboxes, args.session_messages, stop, burst_user)
        ),
        name="pop3-reader",
    )
    reader.start()
    try:
        delivered = deliver_load(
            org.addresses["mbx1"],
            lambda n: (mailboxes[n % len(mailboxes)],
                       message(f"word{n:012x}", args.size, mailboxes[n % len(mailboxes)])),
            connections=args.connections, max_messages=MAX_MESSAGES_PER_PHASE,
            seconds=args.duration,
        )  # fmt: skip
    finally:
        stop.set()
        reader.join()
    runs = forget_runs(org, offsets)
    files = {s: round(sum(f.values()) / 1e6, 1) for s, f in db01_files(org.data).items()}
    row = summary(name, interval, delivered, result[0] if result else Reading(), runs, files)
    print(
        f"{name:>4} (forget_interval {interval:g}s): {row['deliveries_per_second']:7.1f}/s  "
        f"p50 {row['p50_ms']:6.1f}  p99 {row['p99_ms']:6.1f}  max {row['max_ms']:7.1f} ms  "
        f"refused {row['refused']} failed {len(row['failures'])}  POP3 deleted "
        f"{row['pop3_deleted']} in {row['pop3_sessions']} sessions  forget runs "
        + ", ".join(f"{s} {r['runs']}" for s, r in runs.items())
        + "  synchronous copy lost "
        + ", ".join(f"{s} {r['synchronous_lost']}" for s, r in runs.items())
        + f"  DB01 files MB {files}"
        + (
            f"  burst: {row['burst_deleted']} deleted, QUIT {row['burst_quit'][:60]!r} in "
            f"{row['burst_quit_seconds']:.2f}s; deliveries over 1 s: {row['deliveries_over_1s']}"
            if args.burst
            else ""
        ),
        flush=True,
    )
    return row


def summary(
    name: str, interval: float, delivered: Delivered, reading: Reading,
    runs: dict[str, dict[str, int]], files: dict[str, float],
) -> dict[str, Any]:  # fmt: skip
    def ms(fraction: float) -> float:
        value = percentile(delivered.latencies, fraction)
        return round(1000 * value, 2) if value is not None else float("nan")

    return {
        "phase": name,
        "forget_interval": interval,
        "delivered": len(delivered.latencies),
        "seconds": round(delivered.seconds, 2),
        "deliveries_per_second": round(delivered.per_second, 2),
        "p50_ms": ms(0.50),
        "p99_ms": ms(0.99),
        "max_ms": round(1000 * max(delivered.latencies), 2) if delivered.latencies else None,
        "refused": delivered.refused,
        "failures": delivered.failures,
        "pop3_sessions": reading.sessions,
        "pop3_deleted": reading.deleted,
        "pop3_failures": reading.failures,
        "burst_deleted": reading.burst_deleted,
        "burst_quit": reading.burst_quit,
        "burst_quit_seconds": round(reading.burst_quit_seconds, 2),
        "deliveries_over_1s": sum(1 for x in delivered.latencies if x > 1.0),
        "forget_runs": runs,
        "db01_MB_after": files,
    }


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    def mean(name: str, key: str) -> float:
        values = [float(r[key]) for r in rows if r["phase"] == name]
        return sum(values) / len(values)

    return {
        key: round(mean("on", key) / mean("off", key), 3)
        for key in ("deliveries_per_second", "p50_ms", "p99_ms", "max_ms")
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    mailboxes = users(args.mailboxes)
    with up_organization(
        tuple(args.addresses.split(",")), False, "popguard-delivery-forget-", lambda: args.keep
    ) as org:
        set_forget_interval(org, OFF_INTERVAL)
        with Directory(org.data) as directory:
            hashed = hash_password(PASSWORD)
            for user in users(args.mailboxes + 1):  # the last: the bursts'
                directory.new_mailbox(user, "DB01", hashed)
        wait_until("DB01's copies to agree", lambda: copies_agree(org), 60)
        warm = deliver_load(
            org.addresses["mbx1"],
            lambda n: (mailboxes[n % len(mailboxes)], message(f"warm{n:012x}", args.size)),
            connections=args.connections, max_messages=1000, seconds=args.warmup,
        )  # fmt: skip
        if not warm.latencies:
            raise LmtpError(f"no delivery in the warm-up: {warm.refused} {warm.failures[:3]}")
        rows = []
        for _ in range(args.rounds):
            rows.append(phase(org, args, mailboxes, "off", OFF_INTERVAL))
            rows.append(phase(org, args, mailboxes, "on", args.forget_interval))
        found = ratios(rows)
        print(
            "on/off: deliveries/s "
            + f"{found['deliveries_per_second']:.3f}, p50 {found['p50_ms']:.3f}, "
            + f"p99 {found['p99_ms']:.3f}, max {found['max_ms']:.3f}"
        )
        return {"phases": rows, "ratios_on_off": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=1, help="off-then-on pairs")
    parser.add_argument("--connections", type=int, default=4, help="LMTP connections")
    parser.add_argument("--mailboxes", type=int, default=4)
    parser.add_argument("--size", type=int, default=20_000, help="octets per message")
    parser.add_argument("--forget-interval", type=float, default=5.0,
                        help="[store] forget_interval in the 'on' phase")  # fmt: skip
    parser.add_argument("--session-messages", type=int, default=200,
                        help="at most this many RETR+DELE per POP3 session")  # fmt: skip
    parser.add_argument("--burst", type=int, default=0,
                        help="before each phase, this many messages to a mailbox of their "
                             "own, all deleted in one QUIT 2 s into the phase")  # fmt: skip
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds, not measured")
    parser.add_argument("--addresses", default="127.0.151.1,127.0.152.1,127.0.153.1",
                        help="cas1, mbx1 and mbx2's loopback addresses")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the data folder")
    args = parser.parse_args()
    if not 0 < args.duration <= MAX_DURATION or not 0 < args.rounds <= MAX_ROUNDS:
        parser.error(f"--duration up to {MAX_DURATION:g} s, --rounds 1..{MAX_ROUNDS}")
    if not 0 <= args.burst <= MAX_BURST:
        parser.error(f"--burst: 0..{MAX_BURST}")
    if not 0 < args.forget_interval < min(OFF_INTERVAL, args.duration):
        parser.error("--forget-interval: shorter than a phase")
    # Each "off" phase must end before the next run of an interval of 300 s.
    if args.duration + args.warmup + 30 > OFF_INTERVAL:
        parser.error(f"--duration: a phase must be well under {OFF_INTERVAL:g} s")
    report = {
        "benchmark": "delivery_beside_forget",
        "machine": machine(),
        "duration": args.duration,
        "connections": args.connections,
        "mailboxes": args.mailboxes,
        "size": args.size,
        "burst": args.burst,
        **run(args),
    }
    report["load_average_after"] = machine()["load_average"]
    print(f"results: {write_results('delivery_beside_forget', report)}")


if __name__ == "__main__":
    main()
