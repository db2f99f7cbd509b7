"""Blips: a fault shorter than the deep test's re-runs raises no alert and runs no
responder (issue 17 made the move faster; this shows it did not make the ladder touchy).

    .venv/bin/python -m bench.blips [--seconds 4,7] [--rounds 3]

One organization, started as an operator does (`popguard up --detach`, faults enabled
in DATA/popguard.toml). For each of `--seconds` and each of `--rounds`: settled as
bench.self_repair settles a case (every monitor Healthy, no failed probe result within
the longest monitor window, PopDeepTestProbe's last run on DB01 a success), then
`popguard inject-fault --server mbx1 --service pop3be --kind refuse-auth`; as soon as
a run of PopDeepTestProbe on DB01 has failed (read from mbx1's results store every
0.1 s), a wait of the given seconds from that run, then `clear-fault`. The blip is
placed at the worst point for it: it began just before a scheduled run and outlasts
that run by the given seconds, so the probe's re-runs (3 s apart) fall into it. Then
30 s more of watching. Recorded: the logins of the demo mailbox through cas1 that were
refused (every 0.5 s, TLS, USER, PASS, STAT, QUIT), the deep test's failed results on
DB01, the worst AlertValue PopDeepTestMonitor on DB01 showed (health API every 0.5 s)
and every new recovery action and alert of every server. PASS when no responder ran
and no alert was raised; a Degraded monitor (no responder acts on it) is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from bench.report import machine, write_results
from bench.self_repair import MOVE_CASES, LoginWatch, monitor_value, settle
from popguard.testing.organization import (
    DEFAULT_ADDRESSES,
    POLL,
    OrganizationError,
    UpOrganization,
    up_organization,
    wait_until,
)

CASE = MOVE_CASES[0]  # refuse-auth on mbx1's pop3be; PopDeepTestMonitor on DB01
PROBE = f"{CASE.health_set}\\PopDeepTestProbe"
SETTLE_TIMEOUT = 300.0
WATCH_AFTER = 30.0  # seconds of watching after the fault is cleared
ORDER = ("Healthy", "Disabled", "?", "Unknown", "Repairing", "Degraded", "Unhealthy")


@dataclass
class Blip:
    seconds: float
    round: int
    injected_at: str = ""
    blip_s: float = 0.0  # inject-fault returned to clear-fault returned
    refused_logins: int = 0
    deep_failures: int = 0  # failed PopDeepTestProbe results on DB01
    worst: str = "Healthy"  # PopDeepTestMonitor on DB01, as the health API showed it
    actions: list[dict[str, Any]] = field(default_factory=list)
    alerts: int = 0
    error: str = ""


def deep_failures(org: UpOrganization, since: float) -> list[float]:
    """Start times of the failed deep test runs on DB01 since `since` (wall clock)."""
    with contextlib.closing(org.results_store(CASE.server)) as db:
        rows = db.execute(
            "SELECT started FROM probe_results WHERE probe = ? AND resource = ? "
            "AND started >= ? AND result_type != 'Succeeded' ORDER BY started",
            (PROBE, CASE.resource, since),
        ).fetchall()
    return [float(r[0]) for r in rows]


def actions_and_alerts(org: UpOrganization) -> tuple[dict[tuple[str, int], Any], int]:
    """Every server's recovery actions by (server, id), and how many alerts there are."""
    actions = {(s, int(a["Id"])): a for s in org.addresses for a in org.recovery_actions(s)}
    return actions, sum(len(org.alerts(s)) for s in org.addresses)


def run_blip(org: UpOrganization, seconds: float, round_number: int) -> Blip:
    blip = Blip(seconds, round_number)
    settle(org, CASE, "PopDeepTestProbe")
    actions_before, alerts_before = actions_and_alerts(org)
    started = time.monotonic()
    with LoginWatch(org.addresses["cas1"], org.demo, org.ca_file(), started) as logins:
        wait_until("a login of the demo mailbox before the fault",
                   lambda: any(ok for _, ok, _ in logins.attempts), SETTLE_TIMEOUT)  # fmt: skip
        wall = time.time()
        org.cli("inject-fault", "--server", CASE.server, "--service", CASE.service,
                "--kind", CASE.kind)  # fmt: skip
        injected = time.monotonic()
        blip.injected_at = datetime.datetime.fromtimestamp(wall).isoformat("T", "seconds")
        wait_until("a failed deep test run on DB01", lambda: bool(deep_failures(org, wall)), 30)
        first = deep_failures(org, wall)[0]
        while time.time() < first + seconds:
            blip.worst = max(blip.worst, monitor_value(org, CASE), key=ORDER.index)
            time.sleep(0.1)
        org.cli("clear-fault", "--server", CASE.server, "--service", CASE.service)
        blip.blip_s = round(time.monotonic() - injected, 1)
        cleared = time.monotonic()
        while time.monotonic() - cleared < WATCH_AFTER:
            blip.worst = max(blip.worst, monitor_value(org, CASE), key=ORDER.index)
            time.sleep(POLL)
        blip.refused_logins = logins.failures(injected - started)
    blip.deep_failures = len(deep_failures(org, wall))
    actions, alerts = actions_and_alerts(org)
    blip.alerts = alerts - alerts_before
    blip.actions = [a for key, a in actions.items() if key not in actions_before]
    return blip


def markdown(blips: list[Blip]) -> str:
    lines = [
        "| blip outlasts the failed run by (s) | rounds | fault on (s) | logins refused "
        "| deep test failures | PopDeepTestMonitor at worst | recovery actions | alerts |",
        "|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for seconds in sorted({b.seconds for b in blips}):
        mine = [b for b in blips if b.seconds == seconds]
        worst = max((b.worst for b in mine), key=ORDER.index)
        times = [b.blip_s for b in mine]
        lines.append(
            f"| {seconds:g} | {len(mine)} | {min(times):.1f} / {statistics.median(times):.1f} / "
            f"{max(times):.1f} | {', '.join(str(b.refused_logins) for b in mine)} "
            f"| {', '.join(str(b.deep_failures) for b in mine)} | {worst} "
            f"| {sum(len(b.actions) for b in mine)} | {sum(b.alerts for b in mine)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", default="4,7",
                        help="how long each blip outlasts the deep test run it failed "
                        "(comma-separated)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="blips of each length")
    parser.add_argument("--addresses", default=",".join(DEFAULT_ADDRESSES),
                        help="cas1,mbx1,mbx2 loopback addresses")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the data folder")
    args = parser.parse_args(argv)
    try:
        lengths = [float(s) for s in args.seconds.split(",")]
    except ValueError:
        parser.error(f"--seconds takes numbers separated by commas, got {args.seconds!r}")
    report: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "seconds": lengths,
        "rounds": args.rounds,
    }
    blips: list[Blip] = []
    try:
        with up_organization(tuple(args.addresses.split(",")), True, "popguard-blips-",
                             lambda: bool(args.keep)) as org:  # fmt: skip
            print(f"up in {org.data}; waiting for every monitor to have results", flush=True)
            org.wait_all_healthy(SETTLE_TIMEOUT)
            for round_number in range(1, args.rounds + 1):
                for seconds in lengths:
                    print(f"round {round_number}: a {seconds:g} s blip", flush=True)
                    blip = run_blip(org, seconds, round_number)
                    blips.append(blip)
                    print("  " + json.dumps(blip.__dict__), flush=True)
    except KeyboardInterrupt:
        report["error"] = "interrupted"
    except OrganizationError as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        report["error"] = str(exc)
    report["blips"] = [b.__dict__ for b in blips]
    report["markdown"] = markdown(blips) if blips else ""
    passed = bool(blips) and "error" not in report
    passed = passed and not any(b.actions or b.alerts for b in blips)
    report["passed"] = passed
    out = write_results("blips", report)
    print()
    print(report["markdown"])
    print(f"\n{'PASS' if passed else 'FAIL'}: no responder ran and no alert was raised"
          if passed else "\nFAIL: see the rows above")  # fmt: skip
    print(f"wrote {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
