"""Soak: a whole organization under steady POP3 and LMTP load with no fault must
raise no alert and run no responder.

    .venv/bin/python -m bench.soak [--minutes 10]

Starts the organization as an operator does (`popguard up --detach` in a fresh data
folder), waits until every monitor of every server has results and is Healthy,
then for `--minutes`, at fixed rates:

- POP3 sessions through the front end cas1 (`--pop3-rate`, default 5/s), one at a
  time since the demo mailbox allows one session (the back end's [IN-USE]): every
  other session STLS on the POP3 port, the others implicit TLS on the POP3S port,
  both verified against DATA/tls/ca.pem; login with the demo mailbox
  (DATA/demo-mailbox.txt), STAT, RETR of the newest message, DELE of all but the
  newest `--keep-messages`, QUIT. A session more than one slot behind its
  schedule starts at once (counted as late): the rate holds over the run;
- LMTP deliveries to the demo mailbox (`--lmtp-rate`, default 2/s) with popguard's
  own LMTP client (src/popguard/lmtp_client.py, as `send-message` uses it, without a
  Python start-up per message), on the server holding the active copy of DB01.

POP3 sessions have a 10 s socket timeout, deliveries the LMTP client's 30 s, and the
loops stop at the end of the soak (or at once on Ctrl-C or SIGTERM), so counts and
time are bounded. Every 2 s the health API of each
server is read and every monitor seen not Healthy is recorded. At the end: sessions
and deliveries ok/failed with latency percentiles, `get-alerts` and
`get-recoveryactions` of every server, the monitors ever seen not Healthy, and the
failed probe results in each server's results store during the soak. PASS when
there is no alert and no recovery action. The data folder is kept on FAIL (or with
`--keep`) for the logs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import poplib
import ssl
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.report import machine, percentile, write_results
from bench.watch import Watch
from popguard.directory.directory import Directory
from popguard.errors import UserError
from popguard.services.lmtp_client import deliver
from popguard.testing.organization import (
    DEFAULT_ADDRESSES,
    SERVERS,
    OrganizationError,
    UpOrganization,
    up_organization,
)

SESSION_TIMEOUT = 10.0  # seconds per socket operation of a POP3 session
HEALTH_EVERY = 2.0  # seconds between two looks at every server's monitors
SETTLE_TIMEOUT = 300.0  # seconds for every monitor to have results and be Healthy
MESSAGE_OCTETS = 2_000  # of each delivered message's body


@dataclass
class Tally:
    """Outcomes and latencies of one kind of operation."""

    ok: int = 0
    failed: int = 0
    late: int = 0  # started after its slot (the one before took longer than a slot)
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    # (latency ms, operation number, seconds into the soak) of every success: which
    # ones were slow, and when
    timeline: list[tuple[float, int, float]] = field(default_factory=list)
    began: float = field(default_factory=time.monotonic)

    def record(self, started: float, error: str, n: int) -> None:
        if error:
            self.failed += 1
            self.errors[error[:120]] += 1
        else:
            self.ok += 1
            latency = (time.monotonic() - started) * 1000
            self.latencies_ms.append(latency)
            self.timeline.append((round(latency, 1), n, round(started - self.began, 1)))

    def report(self) -> dict[str, Any]:
        def ms(fraction: float) -> float | None:
            value = percentile(self.latencies_ms, fraction)
            return None if value is None else round(value, 1)

        return {
            "ok": self.ok,
            "failed": self.failed,
            "late": self.late,
            "latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": ms(1.0)},
            "errors": dict(self.errors.most_common(10)),
            "slowest": [
                {"ms": ms_, "n": n, "at_s": at}
                for ms_, n, at in sorted(self.timeline, reverse=True)[:5]
            ],
        }


def paced(rate: float, until: float, stop: threading.Event, tally: Tally, operation: Any) -> None:
    """Run operation(n) at `rate` per second until `until` (monotonic) or `stop`, one
    at a time."""
    began = time.monotonic()
    for n in range(int(rate * (until - began)) + 1):
        slot = began + n / rate
        now = time.monotonic()
        if slot >= until or now >= until or stop.is_set():
            return
        if now > slot + 1 / rate:
            tally.late += 1
        elif stop.wait(max(0.0, slot - now)):
            return
        started = time.monotonic()
        try:
            error = operation(n)
        except Exception as exc:  # every failure is counted, none ends the soak
            error = f"{type(exc).__name__}: {exc}"
        tally.record(started, error, n)


def pop3_session(org: UpOrganization, context: ssl.SSLContext, keep: int, n: int) -> str:
    """One session through cas1: STLS for even n, implicit TLS for odd; '' if all went
    well, else what failed."""
    address, password = org.demo
    host = org.addresses["cas1"]
    client: poplib.POP3
    if n % 2 == 0:
        client = poplib.POP3(host, 10110, timeout=SESSION_TIMEOUT)
        client.stls(context)
    else:
        client = poplib.POP3_SSL(host, 10995, context=context, timeout=SESSION_TIMEOUT)
    try:
        read_and_delete(client, address, password, keep)
    except poplib.error_proto as exc:
        return f"{'STLS' if n % 2 == 0 else 'POP3S'}: {exc}"
    finally:
        with contextlib.suppress(OSError):
            client.close()
    return ""


def read_and_delete(client: poplib.POP3, address: str, password: str, keep: int) -> None:
    """A POP3 user's session: log in, read the newest message, delete all but the
    newest `keep`, QUIT."""
    client.user(address)
    client.pass_(password)
    count, _ = client.stat()
    if count:
        client.retr(count)
    for number in range(1, count - keep + 1):
        client.dele(number)
    client.quit()


def message(n: int) -> bytes:
    body = (f"soak message {n}\r\n" * (MESSAGE_OCTETS // 16))[:MESSAGE_OCTETS]
    return (
        f"From: soak <soak@popguard.test>\r\nTo: <demo@popguard.test>\r\n"
        f"Subject: soak {n}\r\nMessage-ID: <soak-{n}-{time.time_ns()}@popguard.test>\r\n\r\n"
        f"{body}\r\n"
    ).encode()


class HealthWatch(Watch):
    """Every HEALTH_EVERY seconds: each monitor of each server that is not Healthy."""

    def __init__(self, org: UpOrganization, started: float) -> None:
        super().__init__(HEALTH_EVERY, join_timeout=30)
        self.org, self.started = org, started
        self.seen: dict[str, dict[str, Any]] = {}  # "server monitor resource" -> first, worst
        self.looks = 0
        self.missed: Counter[str] = Counter()

    def look(self) -> None:
        self.looks += 1
        for server in SERVERS:
            try:
                rows = self.org.serverhealth(server)
            except (httpx.HTTPError, OrganizationError) as exc:
                self.missed[f"{server}: {type(exc).__name__}"] += 1
                continue
            for row in rows:
                if row["AlertValue"] == "Healthy":
                    continue
                key = f"{server} {row['Name']} {row['TargetResource']}"
                entry = self.seen.setdefault(
                    key, {"first_s": round(time.monotonic() - self.started, 1), "values": []}
                )
                if row["AlertValue"] not in entry["values"]:
                    entry["values"].append(row["AlertValue"])
                    entry["error"] = row["Error"]


def failed_probes(org: UpOrganization, since: float) -> dict[str, Any]:
    """Per server and probe: failed results since `since` (wall clock), with a sample."""
    found: dict[str, Any] = {}
    for server in SERVERS:
        with contextlib.closing(org.results_store(server)) as db:
            totals = db.execute(
                "SELECT probe, resource, COUNT(*), SUM(result_type != 'Succeeded') "
                "FROM probe_results WHERE started >= ? GROUP BY probe, resource",
                (since,),
            ).fetchall()
            for probe, resource, runs, failed in totals:
                if not failed:
                    continue
                samples = db.execute(
                    "SELECT started, result_type, failure_component, error FROM probe_results "
                    "WHERE started >= ? AND probe = ? AND resource = ? "
                    "AND result_type != 'Succeeded' ORDER BY started LIMIT 5",
                    (since, probe, resource),
                ).fetchall()
                found[f"{server} {probe} {resource}"] = {
                    "runs": runs,
                    "failed": failed,
                    "first": [
                        {"at_s": round(s[0] - since, 1), "type": s[1], "component": s[2],
                         "error": s[3]}
                        for s in samples
                    ],
                }  # fmt: skip
    return found


def lmtp_load(
    org: UpOrganization, rate: float, until: float, stop: threading.Event, tally: Tally
) -> None:
    """Deliveries to the demo mailbox at `rate` per second, in this thread (the
    directory's SQLite connection belongs to the thread that opened it)."""
    recipient, _ = org.demo
    with Directory(org.data) as directory:

        def delivery(n: int) -> str:
            try:
                result = deliver(directory, recipient, message(n), "soak@popguard.test")
            except UserError as exc:
                return str(exc)
            return "" if result.code == 250 else f"{result.code} {result.reply}"

        paced(rate, until, stop, tally, delivery)


def run_soak(org: UpOrganization, args: argparse.Namespace) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(org.ca_file()))
    sessions, deliveries = Tally(), Tally()
    started, started_wall = time.monotonic(), time.time()
    until = started + args.minutes * 60
    stop = threading.Event()  # set when the soak ends early (Ctrl-C, SIGTERM, an error)
    pop3 = threading.Thread(
        target=paced,
        args=(args.pop3_rate, until, stop, sessions,
              lambda n: pop3_session(org, context, args.keep_messages, n)),
    )  # fmt: skip
    lmtp = threading.Thread(target=lmtp_load, args=(org, args.lmtp_rate, until, stop, deliveries))
    with HealthWatch(org, started) as watch:
        pop3.start()
        lmtp.start()
        next_report = started + 60
        try:
            while pop3.is_alive() or lmtp.is_alive():
                time.sleep(1.0)
                if time.monotonic() >= next_report:
                    next_report += 60
                    print(f"  {(time.monotonic() - started) / 60:.0f} min: sessions "
                          f"{sessions.ok} ok {sessions.failed} failed, deliveries "
                          f"{deliveries.ok} ok {deliveries.failed} failed, monitors seen not "
                          f"Healthy: {len(watch.seen)}", flush=True)  # fmt: skip
        finally:
            stop.set()  # a session or delivery under way ends within its 10 s timeout
            pop3.join(SESSION_TIMEOUT * 4)
            lmtp.join(SESSION_TIMEOUT * 4)
    seconds = time.monotonic() - started
    alerts = {s: org.cli_json("get-alerts", "--server", s) for s in SERVERS}
    actions = {s: org.cli_json("get-recoveryactions", "--server", s) for s in SERVERS}
    alert_count = sum(len(v) for v in alerts.values())
    action_count = sum(len(v) for v in actions.values())
    return {
        "seconds": round(seconds, 1),
        "pop3_rate": args.pop3_rate,
        "lmtp_rate": args.lmtp_rate,
        "sessions": sessions.report(),
        "sessions_per_s": round((sessions.ok + sessions.failed) / seconds, 2),
        "deliveries": deliveries.report(),
        "deliveries_per_s": round((deliveries.ok + deliveries.failed) / seconds, 2),
        "alerts": alert_count,
        "recovery_actions": action_count,
        "alert_rows": alerts,
        "recovery_action_rows": actions,
        "health_looks": watch.looks,
        "health_looks_missed": dict(watch.missed),
        "monitors_ever_not_healthy": watch.seen,
        "failed_probe_results": failed_probes(org, started_wall),
        "verdict": "PASS" if alert_count == 0 and action_count == 0 else "FAIL",
        # Not part of the verdict, but a soak whose load was not served proves little.
        "load_served": sessions.failed == 0 and deliveries.failed == 0,
    }


def load_table(result: dict[str, Any]) -> list[str]:
    """The sessions' and deliveries' table of a soak's report (bench.soak_capacity's too)."""

    def row(name: str, t: dict[str, Any], rate: float) -> str:
        lat = t["latency_ms"]
        return (f"| {name} | {rate:.2f} | {t['ok']:,} | {t['failed']:,} | {t['late']:,} "
                f"| {lat['p50']} | {lat['p90']} | {lat['p99']} | {lat['max']} |")  # fmt: skip

    return [
        "| load | per s | ok | failed | late | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        row("POP3 sessions through cas1", result["sessions"], result["sessions_per_s"]),
        row("LMTP deliveries", result["deliveries"], result["deliveries_per_s"]),
    ]


def markdown(result: dict[str, Any]) -> str:
    lines = [
        *load_table(result),
        "",
        f"Alerts: {result['alerts']}; recovery actions: {result['recovery_actions']}; "
        f"monitors ever seen not Healthy: {len(result['monitors_ever_not_healthy'])}; "
        f"probe instances with failed results: {len(result['failed_probe_results'])}; "
        f"every session and delivery served: {'yes' if result['load_served'] else 'no'}. "
        f"**{result['verdict']}**",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--pop3-rate", type=float, default=5.0, help="POP3 sessions per second")
    parser.add_argument("--lmtp-rate", type=float, default=2.0, help="deliveries per second")
    parser.add_argument("--keep-messages", type=int, default=5,
                        help="messages each session leaves in the mailbox")  # fmt: skip
    parser.add_argument("--addresses", default=",".join(DEFAULT_ADDRESSES),
                        help="cas1,mbx1,mbx2 loopback addresses")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the data folder")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
    }
    result: dict[str, Any] = {}
    addresses = tuple(args.addresses.split(","))

    def keep() -> bool:  # the logs of a failed soak are what to read next
        return bool(args.keep) or result.get("verdict") != "PASS" or not result.get("load_served")

    try:
        with up_organization(addresses, False, "popguard-soak-", keep) as org:
            print(f"up in {org.data}; waiting for every monitor to be Healthy", flush=True)
            org.wait_all_healthy(SETTLE_TIMEOUT)
            print(f"soaking for {args.minutes:g} min", flush=True)
            result = run_soak(org, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except OrganizationError as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 1
    report.update(result)
    report["machine_after"] = {"load_average": machine()["load_average"]}
    report["markdown"] = markdown(result)
    out = write_results("soak", report)
    print(json.dumps({k: result[k] for k in ("sessions", "deliveries",
                                             "monitors_ever_not_healthy", "failed_probe_results",
                                             "alert_rows", "recovery_action_rows")},
                     indent=2))  # fmt: skip
    print()
    print(report["markdown"])
    print(f"\nwrote {out}")
    return 0 if result["verdict"] == "PASS" and result["load_served"] else 1


if __name__ == "__main__":
    sys.exit(main())
